"""Folds kept as frozen fp32 low-rank branches (``model.folds: branches``): exact merges in bf16.

Folding into bfloat16 weights, even rounded once (:mod:`mera.train.precision`), cannot come
closer to the fp32 merge than bfloat16 can represent: with weights of rms 0.02 and deltas of rms
1e-3, 2.7% of the applied delta after 8 MERA stages (docs/merging_precision.md). With
``model.folds: branches`` a LoRA-factored fold does not touch the weight at all: the module keeps
``(A, B, c)`` in fp32 and its output gets ``c * (x @ A^T) @ B^T``, computed in fp32, added by a
forward hook. The merged model is then ``W0 + sum_k c_k B_k A_k`` in fp32 arithmetic (exact to
fp32 rounding), whatever the weights' dtype, until :func:`bake` folds the branches into the
weights once (export).

Costs (per process, on the model's device): one fp32 rank-r pair per folded module and stage;
for Llama-3-8B with LoRA r 128 on every linear layer, 1.34 GB per stage (10.7 GB after 8), and
the branches' matrix products at every forward (about r * (in + out) multiply-adds per token and
module per stage). Folds of the same pair (EWC takes its delta out and puts it back) add up to
one branch; a branch whose coefficient returns to 0 is removed.

A dense delta (no factors) is folded into the weight as usual (:mod:`mera.train.precision`).
Hand-written: peft's LoRA layers train adapters, they do not hold frozen folded branches with
coefficients that stages change.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

_MARK = "_mera_fold_branches"
_BRANCHES: "WeakKeyDictionary[torch.nn.Module, list]" = WeakKeyDictionary()  # module -> [[A, B, c], ...]
_HOOKS: "WeakKeyDictionary[torch.nn.Module, object]" = WeakKeyDictionary()


def enable(llm: torch.nn.Module, on: bool = True) -> None:
    """Fold LoRA deltas into ``llm`` as branches (``model.folds: branches``)."""
    setattr(llm, _MARK, bool(on))


def enabled(llm: torch.nn.Module) -> bool:
    return bool(getattr(llm, _MARK, False))


def _hook(module, inputs, output):
    x = inputs[0].float()
    extra = None
    for a, b, c in _BRANCHES.get(module, ()):
        y = (x @ a.t()) @ b.t() * c
        extra = y if extra is None else extra + y
    return output if extra is None else (output.float() + extra).to(output.dtype)


@torch.no_grad()
def add(module: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, coef: float) -> None:
    """Add ``coef * B @ A`` to ``module`` as a branch (fp32, on the module's device)."""
    branches = _BRANCHES.setdefault(module, [])
    for k, br in enumerate(branches):
        if torch.equal(br[0], lora_A.to(br[0].device, torch.float32)) and torch.equal(
                br[1], lora_B.to(br[1].device, torch.float32)):
            br[2] += coef
            if br[2] == 0.0:
                del branches[k]
            break
    else:
        dev = module.weight.device
        branches.append([lora_A.detach().to(dev, torch.float32).clone(),
                         lora_B.detach().to(dev, torch.float32).clone(), float(coef)])
    if module not in _HOOKS:
        _HOOKS[module] = module.register_forward_hook(_hook)


def branches(module: torch.nn.Module) -> list:
    """The module's branches ``[A, B, coefficient]`` (empty when none)."""
    return list(_BRANCHES.get(module, ()))


def merged_update(module: torch.nn.Module) -> torch.Tensor | None:
    """``sum_k c_k B_k @ A_k`` in fp32 (the update the branches apply), or None."""
    total = None
    for a, b, c in _BRANCHES.get(module, ()):
        u = c * (b @ a)
        total = u if total is None else total + u
    return total


@torch.no_grad()
def bake(llm: torch.nn.Module) -> int:
    """Fold every branch of ``llm`` into its weight, rounded once (``dtype(W + sum)``), and drop the
    branches and hooks: a plain model (export). Returns the number of modules baked."""
    n = 0
    for module in list(llm.modules()):
        update = merged_update(module)
        hook = _HOOKS.pop(module, None)
        if hook is not None:
            hook.remove()
        _BRANCHES.pop(module, None)
        if update is not None:
            w = module.weight
            w.copy_((w.float() + update.to(w.device)).to(w.dtype))
            n += 1
    enable(llm, False)
    return n
