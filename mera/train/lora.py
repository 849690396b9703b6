"""LoRA on every linear module of the LLM (PEFT), and folding its delta back into the weights.

Attaching uses PEFT; after a phase the adapter is *extracted* (its A, B and scaling per
module) and PEFT is unloaded without merging, so that the same :func:`fold_lora` is used
both during a run and when a stage checkpoint is loaded: the rebuilt model is bit-identical.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from pydantic import Field

from mera.config.base import StrictModel
from mera.faults import fault_point
from mera.train import branches
from mera.train.precision import add_to_weight


class LoraSettings(StrictModel):
    r: int = Field(128, ge=1)
    alpha: float = Field(128, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear module of the LLM except the output head (PEFT's meaning).
    target_modules: str | list[str] = "all-linear"


# name of a base Linear module (as in llm.named_modules()) -> {"A": [r, in], "B": [out, r], "scaling": float}
LoraDelta = dict[str, dict]


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update of one LoRA pair: ``scaling * B @ A`` (``[out, r] @ [r, in]`` -> ``[out, in]``), in fp32."""
    return (lora_B.float() @ lora_A.float()) * scaling


@torch.no_grad()
def fold_delta(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, coef: float) -> None:
    """In place: ``weight += coef * scaling * B @ A`` (computed in fp32; a non-fp32 weight keeps an fp32
    master copy, so that it is rounded once, not once per fold: :mod:`mera.train.precision`)."""
    delta = lora_delta(lora_A.to(weight.device), lora_B.to(weight.device), scaling * coef)
    add_to_weight(weight, delta)


def lora_parameters(llm) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of a (peft-wrapped) LLM, by name."""
    return {n: p for n, p in llm.named_parameters() if "lora_" in n}


def attach_lora(llm, settings: LoraSettings, seed: int):
    """Wrap ``llm`` with a fresh LoRA adapter (seeded init); only LoRA parameters are trainable."""
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    return get_peft_model(llm, cfg)


def _base_name(peft_name: str) -> str:
    # "base_model.model.model.layers.0.self_attn.q_proj" -> "model.layers.0.self_attn.q_proj"
    prefix = "base_model.model."
    return peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name


def extract_lora(peft_model, adapter: str = "default") -> LoraDelta:
    """Detached fp32 copies of every LoRA pair, keyed by the base module's name in the plain LLM."""
    out: LoraDelta = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[_base_name(name)] = {
                "A": module.lora_A[adapter].weight.detach().float().clone(),
                "B": module.lora_B[adapter].weight.detach().float().clone(),
                "scaling": float(module.scaling[adapter]),
            }
    if not out:
        raise RuntimeError("no LoRA layers found on the model")
    return out


@torch.no_grad()
def load_lora(peft_model, delta: LoraDelta, adapter: str = "default") -> None:
    """Set the attached adapter's A and B to those of ``delta`` (same modules, same rank)."""
    found = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            d = delta[_base_name(name)]
            module.lora_A[adapter].weight.copy_(d["A"])
            module.lora_B[adapter].weight.copy_(d["B"])
            found += 1
    if found != len(delta):
        raise KeyError(f"the adapter has {found} LoRA modules, the delta {len(delta)}")


def detach_lora(peft_model):
    """Remove the adapter without merging it; returns the plain base LLM."""
    return peft_model.unload()


@torch.no_grad()
def fold_lora(llm, delta: LoraDelta, coef: float) -> None:
    """``W += coef * scaling * B @ A`` for every module of ``delta`` (in place, no copy of the LLM)."""
    modules = dict(llm.named_modules())
    as_branches = branches.enabled(llm)  # model.folds: branches (exact in any dtype; mera.train.branches)
    for k, (name, d) in enumerate(delta.items()):
        if name not in modules:
            raise KeyError(f"LoRA delta names a module the LLM does not have: {name}")
        if as_branches:
            branches.add(modules[name], d["A"], d["B"], d["scaling"] * coef)
        else:
            fold_delta(modules[name].weight, d["A"], d["B"], d["scaling"], coef)
        if k == len(delta) // 2:
            fault_point("merge")


def lora_to_tensors(delta: LoraDelta) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Flatten for safetensors: ``{name.lora_A: A, name.lora_B: B}`` and ``{name: scaling}``."""
    tensors, scalings = {}, {}
    for name, d in delta.items():
        tensors[f"{name}.lora_A"] = d["A"].contiguous()
        tensors[f"{name}.lora_B"] = d["B"].contiguous()
        scalings[name] = d["scaling"]
    return tensors, scalings


def lora_from_tensors(tensors: dict[str, torch.Tensor], scalings: dict[str, float]) -> LoraDelta:
    out: LoraDelta = {}
    for name, s in scalings.items():
        out[name] = {"A": tensors[f"{name}.lora_A"], "B": tensors[f"{name}.lora_B"], "scaling": float(s)}
    return out
