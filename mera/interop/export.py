"""Moving a model out of mera: ``mera export``, and loading what it wrote.

``export_stage(STAGE_DIR, DIR)`` writes a finished stage as a self-contained model::

    DIR/llm/                             the LLM with every delta of the stage chain folded in
    DIR/connectors/<modality>.safetensors
    DIR/manifest.json                    per modality: encoder (family, absolute path, options),
                                         connector config and file; the source stage

and ``load_exported(DIR)`` rebuilds the :class:`~mera.model.mllm.MultimodalLM` from it (what
``mera generate DIR`` uses). ``export_stage(..., fmt="llava")`` writes a transformers LLaVA folder
instead, with the other branches in ``DIR/mera_branches/`` (:mod:`mera.interop.llava_export`);
``load_exported`` reads both layouts. Everything is safetensors; nothing is loaded with pickle or
``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mera.errors import CheckpointError, ConfigError
from mera.interop._common import _load_tensors, _prepare_out, _save_tensors
from mera.io import atomic_dir, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

EXPORT_FORMAT = "mera-export-v1"
FORMATS = ("mera", "llava")  # --format: mera's own layout, or a transformers LlavaForConditionalGeneration folder
# where the manifest of each layout lives (the llava layout keeps the top folder a plain HF folder)
MANIFESTS = ("manifest.json", "mera_branches/manifest.json")


def find_run_dir(stage: Path) -> Path:
    """The run directory holding the stage folder ``stage`` (the nearest parent with config.yaml)."""
    for p in [stage, *stage.parents][:5]:
        if (p / "config.yaml").is_file():
            return p
    raise CheckpointError(f"{stage}: no run directory with config.yaml above this stage folder")


def _relative_refs(cfg) -> list[str]:
    refs = [cfg.model.llm, cfg.model.tokenizer or ""]
    for b in cfg.model.branches.values():
        refs += [b.encoder.path or "", b.pretrained_connector or ""]
    for p in cfg.data.sets.values():
        refs += [p.caption_train, p.caption_test, p.qa_train, p.qa_test]
    return [r for r in refs if r and not r.startswith("zoo:") and not Path(r).expanduser().is_absolute()]


def guess_config_dir(cfg, run_dir: Path, config_dir: str | os.PathLike | None = None) -> Path:
    """The folder that relative paths of a run's config are relative to: ``config_dir`` when given,
    else the first of (working folder, run folder, its parent) where they all exist."""
    if config_dir is not None:
        return Path(config_dir).resolve()
    refs = _relative_refs(cfg)
    for cand in (Path.cwd(), run_dir, run_dir.parent):
        if all((cand / r).exists() for r in refs):
            return cand.resolve()
    return Path.cwd()


def assets_for(run_dir: Path, config_dir=None, progress: bool = False, data: bool = False):
    """The :class:`~mera.continual.assets.Assets` of the finished run in ``run_dir``: enough to load
    and use its stages (``data=True`` also loads its data sets; the judge is never built)."""
    from mera.config import load_config
    from mera.continual.assets import load_assets
    from mera.runner.run_config import RunConfig

    cfg = load_config(run_dir / "config.yaml", [], RunConfig)
    return load_assets(cfg, guess_config_dir(cfg, run_dir, config_dir), cache_dir=run_dir / ".features", data=data,
                       judge=False, progress=progress, threads=cfg.threads)


def check_stage(stage: Path) -> dict:
    from mera.continual import checkpoint as ckpt

    if not stage.is_dir():
        raise CheckpointError(f"{stage}: not a folder")
    if not ckpt.is_done(stage):
        raise CheckpointError(f"{stage}: not a finished stage (no DONE file)")
    return ckpt.read_manifest(stage)


def export_stage(stage_dir: str | os.PathLike, out_dir: str | os.PathLike, *, config_dir=None, force: bool = False,
                 assets=None, fmt: str = "mera") -> dict:
    """Write the model of a finished stage as a folder ``mera generate`` (and plain HF, for the LLM) can
    load; returns the manifest. ``assets``: the stage's run's already loaded assets (else they are loaded).
    ``fmt="llava"``: a transformers LLaVA folder (:func:`mera.interop.llava_export.export_llava`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: unknown export format; known: {', '.join(FORMATS)}")
    stage = Path(stage_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    manifest = check_stage(stage)
    if manifest.get("llm_modules"):
        kind = manifest["llm_modules"].get("kind", "?")
        raise CheckpointError(f"{stage}: a {kind} stage: its LLM holds extra modules (PathWeave's adapters) that "
                              "cannot be folded into a plain HF model, so it cannot be exported; "
                              "`mera generate` works on the stage folder itself")
    run_dir = find_run_dir(stage)
    if fmt == "llava":
        from mera.interop.llava_export import export_llava

        return export_llava(stage, out, manifest, run_dir, config_dir=config_dir, force=force, assets=assets)
    _prepare_out(out, force, "exported model", stage, existing_manifest(out), EXPORT_FORMAT)
    from mera.continual.stages import load_stage

    assets = assets or assets_for(run_dir, config_dir)
    model = load_stage(assets, stage)
    from mera.train.branches import bake

    bake(model.llm)  # folds kept as branches (model.folds: branches) go into the weights, rounded once
    cfg = assets.cfg
    with atomic_dir(out) as tmp:
        model.llm.save_pretrained(str(tmp / "llm"))
        assets.tokenizer.save_pretrained(str(tmp / "llm"))
        modalities = {m: branch_entry(tmp, model, assets, stage, m) for m in model.modalities}
        info = {
            "format": EXPORT_FORMAT,
            "source": stage_source(stage, run_dir, manifest),
            "llm": "llm",
            "dtype": cfg.model.dtype,
            "modalities": modalities,
            "generation": {"max_new_tokens": cfg.eval.max_new_tokens},
        }
        write_json(tmp / "manifest.json", info)
    return info


def existing_manifest(out: Path) -> str:
    """The manifest file (relative to ``out``) by which ``--force`` recognises an earlier export in
    ``out``, of either layout: an export of one format may replace one of the other."""
    for name in MANIFESTS[::-1]:
        if (out / name).is_file():
            return name
    return MANIFESTS[0]


def stage_source(stage: Path, run_dir: Path, manifest: dict) -> dict:
    from mera.continual import checkpoint as ckpt

    return {"run": str(run_dir), "stage": str(stage), "kind": manifest.get("kind"),
            "stage_index": manifest.get("stage"), "modality": manifest.get("modality"),
            "chain": [str(p) for p in ckpt.chain(stage)]}


def branch_entry(root: Path, model, assets, stage: Path, m: str) -> dict:
    """The manifest entry of modality ``m`` (encoder reference, connector config), its connector
    written to ``root/connectors/<m>.safetensors``."""
    b = assets.cfg.model.branches.get(m)
    if b is None:
        raise CheckpointError(f"{stage}: has a {m!r} connector but the run's config has no such branch")
    if not b.encoder.path:
        raise CheckpointError(f"{stage}: the {m!r} encoder ({b.encoder.family}) has no path in the run's "
                              "config, so the export cannot refer to it")
    conn_cfg = b.connector.model_dump(mode="json")
    if conn_cfg.get("init_from"):  # the BERT folder fixes the Q-Former's sizes
        conn_cfg["init_from"] = os.path.abspath(conn_cfg["init_from"])
    file = f"connectors/{m}.safetensors"
    _save_tensors(root / file, model.branch(m).connector.state_dict())
    return {
        "encoder": {"family": b.encoder.family, "path": str(Path(assets.resolve(b.encoder.path)).resolve()),
                    "options": dict(b.encoder.options)},
        "connector": conn_cfg,
        "connector_file": file,
    }


def manifest_file(folder: Path) -> Path | None:
    """The export manifest of ``folder`` (mera's layout: ``manifest.json``; the llava layout:
    ``mera_branches/manifest.json``), or None."""
    for name in MANIFESTS:
        f = folder / name
        if f.is_file():
            try:
                if json.loads(f.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT:
                    return f
            except (OSError, ValueError, AttributeError):
                pass
    return None


def is_export(folder: str | os.PathLike) -> bool:
    return manifest_file(Path(folder)) is not None


def read_export_manifest(f: Path) -> dict:
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT or not isinstance(m.get("modalities"), dict):
        raise CheckpointError(f"{f}: not a mera export manifest")
    return m


def load_exported(folder: str | os.PathLike, device: str | torch.device | None = None):
    """The :class:`~mera.model.mllm.MultimodalLM` of an exported folder, and its manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mera.model.connectors import ConnectorConfig, build_connector
    from mera.model.encoders.base import load_encoder
    from mera.model.mllm import MultimodalLM

    folder = Path(folder).expanduser().resolve()
    mfile = manifest_file(folder)
    if mfile is None:
        raise CheckpointError(f"{folder}: not an exported model (no {' or '.join(MANIFESTS)} of mera export)")
    m = read_export_manifest(mfile)
    root = mfile.parent  # paths in the manifest are relative to its folder
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm_dir = (root / m.get("llm", "llm")).resolve()
    dtype = getattr(torch, m.get("dtype") or "float32")
    if m.get("layout") == "llava":
        from mera.interop.llava_export import load_llava_parts

        llm, tok, llava_branches = load_llava_parts(llm_dir, dtype)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
            llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{llm_dir}: cannot load the exported language model ({e})") from None
        llava_branches = {}
    llm.requires_grad_(False)
    model = MultimodalLM(llm.to(device), tok)
    hidden = model.hidden_size
    for mod, entry in m["modalities"].items():
        if entry.get("from") == "llava":  # the image branch is the LLaVA folder's vision tower + projector
            if mod not in llava_branches:
                raise CheckpointError(f"{mfile}: {mod!r} is to come from the LLaVA folder {llm_dir}, which has "
                                      f"only {', '.join(llava_branches) or 'no branch'}")
            enc, conn = llava_branches[mod]
            model.add_branch(mod, enc.to(device), conn.to(device))
            continue
        enc_ref = entry["encoder"]
        enc = load_encoder(enc_ref["family"], enc_ref.get("path"), **(enc_ref.get("options") or {})).to(device)
        try:
            ccfg = ConnectorConfig.model_validate(entry["connector"])
        except Exception as e:
            raise CheckpointError(f"{mfile}: bad connector config of {mod!r} ({e})") from None
        conn = build_connector(ccfg, enc.output_dim, hidden)
        state = _load_tensors(root / entry["connector_file"])
        try:
            conn.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{root / entry['connector_file']}: does not fit the {mod!r} connector ({e})") from None
        model.add_branch(mod, enc, conn.to(device))
    model.eval()
    return model, m
