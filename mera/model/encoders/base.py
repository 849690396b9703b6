"""The encoder contract, and loading an encoder of a registered family.

Any ``torch.nn.Module`` with the attributes and methods of :class:`Encoder` is an
encoder: the toy world's tiny networks and CLIP / BEATs / Point-BERT take the same path.
Encoders are always frozen inside a :class:`~mera.model.mllm.MultimodalLM`.

Each family registers its loader next to its code, with a pydantic model of its options::

    class MyParams(StrictModel):
        layer: int = -2

    @register("encoder", "my_family", MyParams)
    def load_my_family(path: str | None, layer: int = -2) -> nn.Module: ...

:func:`load_encoder` validates the options against the model, then calls ``loader(path, **options)``
with the options given (the loader's defaults, equal to the model's, fill in the rest).
"""

from __future__ import annotations

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


def _entry(family: str):
    """The registry entry of ``family``; ConfigError naming the known families otherwise."""
    import difflib

    from mera.config.registry import UnknownPlugin, lookup, names

    try:
        return lookup("encoder", family)
    except UnknownPlugin:  # a plug-in that fails to load says so itself
        known = names("encoder")
        close = difflib.get_close_matches(str(family), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown encoder family {family!r}; {hint}known: {', '.join(known)}") from None


def _options(entry, options: dict) -> dict:
    """``options`` validated against the family's parameter model: the options given (as the model
    read them; defaults left to the loader). ValueError naming the family and the option."""
    from pydantic import ValidationError

    from mera.config.loading import format_validation_error

    options = dict(options or {})
    if entry.params is None:
        if options:
            raise ValueError(f"encoder {entry.name!r} takes no options, got {', '.join(sorted(options))}")
        return {}
    try:
        params = entry.params.model_validate(options)
    except ValidationError as e:
        raise ValueError(format_validation_error(f"encoder {entry.name!r} options", e, entry.params)) from None
    return params.model_dump(exclude_unset=True)


def check_encoder_options(family: str, options: dict) -> None:
    """Raise ValueError (a readable message naming the family and the option) unless ``family`` is a
    known encoder family and ``options`` are valid options of it. Loads nothing."""
    try:
        entry = _entry(family)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    _options(entry, options)


def load_encoder(family: str, path: str | None = None, **options) -> nn.Module:
    """Build the encoder of ``family`` from ``path`` (a folder with its weights), frozen and in eval mode.

    A family is a loader ``loader(path, **options)`` registered with
    ``register("encoder", family, Params)`` (:mod:`mera.config.registry`), ``Params`` being the
    pydantic model of its options. ConfigError on an unknown family or bad options.
    """
    entry = _entry(family)
    try:
        opts = _options(entry, options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    enc = entry.obj(path, **opts)
    enc.requires_grad_(False)
    enc.eval()
    return enc
