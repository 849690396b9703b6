"""Helpers shared by :mod:`mera.interop.llava` and :mod:`mera.interop.export`: the output folder
check and safetensors reading / writing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mera.errors import CheckpointError, MeraError
from mera.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _prepare_out(out: Path, force: bool, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise MeraError(f"{out}: already exists and is not empty; choose another --out or pass --force "
                            f"to replace it with the {what}")


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
