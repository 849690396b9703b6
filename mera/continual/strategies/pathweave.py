"""PathWeave (adapter-in-adapter), re-implemented from its paper's description, inside the LLM.

Every linear module of the LLM that LoRA targets is wrapped by a :class:`PathWeaveLinear`:

    y = W x + sum_j g_j(x) * s * up_j( h_j + sum_k in_{j,k}(h_j) ),   h_j = down_j(x)

- ``down_j`` / ``up_j``: the low-rank adapter of the j-th modality (rank r, scaling s = alpha / r,
  the LoRA settings of ``train.lora``); the first one is the first modality's expert adapter
  (stage 1 of every method is that expert, so its LoRA is taken back out of the weights and
  becomes adapter 0, unchanged);
- ``in_{j,k}``: the small "in-adapter" (``r -> in_rank -> r``, its up-projection
  zero-initialised, so it starts as the identity) inserted into the frozen adapter j when
  modality k arrives: the cross-modal path from an old modality's adapter to the new one;
- ``g(x) = softmax(G x)``: a per-token gate over the adapters, ``G`` zero-initialised (a
  uniform mix); a new adapter adds a zero row to ``G``, the old rows are kept.

At stage k only the new adapter, the new in-adapters and the gates are trained; every
older adapter and in-adapter is frozen. Nothing is removed at test time: the model keeps
every adapter, so its inference cost grows with the number of modalities (see the
efficiency table of the report). The LLM's own weights are never changed after the
expert's adapter is taken out of them.

Dropout inside the adapters is not used (the LoRA dropout setting is ignored here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import OwnModules, StageContext, Strategy
from mera.errors import CheckpointError

PREFIX = "pathweave."


class PathWeaveLinear(nn.Module):
    """A frozen base ``nn.Linear`` plus per-modality adapters, in-adapters and a softmax gate."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, in_rank: int):
        super().__init__()
        self.base = base
        self.rank, self.scaling, self.in_rank = rank, scaling, in_rank
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        self.inner = nn.ModuleDict()  # "j_k" -> Sequential(Linear(r, in_rank), Linear(in_rank, r))
        self._inner_of: list[list[str]] = []  # adapter j -> keys of its in-adapters
        self.gate: nn.Linear | None = None  # Linear(in, num_adapters), made by add_adapter

    @property
    def num_adapters(self) -> int:
        return len(self.down)

    def _dev(self):
        return dict(device=self.base.weight.device, dtype=self.base.weight.dtype)

    def add_adapter(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> int:
        """Append adapter j (LoRA-style init: down Kaiming-uniform, up zero, unless A/B given); grow the gate."""
        down = nn.Linear(self.base.in_features, self.rank, bias=False, **self._dev())
        up = nn.Linear(self.rank, self.base.out_features, bias=False, **self._dev())
        with torch.no_grad():
            if A is None:
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(up.weight)
            else:
                down.weight.copy_(A)
                up.weight.copy_(B)
        self.down.append(down)
        self.up.append(up)
        self._inner_of.append([])
        gate = nn.Linear(self.base.in_features, self.num_adapters, bias=False, **self._dev())
        with torch.no_grad():
            gate.weight.zero_()
            if self.gate is not None:
                gate.weight[: self.gate.weight.shape[0]] = self.gate.weight
        self.gate = gate
        return self.num_adapters - 1

    def add_inner(self, j: int, k: int) -> nn.Module:
        """Insert the in-adapter from modality k into adapter j (identity at init)."""
        mod = nn.Sequential(nn.Linear(self.rank, self.in_rank, bias=False, **self._dev()),
                            nn.Linear(self.in_rank, self.rank, bias=False, **self._dev()))
        with torch.no_grad():
            nn.init.kaiming_uniform_(mod[0].weight, a=math.sqrt(5))
            nn.init.zeros_(mod[1].weight)
        self.inner[f"{j}_{k}"] = mod
        self._inner_of[j].append(f"{j}_{k}")
        return mod

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token mixing weights [..., num_adapters], summing to 1."""
        return F.softmax(self.gate(x).float(), dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        n = self.num_adapters
        if n == 0:
            return y
        g = self.gates(x)
        for j in range(n):
            h = self.down[j](x)
            if self._inner_of[j]:
                h = h + sum(self.inner[key](h) for key in self._inner_of[j])
            y = y + g[..., j:j + 1] * (self.scaling * self.up[j](h))
        return y


def wrapped_modules(llm: nn.Module) -> dict[str, PathWeaveLinear]:
    return {n: m for n, m in llm.named_modules() if isinstance(m, PathWeaveLinear)}


def _install(llm: nn.Module, names: list[str], rank: int, scaling: float, in_rank: int) -> dict[str, PathWeaveLinear]:
    """Replace each named ``nn.Linear`` of ``llm`` by a PathWeaveLinear around it."""
    modules = dict(llm.named_modules())
    out = {}
    for name in names:
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"PathWeave: the LLM has no linear module {name!r}")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else llm
        wrapper = PathWeaveLinear(base, rank, scaling, in_rank)
        setattr(parent, attr, wrapper)
        out[name] = wrapper
    return out


def export_state(llm: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(layout description for the manifest, tensors for strategy.safetensors)."""
    mods = wrapped_modules(llm)
    any_mod = next(iter(mods.values()))
    layout = {"kind": "pathweave", "rank": any_mod.rank, "scaling": any_mod.scaling, "in_rank": any_mod.in_rank,
              "num_adapters": any_mod.num_adapters, "inner": sorted(any_mod.inner.keys()),
              "modules": sorted(mods)}
    tensors = {}
    for name, m in mods.items():
        for pname, p in m.named_parameters():
            if not pname.startswith("base."):
                tensors[f"{PREFIX}{name}.{pname}"] = p.detach().float().clone()
    return layout, tensors


@torch.no_grad()
def install_from_state(llm: nn.Module, layout: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Rebuild the PathWeave modules of a saved stage on a (base) LLM and load their weights."""
    mods = _install(llm, layout["modules"], layout["rank"], layout["scaling"], layout["in_rank"])
    for m in mods.values():
        for _ in range(layout["num_adapters"]):
            m.add_adapter()
        for key in layout["inner"]:
            j, k = map(int, key.split("_"))
            m.add_inner(j, k)
    for name, m in mods.items():
        for pname, p in m.named_parameters():
            if pname.startswith("base."):
                continue
            key = f"{PREFIX}{name}.{pname}"
            if key not in tensors:
                raise CheckpointError(f"strategy.safetensors: PathWeave tensor {key} is missing")
            if tensors[key].shape != p.shape:
                raise CheckpointError(f"strategy.safetensors: {key} has shape {tuple(tensors[key].shape)}, "
                                      f"expected {tuple(p.shape)}")
            p.copy_(tensors[key])


class PathWeaveParams(StrictModel):
    in_rank: int = Field(8, ge=1, description="rank of the in-adapters (the adapters use train.lora's rank)")


@register("strategy", "pathweave", PathWeaveParams, llm="own", whole_delta=True)
class PathWeave(Strategy):
    """PathWeave at stage k: a new adapter for the new modality, in-adapters from it into every
    old (frozen) adapter, and the per-token gates; trained in step B instead of a LoRA."""

    name = "pathweave"

    def adapter(self, ctx: StageContext) -> OwnModules:
        llm = ctx.model.llm
        mods = wrapped_modules(llm)
        if not mods:  # the previous stage is the expert: its adapter becomes adapter 0
            prev = ctx.history.last_trained()
            if prev is None or prev[0].kind != "lora":
                raise CheckpointError(f"{ctx.history.folder}: PathWeave needs the expert's LoRA adapter; "
                                      "none in the chain")
            delta, coef = prev
            delta.fold(llm, -coef)  # take the expert's delta out of the weights ...
            ctx.folds.append((delta, -coef))  # ... and record it, so the checkpoint chain stays exact
            pairs = delta.modules
            scalings = {d["scaling"] for d in pairs.values()}
            if len(scalings) != 1:
                raise CheckpointError("PathWeave: the expert's adapter has several LoRA scalings")
            rank = next(iter(pairs.values()))["A"].shape[0]
            mods = _install(llm, sorted(pairs), rank, scalings.pop() * coef, self.params.in_rank)
            for name, m in mods.items():
                m.add_adapter(pairs[name]["A"], pairs[name]["B"])
        for p in llm.parameters():
            p.requires_grad_(False)
        torch.manual_seed(ctx.seed)
        params = []
        for m in mods.values():
            k = m.add_adapter()
            params += [m.down[k].weight, m.up[k].weight, m.gate.weight]
            for j in range(k):
                params += list(m.add_inner(j, k).parameters())
        ctx.log["pathweave"] = {"adapters": next(iter(mods.values())).num_adapters, "modules": len(mods),
                                "trainable": sum(p.numel() for p in params)}
        return OwnModules(params)

    def after_instruct(self, ctx: StageContext) -> None:
        layout, tensors = export_state(ctx.model.llm)
        ctx.llm_modules = layout
        ctx.tensors.update(tensors)
