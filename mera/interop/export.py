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
from mera.interop._common import (
    EXPORT_FORMAT,
    MANIFESTS,
    _load_tensors,
    _prepare_out,
    assets_for,
    branch_entry,
    existing_manifest,
    find_run_dir,
    guess_config_dir,
    stage_source,
)
from mera.interop.llava_export import export_llava, load_llava_parts
from mera.io import atomic_dir, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

# the public names (the run and manifest helpers live in mera.interop._common, shared with llava_export)
__all__ = ["EXPORT_FORMAT", "FORMATS", "MANIFESTS", "assets_for", "branch_entry", "check_stage", "existing_manifest",
           "export_stage", "find_run_dir", "guess_config_dir", "is_export", "load_exported", "manifest_file",
           "read_export_manifest", "stage_source"]

FORMATS = ("mera", "llava")  # --format: mera's own layout, or a transformers LlavaForConditionalGeneration folder


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
    layout = manifest.get("llm_modules")
    if layout:  # a strategy's own LLM modules: its export_check says whether they can leave the stage
        from mera.continual.strategies import layout_owner

        owner = layout_owner(layout, str(stage))
        why = owner.export_check(layout)
        if why:
            raise CheckpointError(f"{stage}: a {owner.name} stage: {why}, so it cannot be exported; "
                                  "`mera generate` works on the stage folder itself")
    run_dir = find_run_dir(stage)
    if fmt == "llava":
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
