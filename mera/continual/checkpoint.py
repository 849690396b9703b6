"""Stage checkpoints that hold only what a stage changed.

A stage folder holds

    manifest.json           {"parent": <folder relative to this one, or null = the base LLM>,
                             "deltas": [{"file": "lora.safetensors", "coef": 0.5, "scalings": {...}}],
                             "connectors": "connectors.safetensors", "modalities": [...], ...}
    lora.safetensors        the stage's LoRA pairs (A, B per linear module), never a full LLM
    connectors.safetensors  every connector of the model after the stage ("<modality>.<param>")
    strategy.safetensors    a strategy's state, when it has one (e.g. EWC's accumulated Fisher)
    scores.csv              the stage's evaluation rows
    DONE                    written last: the folder is complete only when it exists

The LLM of a stage is the base LLM plus, from the root of the parent chain down to the
stage, every delta folded with its coefficient (``W += coef * scaling * B @ A``), in the
same order and with the same function as during the run, so a loaded stage is exact.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mera.errors import CheckpointError
from mera.io import atomic_path, write_json, write_text
from mera.train.lora import LoraDelta, fold_lora, lora_from_tensors, lora_to_tensors

MANIFEST = "manifest.json"
DONE = "DONE"


def is_done(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file()


@contextmanager
def _writing(path: Path):
    """Turn a failed write (disk full, no permission) into a CheckpointError naming ``path``;
    the writes are atomic, so a file already at ``path`` is left as it was."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}); "
                              "the stage is not marked done and any earlier version of the file is unchanged") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _writing(path), atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def save_stage(
    folder: str | Path,
    *,
    parent: str | Path | None,
    deltas: list[tuple[LoraDelta, float]],
    connectors: dict[str, dict[str, torch.Tensor]],
    tensors: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
) -> None:
    """Write the checkpoint files of a stage (not DONE: call :func:`mark_done` after the scores)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (delta, coef) in enumerate(deltas):
        pairs, scalings = lora_to_tensors(delta)
        name = "lora.safetensors" if k == 0 else f"lora_{k}.safetensors"
        save_tensors(folder / name, pairs)
        entries.append({"file": name, "coef": float(coef), "scalings": scalings})
    flat = {f"{m}.{k}": v for m, sd in connectors.items() for k, v in sd.items()}
    save_tensors(folder / "connectors.safetensors", flat)
    if tensors:  # a strategy's state (e.g. EWC's accumulated Fisher)
        save_tensors(folder / "strategy.safetensors", tensors)
    rel_parent = None
    if parent is not None:
        rel_parent = str(Path(_relpath(Path(parent), folder)))
    manifest = {
        "format": "mera-stage-v1",
        "parent": rel_parent,
        "deltas": entries,
        "connectors": "connectors.safetensors",
        "modalities": sorted(connectors),
        **(info or {}),
    }
    with _writing(folder / MANIFEST):
        write_json(folder / MANIFEST, manifest)


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def mark_done(folder: str | Path) -> None:
    with _writing(Path(folder) / DONE):
        write_text(Path(folder) / DONE, "done\n")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: stage manifest is missing")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if m.get("format") != "mera-stage-v1" or not isinstance(m.get("deltas"), list):
        raise CheckpointError(f"{path}: not a mera stage manifest")
    return m


def chain(folder: str | Path) -> list[Path]:
    """The stage folders from the root of the parent chain down to ``folder``."""
    out, seen = [], set()
    cur: Path | None = Path(folder).resolve()
    while cur is not None:
        if cur in seen:
            raise CheckpointError(f"{cur}: the parent chain loops")
        seen.add(cur)
        out.append(cur)
        parent = read_manifest(cur).get("parent")
        cur = (cur / parent).resolve() if parent else None
    return out[::-1]


def load_deltas(folder: Path) -> list[tuple[LoraDelta, float]]:
    m = read_manifest(folder)
    out = []
    for e in m["deltas"]:
        tensors = load_tensors(folder / e["file"])
        try:
            out.append((lora_from_tensors(tensors, e["scalings"]), float(e["coef"])))
        except KeyError as k:
            held = ", ".join(sorted(tensors)[:3]) + (", ..." if len(tensors) > 3 else "")
            raise CheckpointError(f"{folder / e['file']}: not the LoRA file its manifest describes: missing tensor "
                                  f"{k} (the file holds {held or 'nothing'})") from None
    return out


def check_delta(llm, delta: LoraDelta, path: Path) -> None:
    """CheckpointError unless every LoRA pair of ``delta`` fits a linear module of ``llm``
    (a checkpoint of another backbone names other modules or has other shapes)."""
    modules = dict(llm.named_modules())
    for name, d in delta.items():
        weight = getattr(modules.get(name), "weight", None)
        if weight is None or weight.dim() != 2:
            raise CheckpointError(f"{path}: LoRA for module {name!r}, which the LLM does not have "
                                  "(a checkpoint of another LLM?)")
        out_f, in_f = weight.shape
        a, b = d["A"], d["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{path}: LoRA of {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; the LLM's "
                                  f"weight is {(out_f, in_f)}, so A (r, {in_f}) and B ({out_f}, r) are expected "
                                  "(a checkpoint of another LLM?)")


def last_delta(folder: str | Path) -> tuple[LoraDelta, float] | None:
    """The last (delta, coefficient) folded in the chain ending at ``folder``, nearest stage first:
    the adapter the latest training stage produced (None if the chain folded none)."""
    for f in reversed(chain(folder)):
        deltas = load_deltas(f)
        if deltas:
            return deltas[-1]
    return None


@torch.no_grad()
def apply_stage_llm(llm, folder: str | Path) -> None:
    """Fold every delta of the chain ending at ``folder`` into the (base) ``llm``, in place."""
    folds = []
    for f in chain(folder):  # read and check the whole chain before changing a weight
        files = [e["file"] for e in read_manifest(f)["deltas"]]
        for file, (delta, coef) in zip(files, load_deltas(f)):
            check_delta(llm, delta, f / file)
            folds.append((delta, coef))
    for delta, coef in folds:
        fold_lora(llm, delta, coef)


def load_strategy_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / "strategy.safetensors"
    return load_tensors(path) if path.is_file() else {}


def load_connectors(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = Path(folder)
    m = read_manifest(folder)
    path = folder / m["connectors"]
    flat = load_tensors(path)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        modality, _, name = key.partition(".")
        out.setdefault(modality, {})[name] = v
    want = m.get("modalities")
    if isinstance(want, list) and sorted(out) != sorted(want):
        raise CheckpointError(f"{path}: holds connectors for {sorted(out)}, its manifest lists {sorted(want)} "
                              "(not this stage's connectors file)")
    return out
