"""Helpers shared by :mod:`mera.interop.llava` and :mod:`mera.interop.export`: the output folder
check and safetensors reading / writing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mera.errors import CheckpointError, ConfigError, MeraError
from mera.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import torch


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
