"""The toy model zoo: tokenizer, tiny Llama and the toy encoders, built once and cached.

Layout (``<home>`` is ``$MERA_HOME`` or ``~/.cache/mera``)::

    <home>/toy-zoo-v1/
        manifest.json          written last: its presence means the zoo is complete
        tokenizer/             AutoTokenizer.from_pretrained(...)
        llm/                   LlamaForCausalLM.from_pretrained(...) (+ a copy of the tokenizer)
        encoders/{image,audio,point}/   the toy encoders (video uses the image encoder)

The whole zoo is built in a temporary folder beside it and renamed into place at the
end, so an interrupted build never leaves a folder with a manifest. A manifest whose
config hash differs from the requested config counts as absent (rebuilt on request).
Bump ``ZOO_NAME`` whenever what a build produces changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field

from mera import MODALITIES, __version__
from mera.config.base import StrictModel
from mera.data.toy_world import ToyWorldConfig
from mera.errors import MeraError
from mera.io import replace_dir, sha256_file, write_json
from mera.paths import zoo_home
from mera.zoo.lm import LMConfig

ZOO_NAME = "toy-zoo-v1"  # the zoo of toy-world-1; toy-world-2's lives in toy-zoo-v2 (zoo_name)
MANIFEST = "manifest.json"
ENCODER_MODALITIES = ("image", "audio", "point")  # video reuses the image encoder, frame by frame
BUILD_HINT = "run `mera toy build`"


class ZooConfig(StrictModel):
    """What the zoo is built from. ``home`` only says where it lives (not part of the config hash)."""

    home: str | None = None
    world: ToyWorldConfig = Field(default_factory=ToyWorldConfig)
    lm: LMConfig = Field(default_factory=LMConfig)
    n_text_pairs: int = 8000  # text-only instructions the LM is pre-trained on (held-out ones included)
    seed: int = 0  # seeds the text instructions and the encoders (the LM has its own lm.seed)


def zoo_name(cfg: ZooConfig | None = None) -> str:
    """``toy-zoo-v<world version>``: each world version has its own zoo (tokenizer, LLM, encoders)."""
    return ZOO_NAME if cfg is None or cfg.world.version == 1 else f"toy-zoo-v{cfg.world.version}"


def run_zoo_config(zoo: dict | None, toy: dict | None) -> ZooConfig:
    """The zoo of a run: its ``zoo`` section, the world version following ``data.toy.version``
    unless ``zoo.world.version`` says otherwise (a run on toy-world-2 uses toy-zoo-v2)."""
    from mera.config import validate

    zoo = dict(zoo or {})
    version = (toy or {}).get("version") if isinstance(toy, dict) else None
    if version is not None and "version" not in (zoo.get("world") or {}):
        zoo["world"] = {**(zoo.get("world") or {}), "version": version}
    return validate(zoo, ZooConfig, "config section 'zoo'")


def zoo_dir(cfg: ZooConfig | None = None) -> Path:
    return zoo_home(cfg) / zoo_name(cfg)


def config_hash(cfg: ZooConfig) -> str:
    payload = {"zoo": zoo_name(cfg), "config": cfg.model_dump(mode="json", exclude={"home"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- manifest


class FileInfo(StrictModel):
    bytes: int
    sha256: str


class PartInfo(StrictModel):
    path: str  # relative to the zoo folder
    bytes: int
    params: int | None = None
    seconds: float
    files: dict[str, FileInfo]  # relative to the part's folder
    metrics: dict[str, Any] = Field(default_factory=dict)


class ZooManifest(StrictModel):
    zoo: str = ZOO_NAME
    mera_version: str
    created: str
    config_hash: str
    config: dict[str, Any]
    seconds_total: float
    lm_accuracy: float | None  # held-out exact match, all text instructions
    lm_accuracy_by_kind: dict[str, float | None] = Field(default_factory=dict)  # question / describe
    aux_accuracies: dict[str, Any]
    parts: dict[str, PartInfo]  # tokenizer, llm, image, audio, point
    versions: dict[str, str] = Field(default_factory=dict)
    # where it was found and whether this call built it; not written to the file
    root: str = Field("", exclude=True)
    from_cache: bool = Field(False, exclude=True)

    @property
    def bytes_total(self) -> int:
        return sum(p.bytes for p in self.parts.values())


def _safetensors_params(folder: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                c = 1
                for d in shape:
                    c *= d
                n += c
    return n


def _part_info(root: Path, folder: Path, seconds: float, metrics: dict | None = None) -> PartInfo:
    files = {
        f.relative_to(folder).as_posix(): FileInfo(bytes=f.stat().st_size, sha256=sha256_file(f))
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }
    if not files:
        raise MeraError(f"zoo build: {folder} is empty")
    return PartInfo(
        path=folder.relative_to(root).as_posix(),
        bytes=sum(fi.bytes for fi in files.values()),
        params=_safetensors_params(folder),
        seconds=round(seconds, 2),
        files=files,
        metrics=metrics or {},
    )


def _check_complete(root: Path, m: ZooManifest) -> str | None:
    """None when every file named by the manifest is there with its size; else what is wrong."""
    for name in ("tokenizer", "llm", *ENCODER_MODALITIES):
        if name not in m.parts:
            return f"the manifest has no {name!r} part"
    for part in m.parts.values():
        for rel, fi in part.files.items():
            f = root / part.path / rel
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != fi.bytes:
                return f"{f} has {f.stat().st_size} bytes, the manifest says {fi.bytes}"
    return None


def _inspect(cfg: ZooConfig) -> tuple[ZooManifest | None, str]:
    """(manifest, '') for a complete zoo matching ``cfg``; (None, why not) otherwise."""
    root = zoo_dir(cfg)
    path = root / MANIFEST
    if not path.is_file():
        return None, f"no toy model zoo at {root}"
    try:
        m = ZooManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
        return None, f"{path} is unreadable ({str(e).splitlines()[0]})"
    if m.config_hash != config_hash(cfg):
        return None, f"the toy model zoo at {root} was built from a different config"
    problem = _check_complete(root, m)
    if problem:
        return None, f"the toy model zoo at {root} is incomplete: {problem}"
    m.root, m.from_cache = str(root), True
    return m, ""


def load_manifest(cfg: ZooConfig | None = None) -> ZooManifest | None:
    """The manifest of a complete zoo built from ``cfg``, or None."""
    return _inspect(cfg or ZooConfig())[0]


def zoo_paths(cfg: ZooConfig | None = None) -> dict:
    """Absolute paths of the zoo's parts: ``tokenizer``, ``llm``, ``encoders: {image, video, audio, point}``.

    Raises :class:`MeraError` (telling the user to run ``mera toy build``) when the zoo is
    missing, incomplete, or was built from another config.
    """
    cfg = cfg or ZooConfig()
    m, why = _inspect(cfg)
    if m is None:
        raise MeraError(f"{why}; {BUILD_HINT}")
    root = Path(m.root)
    enc = {mod: root / m.parts[mod].path for mod in ENCODER_MODALITIES}
    enc["video"] = enc["image"]
    return {
        "root": root,
        "manifest": root / MANIFEST,
        "tokenizer": root / m.parts["tokenizer"].path,
        "llm": root / m.parts["llm"].path,
        "encoders": {mod: enc[mod] for mod in MODALITIES},
    }


# --------------------------------------------------------------------------- build


@contextmanager
def _build_lock(home: Path, name: str = ZOO_NAME):
    """An exclusive lock on ``<home>/.<name>.lock`` (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f".{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[mera zoo] {msg}", file=sys.stderr, flush=True)


