"""Stage checkpoints that hold only what a stage changed (manifest ``mera-stage-v2``).

A stage folder holds

    manifest.json           {"format": "mera-stage-v2",
                             "parent": <folder relative to this one, or null = the base LLM>,
                             "folds": [{"file": "delta.safetensors", "kind": "lora", "coef": 0.5,
                                        "scalings": {...}}, ...],
                             "trained": {"file": "delta.safetensors", "kind": "lora", "coef": 0.5, ...} | null,
                             "connectors": "connectors.safetensors", "modalities": [...], ...}
    delta*.safetensors      deltas (mera.continual.deltas.Delta: LoRA pairs or dense), never a full LLM
    connectors.safetensors  every connector of the model after the stage ("<modality>.<param>")
    strategy.safetensors    a strategy's state, when it has one (e.g. EWC's accumulated Fisher)
    scores.csv              the stage's evaluation rows
    DONE                    written last: the folder is complete only when it exists; it lists every
                            other file of the folder with its size and sha256, and a resume checks them

``state_key`` (a digest of the parent's state key, the folds, the trained delta, the strategy
state and the layout of a strategy's LLM modules) names what the stage's model is besides its
connectors: two stages with one state key have the same LLM, modules and history, whichever
method trained them (the content keys of mera.continual.sharing start from it).

``folds`` are what the stage folded into the LLM, in order (``W += coef * update``);
``trained`` is the delta the stage's training produced (what a merge rule receives as the new
delta and later stages as history), with the coefficient it was folded with (null if only a
merge of it was folded). The LLM of a stage is the base LLM plus every fold of the parent
chain, root first, with the same function as during the run, so a loaded stage is exact.

Version 1 folders (``mera-stage-v1``: a "deltas" list of LoRA files) are still read: their
deltas are the folds, and the trained delta is the last one folded with a positive coefficient.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mera.continual.deltas import Delta
from mera.errors import CheckpointError, CheckpointWriteError, WriteError
from mera.faults import fault_point
from mera.io import atomic_path, sha256_file, write_json, write_message

MANIFEST = "manifest.json"
FORMAT = "mera-stage-v2"
DONE = "DONE"
REMEASURED = ("profile.json",)  # rewritten after the stage is done (mera profile): not recorded in DONE


def is_done(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file()


def done_problem(folder: str | Path) -> str | None:
    """Why a DONE folder's files are not the ones DONE recorded (missing, another size, another
    sha256), or None when they are (or DONE predates the record: the first release wrote
    ``done``)."""
    folder = Path(folder)
    try:
        text = (folder / DONE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return f"{folder / DONE}: unreadable ({e})"
    if text.strip() == "done":
        return None
    try:
        files = json.loads(text)["files"]
        items = [(str(k), int(v["size"]), str(v["sha256"])) for k, v in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{folder / DONE}: not a list of the stage's files"
    for name, size, digest in items:
        path = folder / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return f"{path}: missing (DONE lists it)"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, DONE recorded {size}"
        if sha256_file(path) != digest:
            return f"{path}: its content changed since the stage was done (sha256 differs)"
    return None


_NOT_DONE = "the stage is not marked done and any earlier version of the file is unchanged"


@contextmanager
def _writing(path: Path):
    """Turn a failed write into a CheckpointError naming ``path`` (a CheckpointWriteError, which
    also says what to do, when the disk caused it: full, over quota, an I/O error); the writes are
    atomic, so a file already at ``path`` is left as it was."""
    try:
        yield
    except WriteError as e:  # mera.io's atomic writers: the disk's doing
        raise CheckpointWriteError(write_message(path, e.errno, "the checkpoint", _NOT_DONE), str(path), e.errno) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}); {_NOT_DONE}") from None


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes of ``tensors`` (any dtype, any device)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_key(folder: str | Path | None) -> str | None:
    """The state key of a finished stage ("base": the base LLM; None: a stage written before
    state keys existed)."""
    if folder is None:
        return "base"
    return read_manifest(folder).get("state_key")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _writing(path), atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        fault_point("write_stage")


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
    folds: list[tuple[Delta, float]],
    trained: Delta | None = None,
    connectors: dict[str, dict[str, torch.Tensor]],
    tensors: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
) -> None:
    """Write the checkpoint files of a stage (not DONE: call :func:`mark_done` after the scores).

    A delta that is both folded and the trained one is written once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[int, dict] = {}  # id(delta) -> its manifest entry (without coef)
    digests: dict[int, str] = {}

    def entry(delta: Delta, name: str) -> dict:
        if id(delta) not in files:
            data, meta = delta.to_tensors()
            save_tensors(folder / name, data)
            files[id(delta)] = {"file": name, **meta}
            digests[id(delta)] = tensor_digest(data)
        return dict(files[id(delta)])

    trained_entry = None
    if trained is not None:
        trained_entry = entry(trained, "delta.safetensors")
        coefs = [c for d, c in folds if d is trained]
        trained_entry["coef"] = float(coefs[0]) if len(coefs) == 1 else None
    fold_entries = [{**entry(d, f"fold_{k}.safetensors"), "coef": float(c)} for k, (d, c) in enumerate(folds)]
    flat = {f"{m}.{k}": v for m, sd in connectors.items() for k, v in sd.items()}
    save_tensors(folder / "connectors.safetensors", flat)
    if tensors:  # a strategy's state (e.g. EWC's accumulated Fisher)
        save_tensors(folder / "strategy.safetensors", tensors)
    rel_parent = None
    if parent is not None:
        rel_parent = str(Path(_relpath(Path(parent), folder)))
    parent_key = state_key(parent)
    key = None
    if parent_key is not None:
        fold_parts = [[digests[id(d)], float(c), {k: v for k, v in files[id(d)].items() if k != "file"}]
                      for d, c in folds]
        parts = [parent_key, fold_parts,
                 [digests[id(trained)], trained_entry.get("coef")] if trained is not None else None,
                 tensor_digest(tensors) if tensors else None, (info or {}).get("llm_modules")]
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    manifest = {
        "format": FORMAT,
        "parent": rel_parent,
        "state_key": key,
        "folds": fold_entries,
        "trained": trained_entry,
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
    """Write DONE: the folder's files (every plain file but DONE and temporary ones) with their
    sizes and sha256, so that a resume can tell a whole stage from one a crash or a disk damaged."""
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir())
             if p.is_file() and p.name != DONE and p.name not in REMEASURED and not p.name.startswith(".")}
    with _writing(folder / DONE):
        write_json(folder / DONE, {"files": files})


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: stage manifest is missing")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: not a mera stage manifest")
    if m.get("format") == "mera-stage-v1" and isinstance(m.get("deltas"), list):
        folds = [{"kind": "lora", **e} for e in m["deltas"]]  # v1: LoRA files, all folded
        positive = [e for e in folds if float(e.get("coef", 0)) > 0]
        m = {**m, "folds": folds, "trained": dict(positive[-1]) if positive else None}
    elif m.get("format") != FORMAT or not isinstance(m.get("folds"), list):
        raise CheckpointError(f"{path}: not a mera stage manifest")
    for e in m["folds"] + ([m["trained"]] if m.get("trained") else []):
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or "/" in e["file"] or e["file"].startswith("."):
            raise CheckpointError(f"{path}: a delta entry of the manifest is malformed ({e!r})")
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


