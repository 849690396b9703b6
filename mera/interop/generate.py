"""``mera generate``: answer a prompt about one media file with a finished stage or an exported model.

Targets:

- a finished stage folder (with DONE) of a run: ``runs/x/sequential/mera-10/stage_2_point``
  (also an expert folder, ``runs/x/experts/image``);
- a run directory with ``--stage ORDER/METHOD/I`` (METHOD: its name or folder name; I: the
  stage index, or omitted for the last stage) or ``--expert MODALITY``;
- a folder written by ``mera export``.

A stage is rebuilt exactly as the run evaluated it (``load_assets`` + ``load_stage``).
The prompt gets the modality's placeholder (``<image>\\n`` + prompt) unless it holds it already;
decoding is greedy, as in evaluation. ``--stream`` prints the answer token by token;
``--batch FILE`` answers a JSON list (or JSON lines) of ``{media, modality, prompt}`` items and
writes one JSON object per line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mera import MODALITIES, PLACEHOLDERS
from mera.errors import CheckpointError, ConfigError, DataError

DEFAULT_MAX_NEW_TOKENS = 32


def _no_grad(fn):
    """``torch.no_grad()`` applied at call time (torch is imported lazily: ``mera --help`` stays fast)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **k):
        import torch

        with torch.no_grad():
            return fn(*a, **k)

    return wrapper


@dataclass
class Loaded:
    """A model ready to answer: what it is, which modalities it has learned, its default answer length."""

    model: object  # MultimodalLM
    source: str
    kind: str  # "stage" | "export"
    max_new_tokens: int

    @property
    def modalities(self) -> list[str]:
        return list(self.model.modalities)


# ============================================================================ targets


def _finished(run_dir: Path, rd) -> list[str]:  # rd: the run's RunDir
    from mera.continual import checkpoint as ckpt

    out = [f"--expert {m}" for m in rd.plan()["experts"] if ckpt.is_done(rd.expert_dir(m))]
    out += [f"--stage {st.order}/{st.method.name}/{st.index}" for st in rd.stages(seeds=[rd.seed])
            if ckpt.is_done(st.folder)]
    return out


def _run_config(run_dir: Path):
    from mera.config import load_config
    from mera.runner.run_config import RunConfig

    return load_config(run_dir / "config.yaml", [], RunConfig)


def stage_folder(run_dir: Path, stage: str | None = None, expert: str | None = None) -> Path:
    """The stage folder that ``--stage ORDER/METHOD[/I]`` or ``--expert M`` names in ``run_dir``."""
    from mera.continual import checkpoint as ckpt
    from mera.runner.names import slug
    from mera.runner.rundir import RunDir

    cfg = _run_config(run_dir)
    rd = RunDir(run_dir, cfg)
    if stage and expert:
        raise ConfigError("give --stage or --expert, not both")
    if expert:
        if expert not in cfg.model.branches:
            raise ConfigError(f"--expert {expert}: the run has no {expert!r} branch "
                              f"(it has: {', '.join(cfg.model.branches)})")
        folder = rd.expert_dir(expert)
    elif stage:
        parts = stage.strip("/").split("/")
        if len(parts) not in (2, 3):
            raise ConfigError(f"--stage {stage!r}: expected ORDER/METHOD/I (e.g. sequential/MERA (10%)/2)")
        oname, mname = parts[0], parts[1]
        if oname not in cfg.orders:
            raise ConfigError(f"--stage {stage!r}: no order {oname!r} in the run (orders: {', '.join(cfg.orders)})")
        meths = [m for m in cfg.methods if mname in (m.name, slug(m.name))]
        if not meths:
            raise ConfigError(f"--stage {stage!r}: no method {mname!r} in the run "
                              f"(methods: {', '.join(m.name for m in cfg.methods)})")
        chain = rd.chain(oname, meths[0])
        try:
            i = int(parts[2]) if len(parts) == 3 else rd.final_stage(oname, meths[0]).index
        except ValueError:
            raise ConfigError(f"--stage {stage!r}: the stage index {parts[2]!r} is not a number") from None
        if not 1 <= i <= len(chain):
            raise ConfigError(f"--stage {stage!r}: order {oname!r} has stages 1..{len(chain)}")
        folder = chain[i - 1].folder
    else:
        done = _finished(run_dir, rd)
        raise ConfigError(f"{run_dir}: a run directory; choose a stage with --stage ORDER/METHOD/I or "
                          f"--expert MODALITY (finished: {'; '.join(done[:12]) or 'none'})")
    if not ckpt.is_done(folder):
        raise CheckpointError(f"{folder}: this stage is not finished (no DONE file)")
    return folder


