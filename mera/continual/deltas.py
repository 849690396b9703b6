"""``Delta``: a change of the LLM's linear weights, LoRA-factored or dense; saved, loaded, folded.

- ``lora``: per module ``{"A": [r, in], "B": [out, r], "scaling": s}``; the update is
  ``s * B @ A``. What a stage's LoRA adapter learned; O(r * (in + out)) per module.
- ``dense``: per module the update ``dW`` ``[out, in]`` itself (fp32), for merge rules whose
  result is not low-rank (TIES, DARE, ...). O(in * out) per module.

Folding ``W += coef * update`` uses the same function during a run and when a stage is
loaded, so a rebuilt model is bit-identical to the one the run evaluated. A factored delta is
folded one module at a time (``mera.train.lora.fold_lora``): never a second copy of the LLM on
its device. A bfloat16 / float16 weight is rounded once, not once per fold: it keeps an fp32
master copy on the CPU (``mera.train.precision``, docs/merging_precision.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mera.errors import CheckpointError
from mera.faults import fault_point
from mera.train.lora import LoraDelta, fold_lora, lora_delta, lora_from_tensors, lora_to_tensors
from mera.train.precision import add_to_weight

KINDS = ("lora", "dense")


class Delta:
    """A delta of the LLM's linear weights (see the module docstring)."""

    def __init__(self, kind: str, modules: dict):
        if kind not in KINDS:
            raise ValueError(f"unknown delta kind {kind!r}; kinds: {', '.join(KINDS)}")
        self.kind = kind
        self.modules = modules  # lora: name -> {"A", "B", "scaling"}; dense: name -> tensor

    @classmethod
    def lora(cls, pairs: LoraDelta) -> "Delta":
        return cls("lora", pairs)

    @classmethod
    def dense(cls, weights: dict[str, torch.Tensor]) -> "Delta":
        return cls("dense", {k: v.detach().float() for k, v in weights.items()})

    def __repr__(self) -> str:
        return f"Delta({self.kind}, {len(self.modules)} modules, {self.numel()} values)"

    def names(self) -> list[str]:
        return list(self.modules)

    def numel(self) -> int:
        if self.kind == "lora":
            return sum(d["A"].numel() + d["B"].numel() for d in self.modules.values())
        return sum(t.numel() for t in self.modules.values())

    def update(self, name: str) -> torch.Tensor:
        """The dense fp32 update of one module."""
        d = self.modules[name]
        return lora_delta(d["A"], d["B"], d["scaling"]) if self.kind == "lora" else d.float()

    def to_dense(self) -> "Delta":
        return self if self.kind == "dense" else Delta.dense({n: self.update(n) for n in self.modules})

    # ------------------------------------------------------------------ folding
    @torch.no_grad()
    def fold(self, llm, coef: float) -> None:
        """``W += coef * update`` for every module, in place."""
        if self.kind == "lora":
            fold_lora(llm, self.modules, coef)
            return
        modules = dict(llm.named_modules())
        for k, (name, dw) in enumerate(self.modules.items()):
            if name not in modules:
                raise KeyError(f"delta names a module the LLM does not have: {name}")
            w = modules[name].weight
            add_to_weight(w, coef * dw.to(w.device))
            if k == len(self.modules) // 2:
                fault_point("merge")

    def check(self, llm, path: Path) -> None:
        """CheckpointError unless every module of the delta fits a linear module of ``llm``
        (a checkpoint of another backbone names other modules or has other shapes)."""
        modules = dict(llm.named_modules())
        for name, d in self.modules.items():
            weight = getattr(modules.get(name), "weight", None)
            if weight is None or weight.dim() != 2:
                raise CheckpointError(f"{path}: delta for module {name!r}, which the LLM does not have "
                                      "(a checkpoint of another LLM?)")
            out_f, in_f = weight.shape
            if self.kind == "dense":
                if tuple(d.shape) != (out_f, in_f):
                    raise CheckpointError(f"{path}: dense delta of {name!r} has shape {tuple(d.shape)}; the LLM's "
                                          f"weight is {(out_f, in_f)} (a checkpoint of another LLM?)")
                continue
            a, b = d["A"], d["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{path}: LoRA of {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; the "
                                      f"LLM's weight is {(out_f, in_f)}, so A (r, {in_f}) and B ({out_f}, r) are "
                                      "expected (a checkpoint of another LLM?)")

    # ------------------------------------------------------------------ files
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors for safetensors, what the manifest entry records besides the file)."""
        if self.kind == "lora":
            tensors, scalings = lora_to_tensors(self.modules)
            return tensors, {"kind": "lora", "scalings": scalings}
        return {f"{n}.delta": t.contiguous() for n, t in self.modules.items()}, {"kind": "dense"}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], entry: dict, path: Path) -> "Delta":
        kind = entry.get("kind", "lora")  # manifest v1 entries are LoRA pairs
        try:
            if kind == "lora":
                return cls.lora(lora_from_tensors(tensors, entry["scalings"]))
            if kind == "dense":
                return cls("dense", {k[: -len(".delta")]: v for k, v in tensors.items() if k.endswith(".delta")})
        except KeyError as k:
            held = ", ".join(sorted(tensors)[:3]) + (", ..." if len(tensors) > 3 else "")
            raise CheckpointError(f"{path}: not the delta file its manifest describes: missing tensor {k} "
                                  f"(the file holds {held or 'nothing'})") from None
        raise CheckpointError(f"{path}: unknown delta kind {kind!r} in the manifest (kinds: {', '.join(KINDS)})")
