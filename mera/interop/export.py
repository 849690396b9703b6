"""Moving a model out of mera: ``mera export``, and loading what it wrote.

``export_stage(STAGE_DIR, DIR)`` writes a finished stage as a self-contained model::

    DIR/llm/                             the LLM with every delta of the stage chain folded in
    DIR/connectors/<modality>.safetensors
    DIR/manifest.json                    per modality: encoder (family, absolute path, options),
                                         connector config and file; the source stage

and ``load_exported(DIR)`` rebuilds the :class:`~mera.model.mllm.MultimodalLM` from it (what
``mera generate DIR`` uses). Everything is safetensors; nothing is loaded with pickle or
``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mera.errors import CheckpointError
from mera.interop._common import _load_tensors, _prepare_out, _save_tensors
from mera.io import write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

EXPORT_FORMAT = "mera-export-v1"


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
    from mera.continual.run_config import RunConfig

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
                 assets=None) -> dict:
    """Write the model of a finished stage as a folder ``mera generate`` (and plain HF, for the LLM) can
    load; returns the manifest. ``assets``: the stage's run's already loaded assets (else they are loaded)."""
    from mera.continual import checkpoint as ckpt
    from mera.io import atomic_dir

    stage = Path(stage_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    manifest = check_stage(stage)
    if manifest.get("llm_modules"):
        kind = manifest["llm_modules"].get("kind", "?")
        raise CheckpointError(f"{stage}: a {kind} stage: its LLM holds extra modules (PathWeave's adapters) that "
                              "cannot be folded into a plain HF model, so it cannot be exported; "
                              "`mera generate` works on the stage folder itself")
    _prepare_out(out, force, "exported model", stage, "manifest.json", EXPORT_FORMAT)
    run_dir = find_run_dir(stage)
    from mera.continual.stages import load_stage

    assets = assets or assets_for(run_dir, config_dir)
    model = load_stage(assets, stage)
    cfg = assets.cfg
    modalities = {}
    with atomic_dir(out) as tmp:
        model.llm.save_pretrained(str(tmp / "llm"))
        assets.tokenizer.save_pretrained(str(tmp / "llm"))
        for m in model.modalities:
            b = cfg.model.branches.get(m)
            if b is None:
                raise CheckpointError(f"{stage}: has a {m!r} connector but the run's config has no such branch")
            if not b.encoder.path:
                raise CheckpointError(f"{stage}: the {m!r} encoder ({b.encoder.family}) has no path in the run's "
                                      "config, so the export cannot refer to it")
            conn_cfg = b.connector.model_dump(mode="json")
            if conn_cfg.get("init_from"):  # the BERT folder fixes the Q-Former's sizes
                conn_cfg["init_from"] = os.path.abspath(conn_cfg["init_from"])
            file = f"connectors/{m}.safetensors"
            _save_tensors(tmp / file, model.branch(m).connector.state_dict())
            modalities[m] = {
                "encoder": {"family": b.encoder.family, "path": str(Path(assets.resolve(b.encoder.path)).resolve()),
                            "options": dict(b.encoder.options)},
                "connector": conn_cfg,
                "connector_file": file,
            }
        info = {
            "format": EXPORT_FORMAT,
            "source": {"run": str(run_dir), "stage": str(stage), "kind": manifest.get("kind"),
                       "stage_index": manifest.get("stage"), "modality": manifest.get("modality"),
                       "chain": [str(p) for p in ckpt.chain(stage)]},
            "llm": "llm",
            "dtype": cfg.model.dtype,
            "modalities": modalities,
            "generation": {"max_new_tokens": cfg.eval.max_new_tokens},
        }
        write_json(tmp / "manifest.json", info)
    return info


def is_export(folder: str | os.PathLike) -> bool:
    f = Path(folder) / "manifest.json"
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_export_manifest(folder: Path) -> dict:
    f = folder / "manifest.json"
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
    m = read_export_manifest(folder)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm_dir = folder / m.get("llm", "llm")
    dtype = getattr(torch, m.get("dtype") or "float32")
    try:
        tok = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
        llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{llm_dir}: cannot load the exported language model ({e})") from None
    llm.requires_grad_(False)
    model = MultimodalLM(llm.to(device), tok)
    hidden = model.hidden_size
    for mod, entry in m["modalities"].items():
        enc_ref = entry["encoder"]
        enc = load_encoder(enc_ref["family"], enc_ref.get("path"), **(enc_ref.get("options") or {})).to(device)
        try:
            ccfg = ConnectorConfig.model_validate(entry["connector"])
        except Exception as e:
            raise CheckpointError(f"{folder / 'manifest.json'}: bad connector config of {mod!r} ({e})") from None
        conn = build_connector(ccfg, enc.output_dim, hidden)
        state = _load_tensors(folder / entry["connector_file"])
        try:
            conn.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / entry['connector_file']}: does not fit the {mod!r} connector ({e})") from None
        model.add_branch(mod, enc, conn.to(device))
    model.eval()
    return model, m