def _aux_accuracies(summary: dict) -> dict[str, Any]:
    """{modality: {attribute: held-out accuracy}} from the encoders' summary (``aux_accuracy``)."""
    out: dict[str, Any] = {}
    for mod in ENCODER_MODALITIES:
        s = summary.get(mod) if isinstance(summary, dict) else None
        if isinstance(s, dict):
            acc = s.get("aux_accuracy")
            if isinstance(acc, dict):
                out[mod] = acc
            elif isinstance(acc, (int, float)):
                out[mod] = {"accuracy": acc}
    return out


def _instruction_kind(prompt: str) -> str:
    """Text instructions are "describe ..." or questions.

    A question has one right answer. A description has several valid templates, and a held-out
    prompt is scored against the templates ``text_instructions`` happened to draw for it, so its
    exact match is a lower bound.
    """
    return "describe" if prompt.startswith("describe") else "question"


def _build_into(tmp: Path, cfg: ZooConfig, progress: bool) -> ZooManifest:
    """Build every part into the empty folder ``tmp`` and write its manifest there (last)."""
    import torch
    import transformers

    from mera.data import toy_world
    from mera.zoo.encoders import pretrain_toy_encoders
    from mera.zoo.lm import pretrain_lm
    from mera.zoo.tokenizer import build_tokenizer

    t_all = time.perf_counter()
    parts: dict[str, PartInfo] = {}

    t = time.perf_counter()
    version = cfg.world.version
    tok = build_tokenizer(toy_world.vocabulary(version), tmp / "tokenizer", model_max_length=cfg.lm.max_position_embeddings)
    parts["tokenizer"] = _part_info(tmp, tmp / "tokenizer", time.perf_counter() - t, {"vocab_size": len(tok)})
    _log(progress, f"tokenizer: {len(tok)} tokens")

    # The LM and the encoders are independent: with two or more cores the encoders train in a
    # second process while this one trains the LM, one torch thread each (on these tiny models
    # one thread runs about as fast as two, so this nearly halves the build's wall time).
    parallel = _cores() >= 2
    pool = enc_future = None
    t_enc0 = time.perf_counter()
    if parallel:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        enc_future = pool.submit(_encoders_job, str(tmp / "encoders"), cfg.world, cfg.seed)
        _log(progress, "encoders: training in a second process")
    threads = torch.get_num_threads()
    t = time.perf_counter()
    pairs = toy_world.text_instructions(cfg.n_text_pairs, seed=cfg.seed, version=version)
    try:
        if parallel:
            torch.set_num_threads(1)
        lm = pretrain_lm(tok, pairs, tmp / "llm", cfg.lm, progress=progress, kind=_instruction_kind)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        torch.set_num_threads(threads)
    lm_metrics = {k: lm[k] for k in ("eval_exact_match", "eval_by_kind", "n_eval", "n_train_pairs", "final_loss",
                                     "steps", "seconds_train", "seconds_eval", "weights_sha256")}
    parts["llm"] = _part_info(tmp, tmp / "llm", time.perf_counter() - t, lm_metrics)
    acc = lm["eval_exact_match"]
    _log(progress, f"llm: {lm['params']:,} params, held-out exact match "
                   f"{'n/a' if acc is None else f'{acc:.1%}'} (n={lm['n_eval']}), {parts['llm'].seconds:.1f} s")

    if parallel:
        try:
            enc_summary = enc_future.result()
        finally:
            pool.shutdown(wait=True)
        t_enc = time.perf_counter() - t_enc0
        for mod, sm in enc_summary.items():
            _log(progress, f"toy {mod} encoder: {sm['seconds']:.1f} s, held-out accuracy "
                           + ", ".join(f"{k} {v:.2f}" for k, v in sm["aux_accuracy"].items()))
    else:
        t = time.perf_counter()
        enc_summary = pretrain_toy_encoders(tmp / "encoders", cfg.world, seed=cfg.seed, progress=progress)
        t_enc = time.perf_counter() - t
    for mod in ENCODER_MODALITIES:
        s = enc_summary.get(mod) if isinstance(enc_summary, dict) else None
        s = s if isinstance(s, dict) else {}
        secs = s.get("seconds", t_enc / len(ENCODER_MODALITIES))
        parts[mod] = _part_info(tmp, tmp / "encoders" / mod, secs,
                                {k: v for k, v in s.items() if k != "path"})  # paths live in the part
    _log(progress, f"encoders: {t_enc:.1f} s")

    m = ZooManifest(
        zoo=zoo_name(cfg),
        mera_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config_hash=config_hash(cfg),
        config=cfg.model_dump(mode="json", exclude={"home"}),
        seconds_total=round(time.perf_counter() - t_all, 2),
        lm_accuracy=acc,
        lm_accuracy_by_kind={k: v["exact_match"] for k, v in lm["eval_by_kind"].items()},
        aux_accuracies=_aux_accuracies(enc_summary),
        parts=parts,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    write_json(tmp / MANIFEST, m.model_dump(mode="json"))
    return m


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _encoders_job(out_dir: str, world_cfg, seed: int) -> dict:
    """The encoders' pre-training, run in a spawned process (one torch thread)."""
    import torch

    from mera.zoo.encoders import pretrain_toy_encoders

    torch.set_num_threads(1)
    return pretrain_toy_encoders(out_dir, world_cfg, seed=seed, progress=False)


def build_zoo(cfg: ZooConfig | None = None, force: bool = False, progress: bool = True) -> ZooManifest:
    """Return the zoo's manifest, building the zoo first unless a complete one matching ``cfg`` exists.

    ``force`` rebuilds even then. Builds run in ``<home>/.toy-zoo-v1.tmp-*`` and are renamed to
    ``<home>/toy-zoo-v1`` only when complete; concurrent builders serialise on a lock file.
    """
    cfg = cfg or ZooConfig()
    if not force:
        m, _ = _inspect(cfg)
        if m is not None:
            return m
    home = zoo_home(cfg)
    name = zoo_name(cfg)
    root = home / name
    with _build_lock(home, name) as locked:
        if not force:  # someone may have finished it while we waited for the lock
            m, _ = _inspect(cfg)
            if m is not None:
                return m
        if locked:  # leftovers of builds that died (nobody else can be building now)
            for junk in home.glob(f".{name}.*-*"):
                if junk.is_dir():
                    shutil.rmtree(junk, ignore_errors=True)
        tmp = home / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        _log(progress, f"building the toy model zoo into {root}")
        try:
            m = _build_into(tmp, cfg, progress)
            replace_dir(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    m.root, m.from_cache = str(root), False
    return m


# --------------------------------------------------------------------------- summary


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1000:
        return str(n)
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "n/a"


def format_build_summary(manifest: ZooManifest) -> str:
    """A short table for ``mera toy build``: what is in the zoo, where, sizes, times, checks."""
    m = manifest
    head = (f"toy model zoo (cached, built {m.created})" if m.from_cache
            else f"toy model zoo built in {m.seconds_total:.1f} s")
    lines = [f"{head}: {m.root or '(unknown folder)'}", f"  {'part':<10} {'params':>9} {'size':>9} {'time':>8}  check"]
    for name, p in m.parts.items():
        if name == "tokenizer":
            check = f"{p.metrics.get('vocab_size', '?')} tokens"
        elif name == "llm":
            check = f"held-out exact match {_pct(p.metrics.get('eval_exact_match'))} (n={p.metrics.get('n_eval', '?')}"
            by_kind = p.metrics.get("eval_by_kind") or {}
            check += "".join(f"; {k} {'>=' if k == 'describe' else ''}{_pct(v.get('exact_match'))}"
                             for k, v in by_kind.items()) + ")"
        else:
            accs = m.aux_accuracies.get(name) or {}
            check = ("aux accuracy " + ", ".join(f"{k} {_pct(v)}" for k, v in accs.items())) if accs else ""
        lines.append(f"  {name:<10} {_params(p.params):>9} {_size(p.bytes):>9} {p.seconds:>6.1f} s  {check}".rstrip())
    lines.append(f"  {'video':<10} {'':>9} {'':>9} {'':>8}  uses the image encoder on each frame")
    lines.append(f"  total size {_size(m.bytes_total)}; mera {m.mera_version}")
    return "\n".join(lines)
