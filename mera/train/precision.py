"""Folding an update into a weight exactly to one rounding, whatever the weight's dtype.

``W += coef * dW`` on a bfloat16 (or float16) weight rounds the sum to the weight's 8 (11)
significant bits at every fold: a small update is partly rounded away, and the errors of the
folds add up (docs/merging_precision.md has the numbers). A non-float32 weight that is folded
therefore gets an fp32 *master copy* on the CPU: every fold adds its update to the master in
fp32, and the weight becomes the master cast to its dtype, once per fold. After any number of
folds the weight is ``dtype(W0.float() + update_1 + update_2 + ...)`` (the sum taken in fp32,
in order): the nearest representable value to the fp32 result, so no other weight of that
dtype is closer to it.

- float32 weights take the plain path (``W.float() + update``, cast), as before: the toy
  world's numbers are byte-identical.
- The first fold of a weight computes the same numbers as the plain path; only later folds
  differ (they read the master instead of the rounded weight).
- Replaying the same folds in the same order on the same base weights (what
  :func:`mera.continual.stages.load_stage` does) gives the same bits: the master is a pure
  function of the base weight and the folds.
- A weight changed outside the folds (its values no longer the cast of its master) is taken as
  it is: its master starts again from it.

Memory: 4 bytes per folded weight element, on the CPU (``master_bytes``); only the folded
modules (the LoRA targets) get one. For Llama-3-8B with LoRA on every linear layer of its 32
blocks: 6,979,321,856 elements, 27.9 GB of CPU memory per process. Hand-written (no library
keeps a master copy outside an optimizer); the masters are kept in torch's
``WeakTensorKeyDictionary`` keyed by the weight, so they go when the model goes and never enter a
state dict.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_MASTERS = WeakTensorKeyDictionary()  # weight -> its fp32 master copy (CPU)


def has_master(weight: torch.Tensor) -> bool:
    return weight in _MASTERS


def master_of(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 master copy of ``weight`` (on the CPU), or None (float32, or never folded)."""
    return _MASTERS.get(weight)


def master_bytes(module: torch.nn.Module) -> int:
    """Bytes of CPU memory held by the master copies of ``module``'s parameters."""
    return sum(m.numel() * m.element_size() for p in module.parameters() if (m := _MASTERS.get(p)) is not None)


def release_masters(module: torch.nn.Module) -> int:
    """Drop the master copies of ``module``'s parameters (a model that is only evaluated from now
    on needs none; a later fold starts a new master from the rounded weight). Returns the bytes freed."""
    freed = 0
    for p in module.parameters():
        m = _MASTERS.pop(p, None)
        if m is not None:
            freed += m.numel() * m.element_size()
    return freed


@torch.no_grad()
def add_to_weight(weight: torch.Tensor, update: torch.Tensor) -> None:
    """In place: ``weight += update`` (``update``: fp32, on the weight's device), exact to one
    rounding for a non-float32 weight (see the module docstring)."""
    if weight.dtype == torch.float32:
        weight.copy_((weight.float() + update).to(weight.dtype))
        return
    acc = None
    master = _MASTERS.get(weight)
    if master is not None:
        acc = master.to(weight.device)
        if not torch.equal(acc.to(weight.dtype), weight):  # changed outside the folds: start again from it
            acc = None
    if acc is None:
        acc = weight.float()
    acc = acc + update  # out of place: ``acc`` may be the master itself (a weight on the CPU)
    weight.copy_(acc.to(weight.dtype))
    _MASTERS[weight] = acc.to("cpu")
