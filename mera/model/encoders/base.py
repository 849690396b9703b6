"""The encoder contract and a registry of encoder families.

Any ``torch.nn.Module`` with the attributes and methods of :class:`Encoder` is an
encoder: the toy world's tiny networks and CLIP / BEATs / Point-BERT take the same path.
Encoders are always frozen inside a :class:`~mera.model.mllm.MultimodalLM`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from mera.errors import ConfigError


class Encoder(nn.Module):
    """Base class (documentation of the contract; subclassing it is optional).

    Attributes:
        output_dim: width D of the feature tokens.
        num_tokens: number T of feature tokens per sample.
    """

    output_dim: int
    num_tokens: int

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """Turn one decoded media array (see ``mera.data.media``) into a fixed-shape float tensor."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B, T, D]
        raise NotImplementedError


# family name -> loader(path: str, **options) -> Encoder
ENCODER_FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(family: str):
    def deco(fn):
        ENCODER_FAMILIES[family] = fn
        return fn

    return deco


def load_encoder(family: str, path: str | None = None, **options) -> nn.Module:
    """Build the encoder of ``family`` from ``path`` (a folder with its weights), frozen and in eval mode."""
    # import the built-in families so that they register themselves
    from mera.model.encoders import _builtin  # noqa: F401

    if family not in ENCODER_FAMILIES:
        raise ConfigError(f"unknown encoder family {family!r}; known: {sorted(ENCODER_FAMILIES)}")
    enc = ENCODER_FAMILIES[family](path, **options)
    enc.requires_grad_(False)
    enc.eval()
    return enc