def _load_delta(folder: Path, e: dict) -> Delta:
    path = folder / e["file"]
    return Delta.from_tensors(load_tensors(path), e, path)


def load_folds(folder: str | Path) -> list[tuple[Delta, float]]:
    """The (delta, coefficient) pairs a stage folded into the LLM, in order."""
    folder = Path(folder)
    cache: dict[str, Delta] = {}
    out = []
    for e in read_manifest(folder)["folds"]:
        if e["file"] not in cache:
            cache[e["file"]] = _load_delta(folder, e)
        out.append((cache[e["file"]], float(e["coef"])))
    return out


def load_trained(folder: str | Path) -> tuple[Delta, float | None] | None:
    """The delta a stage's training produced and the coefficient it was folded with (None: none)."""
    e = read_manifest(folder).get("trained")
    if not e:
        return None
    return _load_delta(Path(folder), e), (None if e.get("coef") is None else float(e["coef"]))


def last_trained(folder: str | Path) -> tuple[Delta, float | None] | None:
    """The trained delta nearest to ``folder`` in its parent chain (``folder`` first), or None."""
    for f in reversed(chain(folder)):
        found = load_trained(f)
        if found is not None:
            return found
    return None


class History:
    """The trained deltas of a parent chain, root first, loaded only when read (a merge rule
    that needs no history costs nothing)."""

    def __init__(self, folder: str | Path | None):
        self._folders = [f for f in chain(folder) if read_manifest(f).get("trained")] if folder else []
        self._loaded: dict[int, Delta] = {}

    def __len__(self) -> int:
        return len(self._folders)

    def __getitem__(self, i: int) -> Delta:
        i = range(len(self._folders))[i]
        if i not in self._loaded:
            self._loaded[i] = load_trained(self._folders[i])[0]
        return self._loaded[i]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@torch.no_grad()
def apply_stage_llm(llm, folder: str | Path) -> None:
    """Fold every delta of the chain ending at ``folder`` into the (base) ``llm``, in place."""
    folds = []
    for f in chain(folder):  # read and check the whole chain before changing a weight
        files = [e["file"] for e in read_manifest(f)["folds"]]
        for file, (delta, coef) in zip(files, load_folds(f)):
            delta.check(llm, f / file)
            folds.append((delta, coef))
    for delta, coef in folds:
        delta.fold(llm, coef)


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


class ChainView:
    """What strategies may read of the chain a stage starts from (``folder``: the parent stage)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def last_trained(self) -> tuple[Delta, float | None] | None:
        """The delta the latest training stage of the chain produced, and its fold coefficient."""
        return last_trained(self.folder) if self.folder is not None else None

    def state(self) -> dict[str, torch.Tensor]:
        """The strategy state saved by the nearest stage of the chain that saved one ({} if none)."""
        for f in reversed(chain(self.folder) if self.folder is not None else []):
            saved = load_strategy_tensors(f)
            if saved:
                return saved
        return {}

    def trained(self) -> History:
        """Every trained delta of the chain, root first (lazily loaded)."""
        return History(self.folder)