def load_target(path: str | os.PathLike, *, stage: str | None = None, expert: str | None = None,
                config_dir=None, device=None, assets=None) -> Loaded:
    """Load what ``path`` names (an exported folder, a stage folder, or a run dir + stage / expert)."""
    from mera.continual.stages import load_stage
    from mera.interop.export import assets_for, check_stage, find_run_dir, is_export, load_exported

    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder (expected a stage folder, a run directory or an exported model)")
    if is_export(p):
        if stage or expert:
            raise ConfigError(f"{p}: an exported model has one stage; --stage / --expert do not apply")
        model, m = load_exported(p, device=device)
        return Loaded(model, str(p), "export", int((m.get("generation") or {}).get("max_new_tokens")
                                                  or DEFAULT_MAX_NEW_TOKENS))
    if (p / "config.yaml").is_file() and not (p / "manifest.json").is_file():
        folder = stage_folder(p, stage, expert)
        run_dir = p
    else:
        if stage or expert:
            raise ConfigError(f"{p}: --stage / --expert need a run directory (with config.yaml), not a stage folder")
        if not (p / "manifest.json").is_file():
            raise CheckpointError(f"{p}: neither a run directory (config.yaml), a stage folder (manifest.json, "
                                  "DONE) nor an exported model (manifest.json of mera export)")
        folder = p
        run_dir = find_run_dir(folder)
    check_stage(folder)
    assets = assets or assets_for(run_dir, config_dir)
    model = load_stage(assets, folder)
    model.eval()
    return Loaded(model, str(folder), "stage", int(assets.cfg.eval.max_new_tokens))


# ============================================================================ answering


def build_prompt(modality: str, prompt: str) -> str:
    """``prompt`` with the modality's placeholder: kept where the user wrote it, else ``<m>\\n`` in front."""
    ph = PLACEHOLDERS[modality]
    return prompt if ph in prompt else f"{ph}\n{prompt}"


def check_modality(loaded: Loaded, modality: str) -> None:
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
    if modality not in loaded.modalities:
        raise ConfigError(f"{loaded.source}: this model has not learned {modality!r}; "
                          f"it has learned: {', '.join(loaded.modalities) or 'nothing'}")


def make_item(loaded: Loaded, modality: str, media, prompt: str, where: str = "") -> dict:
    """A collator item (preprocessed media, placeholder prompt) for one request."""
    from mera.data.media import read_media

    check_modality(loaded, modality)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}the prompt must be a non-empty string")
    if isinstance(media, (list, tuple)) and modality != "video":
        if len(media) != 1:
            raise ConfigError(f"{where}a {modality} takes one media file, got {len(media)}")
        media = media[0]
    if isinstance(media, (list, tuple)) and len(media) == 1 and Path(media[0]).suffix.lower() not in (
            ".png", ".jpg", ".jpeg"):
        media = media[0]  # one video file
    text = build_prompt(modality, prompt)
    others = [ph for m, ph in PLACEHOLDERS.items() if m != modality and ph in text]
    if others or text.count(PLACEHOLDERS[modality]) != 1:
        raise ConfigError(f"{where}a {modality} prompt holds exactly one {PLACEHOLDERS[modality]} and no other "
                          f"placeholder; got {prompt!r}")
    enc = loaded.model.branch(modality).encoder
    try:
        x = enc.preprocess(read_media(modality, media))
    except DataError:
        raise
    except (ValueError, RuntimeError) as e:
        raise DataError(f"{media}: cannot preprocess for the {modality} encoder ({e})") from None
    return {"modality": modality, "prompt": text, "answer": None, "media": x}


