"""Merging as small pure functions over tensors.

The modality-agnostic part of the model (the LLM) is merged; modality-specific parts
(connectors) are kept side by side. MERA's cumulative moving average (CMA) of the LLM is

    agn_i = (i-1)/i * agn_{i-1} + 1/i * agn_{i,vanilla},  with agn_{i,vanilla} = agn_{i-1} + dW_i

which is exactly ``agn_i = agn_{i-1} + dW_i / i``: a LoRA delta folded with coefficient ``1/i``.
``fold_delta`` does it in place at the cost of one rank-r product per linear layer;
``dense_average`` is the reference (two full copies) used by tests and the benchmark.
"""

from __future__ import annotations

from typing import Mapping

import torch


def cma_coefficient(stage: int) -> float:
    """Weight of the stage-``stage`` delta in the cumulative moving average: ``1 / stage`` (stage >= 1)."""
    if stage < 1:
        raise ValueError(f"stage must be >= 1, got {stage}")
    return 1.0 / stage


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update of one LoRA pair: ``scaling * B @ A`` (``[out, r] @ [r, in]`` -> ``[out, in]``), in fp32."""
    return (lora_B.float() @ lora_A.float()) * scaling


@torch.no_grad()
def fold_delta(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, coef: float) -> None:
    """In place: ``weight += coef * scaling * B @ A`` (computed in fp32, cast to the weight's dtype)."""
    delta = lora_delta(lora_A.to(weight.device), lora_B.to(weight.device), scaling * coef)
    weight.copy_((weight.float() + delta).to(weight.dtype))


@torch.no_grad()
def dense_average(state_dicts: list[Mapping[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of full state dicts: ``sum_k w_k * sd_k[name]`` for every floating tensor.

    Non-floating tensors are taken from the first state dict. Reference for the factored merge.
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
