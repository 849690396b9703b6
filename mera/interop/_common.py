"""Helpers shared by :mod:`mera.interop.llava`, :mod:`mera.interop.export` and
:mod:`mera.interop.llava_export` (a leaf: it imports none of them): the output folder check,
safetensors reading / writing, the run a stage belongs to and its assets, and the parts of an
export manifest that both export layouts write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mera.errors import CheckpointError, ConfigError, MeraError
from mera.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import torch

EXPORT_FORMAT = "mera-export-v1"
# where the manifest of each export layout lives (the llava layout keeps the top folder a plain HF folder)
MANIFESTS = ("manifest.json", "mera_branches/manifest.json")


def _prepare_out(out: Path, force: bool, what: str, source: Path, manifest: str, fmt: str) -> None:
    """Check ``--out`` before anything is written: never the source itself, inside it, or a folder
    that contains it (replacing it would delete the source); a non-empty folder only with
    ``--force``, and then only one that an earlier run of the same command wrote (its ``manifest``
    file says ``format: fmt``): ``--force`` never deletes a folder of anything else."""
    import json

    if out == source or source in out.parents:
        raise ConfigError(f"{out}: the output folder may not be inside {source} (the source)")
    if out in source.parents:
        raise ConfigError(f"{out}: the output folder contains the source {source}; replacing it would delete the "
                          "source: choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise MeraError(f"{out}: already exists and is not empty; choose another --out or pass --force "
                            f"to replace it with the {what}")
        try:
            ours = json.loads((out / manifest).read_text(encoding="utf-8")).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise MeraError(f"{out}: --force replaces only a folder written by the same command (holding its "
                            f"{manifest} of format {fmt}); this one is not: remove it yourself or choose another --out")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
