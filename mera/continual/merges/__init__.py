"""Merge rules: what to fold into the LLM once a stage has trained its delta.

A merge rule is one file in this package that registers itself (kind ``merge``) with the
pydantic model of its parameters, and implements::

    merge(new: Delta, history: Sequence[Delta], stage: int) -> list[tuple[Delta, float]]

``new`` is the delta the stage trained (LoRA-factored by default), ``history`` the deltas the
earlier stages of the chain trained (root first: the first modality's expert, then stage 2,
...; loaded lazily), ``stage`` the 1-based stage index. The result is folded in order,
``W += coef * delta``, into the LLM that the stage started from. Returning ``[(new, c)]``
keeps the factored path (O(LoRA) memory); a rule whose result is not low-rank returns
``Delta.dense(...)`` entries. A method names its merge rule like any other plug-in
(``methods: [{name: MERA, strategies: [cma, realign]}]``); without one, the delta is folded
whole (``finetune``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mera.continual.deltas import Delta


class MergeRule:
    """Base of the merge rules (``params``: the validated parameters, or None)."""

    def __init__(self, params=None):
        self.params = params

    def merge(self, new: Delta, history: Sequence[Delta], stage: int) -> list[tuple[Delta, float]]:
        raise NotImplementedError


@torch.no_grad()
def dense_average(state_dicts: list, weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of full state dicts: ``sum_k w_k * sd_k[name]`` for every floating tensor.

    Non-floating tensors are taken from the first state dict. The reference that tests and the
    merge benchmark hold the factored merges against (two whole copies of the model).
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError("need one weight per state dict")
    out = {}
    for name, t0 in state_dicts[0].items():
        if not torch.is_floating_point(t0):
            out[name] = t0.clone()
            continue
        acc = torch.zeros_like(t0, dtype=torch.float32)
        for sd, w in zip(state_dicts, weights):
            acc += w * sd[name].float()
        out[name] = acc.to(t0.dtype)
    return out