def _batch(loaded: Loaded, items: list[dict]) -> dict:
    from mera.model.collate import MultimodalCollator

    collate = MultimodalCollator(loaded.model.tokenizer, loaded.model, train=False)
    try:
        return collate(items)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@_no_grad
def stream_ids(model, batch: dict, max_new_tokens: int, write) -> list[int]:
    """Greedy decoding of one sample exactly as ``MultimodalLM.generate_ids``, writing the text as it
    comes (``write(str)``); returns the new ids cut before the first eos."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                write(text)

    model.eval()
    embeds = model.embed(batch)
    attention_mask = batch["attention_mask"].to(embeds.device)
    eos = model._eos_ids()
    pad = model.tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    seqs = model.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                              eos_token_id=eos or None,
                              streamer=_Streamer(model.tokenizer, skip_prompt=False, skip_special_tokens=True))
    row = seqs[0].tolist()
    for j, tok in enumerate(row):
        if tok in eos:
            return row[:j]
    return row


def answer(loaded: Loaded, modality: str, media, prompt: str, max_new_tokens: int | None = None,
           stream=None) -> str:
    """The greedy answer to ``prompt`` about ``media``; ``stream``: a ``write(str)`` to print it as it comes."""
    n = int(max_new_tokens or loaded.max_new_tokens)
    batch = _batch(loaded, [make_item(loaded, modality, media, prompt)])
    if stream is None:
        return loaded.model.generate(batch, max_new_tokens=n)[0]
    ids = stream_ids(loaded.model, batch, n, stream)
    return loaded.model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def read_batch(path: str | os.PathLike) -> list[dict]:
    """Items ``{media, modality, prompt}`` (``id`` optional) from a JSON list or JSON lines; media paths
    relative to the file's folder."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: batch file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{p}: expected a non-empty JSON list (or JSON lines) of {{media, modality, prompt}}")
    out = []
    for i, it in enumerate(data):
        if not isinstance(it, dict):
            raise DataError(f"{p}: item {i} is not an object")
        missing = [k for k in ("media", "modality", "prompt") if k not in it]
        if missing:
            raise DataError(f"{p}: item {i} lacks {', '.join(missing)}")

        def rel(m):
            if not isinstance(m, str):
                raise DataError(f"{p}: item {i}: media must be a path or a list of paths, got {m!r}")  # noqa: B023
            mp = Path(m).expanduser()
            return str(mp if mp.is_absolute() else p.parent / mp)

        media = [rel(m) for m in it["media"]] if isinstance(it["media"], list) else rel(it["media"])
        out.append({**it, "media": media})
    return out


def answer_batch(loaded: Loaded, items: list[dict], max_new_tokens: int | None = None,
                 batch_size: int = 8, on_answer=None) -> list[dict]:
    """Answer every item (all checked first); returns ``{index, [id], modality, media, prompt, answer}`` rows."""
    n = int(max_new_tokens or loaded.max_new_tokens)
    for i, it in enumerate(items):  # every item checked before any work
        try:
            check_modality(loaded, it["modality"])
        except ConfigError as e:
            raise ConfigError(f"item {i}: {e}") from None
    rows = []
    for start in range(0, len(items), max(1, batch_size)):
        chunk = items[start:start + batch_size]
        batch = _batch(loaded, [make_item(loaded, it["modality"], it["media"], it["prompt"], f"item {start + k}: ")
                                for k, it in enumerate(chunk)])
        for k, (it, a) in enumerate(zip(chunk, loaded.model.generate(batch, max_new_tokens=n))):
            row = {"index": start + k, **({"id": it["id"]} if "id" in it else {}), "modality": it["modality"],
                   "media": it["media"], "prompt": it["prompt"], "answer": a}
            rows.append(row)
            if on_answer is not None:
                on_answer(row)
    return rows


__all__ = ["Loaded", "load_target", "answer", "answer_batch", "read_batch", "build_prompt", "stage_folder"]
