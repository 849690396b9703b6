"""PathWeave (adapter-in-adapter with per-modality gates) as its authors' public code builds it, placed inside the LLM as
the MERA paper re-implemented it. docs/pathweave.md: the method in full (the forms and inits of the in-adapters and
gates), its two test protocols, and where this knowingly differs from the original (JiazuoYu/PathWeave).

Every linear module of the LLM that the expert's LoRA targets is wrapped by a :class:`PathWeaveLinear`. Modality
``m_t`` (t = 0, 1, ... in the order) owns adapter t (``down_t`` / ``up_t``, LoRA-shaped, rank r, scaling s; adapter 0
is the expert's LoRA) and path t: in-adapters ``F^t_j`` inside the frozen adapters j < t, replacing their bottleneck,
and a per-token noisy top-k gate ``g^t`` (noise in training mode only):

    t = 0:  y = W x + s * up_0(down_0 x)
    t > 0:  y = W x + sum_{j<=t} g^t_j(x) * s * up_j(h^t_j),   h^t_j = F^t_j(down_j x) for j < t,  h^t_t = down_t x

Which path a row takes is the ``protocol`` (:class:`PathWeaveParams`; recorded in the saved layout). ``paper`` (the
default; the MERA paper's footnote 3: nothing is removed): every row takes the newest path, whatever its modality, a
row without media and one of a modality whose path does not exist yet (its step A) included; no modality label is
read, in training, in realign or at test time. ``original`` (the authors' test, the newer modules removed): a row
takes its own modality's path (``MultimodalLM.batch_modalities``), a row without one the frozen LLM alone; a method
using it must say so in its name (:meth:`PathWeave.check_method`).

At stage t+1 exactly adapter t, the in-adapters ``F^t_j`` and gate t (``G_t``, ``N_t``) train; all else is frozen, the
LLM's own weights included once the expert's adapter is taken out of them. So under ``original`` an earlier modality's
output never changes again (no forgetting, by construction); under ``paper`` it does (it takes the new path). Every
adapter is kept: the inference cost grows with the number of modalities.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import LLMPolicy, OwnModuleCounts, OwnModules, StageContext, Strategy
from mera.errors import CheckpointError

PREFIX = "pathweave."
LAYOUT_VERSION = 2
PROTOCOLS = ("paper", "original")
IN_ADAPTER_INIT_STD = 0.02  # the original's effective init (BERT's initializer_range) of its adapter linears


def _linear(i: int, o: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """An uninitialised Linear on ``like``'s device and dtype (no draw from the RNG)."""
    return nn.utils.skip_init(nn.Linear, i, o, bias=bias, device=like.device, dtype=like.dtype)


class PathWeaveLinear(nn.Module):
    """A frozen base ``nn.Linear`` plus one adapter and one path (gate, in-adapters) per modality. ``paper``: every row
    takes the newest path. ``original``: ``route`` (a :class:`mera.model.mllm.BatchModalities`) says each row's
    modality, whose path it takes (none for a modality without one, or None)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, *, in_adapter: str = "mlp",
                 in_hidden: int | None = None, top_k: int | None = None, noise: bool = True,
                 noise_epsilon: float = 1e-2, protocol: str = "paper", route=None):
        super().__init__()
        if in_adapter not in ("mlp", "linear"):
            raise ValueError(f"in_adapter must be 'mlp' or 'linear', got {in_adapter!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.protocol = protocol
        self.base = base
        self.rank, self.scaling = rank, scaling
        self.in_adapter = in_adapter
        self.in_hidden = (in_hidden or 2 * rank) if in_adapter == "mlp" else None
        self.top_k, self.noisy, self.noise_epsilon = top_k, noise, noise_epsilon
        self.route = route
        self.down = nn.ModuleList()  # adapter j: Linear(in, r)
        self.up = nn.ModuleList()  # adapter j: Linear(r, out)
        self.inner = nn.ModuleDict()  # "j_t": the in-adapter modality t's path inserts into adapter j
        self.gate = nn.ModuleDict()  # "t" (t >= 1): Linear(in, t + 1), modality t's clean gate logits
        self.noise = nn.ModuleDict()  # "t" (t >= 1): Linear(in, t + 1), its noise scale (if noisy)
        self.modalities: list[str] = []  # adapter / path t belongs to modalities[t]
        self._groups = None  # (route list, device, groups) of the last call: one batch, many modules

    @property
    def num_adapters(self) -> int:
        return len(self.down)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, scaling={self.scaling}, modalities={self.modalities}, protocol={self.protocol}, "
                f"in_adapter={self.in_adapter}, in_hidden={self.in_hidden}, top_k={self.top_k}, noise={self.noisy}")

    # ------------------------------------------------------------------ building

    def _new_in_adapter(self) -> nn.Sequential:
        w = self.base.weight
        if self.in_adapter == "mlp":
            return nn.Sequential(_linear(self.rank, self.in_hidden, True, w), _linear(self.in_hidden, self.rank, True, w))
        return nn.Sequential(_linear(self.rank, self.rank, True, w))

    def add_adapter(self, modality: str, A: torch.Tensor | None = None, B: torch.Tensor | None = None, *,
                    init: bool = True) -> int:
        """Adapter t and modality t's path (t = the number of adapters so far); returns t. ``A`` / ``B``: the
        adapter's weights (the expert's LoRA), else LoRA's init. For t >= 1 the path's gate (zero) and in-adapters
        (a copy of modality t-1's in-adapter of the same old adapter, else fresh). ``init=False``: no values."""
        if modality in self.modalities:
            raise ValueError(f"PathWeave: {modality!r} already has a path")
        w = self.base.weight
        t = self.num_adapters
        down = _linear(self.base.in_features, self.rank, False, w)
        up = _linear(self.rank, self.base.out_features, False, w)
        gate = noise = None
        inner: dict[str, nn.Sequential] = {}
        if t >= 1:
            gate = _linear(self.base.in_features, t + 1, False, w)
            noise = _linear(self.base.in_features, t + 1, False, w) if self.noisy else None
            inner = {f"{j}_{t}": self._new_in_adapter() for j in range(t)}
        if init:
            with torch.no_grad():
                if A is None:
                    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                    nn.init.zeros_(up.weight)
                else:
                    down.weight.copy_(A)
                    up.weight.copy_(B)
                for lin in (gate, noise):
                    if lin is not None:
                        lin.weight.zero_()
                for key, mod in inner.items():
                    j = int(key.split("_")[0])
                    prev = self.inner[f"{j}_{t - 1}"] if j < t - 1 else None
                    for k, lin in enumerate(mod):
                        if prev is not None:
                            lin.weight.copy_(prev[k].weight)
                            lin.bias.copy_(prev[k].bias)
                        else:
                            lin.weight.normal_(0.0, IN_ADAPTER_INIT_STD)
                            lin.bias.zero_()
        self.down.append(down)
        self.up.append(up)
        if gate is not None:
            self.gate[str(t)] = gate
            if noise is not None:
                self.noise[str(t)] = noise
        for key, mod in inner.items():
            self.inner[key] = mod
        self.modalities.append(modality)
        self._groups = None
        return t

    def path_parameters(self, t: int) -> list[nn.Parameter]:
        """What modality t's stage trains: adapter t, its path's in-adapters and its gate."""
        params = [self.down[t].weight, self.up[t].weight]
        if t >= 1:
            params.append(self.gate[str(t)].weight)
            if str(t) in self.noise:
                params.append(self.noise[str(t)].weight)
            for j in range(t):
                params += list(self.inner[f"{j}_{t}"].parameters())
        return params

    # ------------------------------------------------------------------ forward

    def gates(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Modality t's mixing weights [..., t + 1] (noisy in training mode; sum to one)."""
        logits = self.gate[str(t)](x).float()
        if self.training and self.noisy:
            std = F.softplus(self.noise[str(t)](x).float()) + self.noise_epsilon
            logits = logits + torch.randn_like(logits) * std
        n = t + 1
        if self.top_k is None or self.top_k >= n:
            g = F.softmax(logits, dim=-1)
        else:
            top, idx = logits.topk(self.top_k, dim=-1)
            g = torch.zeros_like(logits).scatter(-1, idx, F.softmax(top, dim=-1))
        return g.to(x.dtype)

    def path(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """What modality t's path adds to the base output for inputs ``x``."""
        if t == 0:
            return self.scaling * self.up[0](self.down[0](x))
        g = self.gates(t, x)
        out = None
        for j in range(t + 1):
            h = self.down[j](x)
            if j < t:
                h = self.inner[f"{j}_{t}"](h)
            term = g[..., j:j + 1] * (self.scaling * self.up[j](h))
            out = term if out is None else out + term
        return out

    def _route_groups(self, rows: int, device) -> list[tuple[int, torch.Tensor | None]]:
        """[(path t, row indices or None for all rows)] of the batch being run."""
        mods = self.route.get() if self.route is not None else None
        if mods is None:
            raise RuntimeError("PathWeave chooses each sample's path by its modality: run the LLM through "
                               "MultimodalLM (embed / forward / generate), which records the batch's modalities")
        if len(mods) != rows:
            raise RuntimeError(f"PathWeave: the batch being run has {len(mods)} samples, the input {rows} rows")
        cached = self._groups
        if cached is not None and cached[0] is mods and cached[1] == device:
            return cached[2]
        index = {m: t for t, m in enumerate(self.modalities)}
        by_path: dict[int, list[int]] = {}
        for i, m in enumerate(mods):
            t = index.get(m)
            if t is not None:
                by_path.setdefault(t, []).append(i)
        if len(by_path) == 1 and len(next(iter(by_path.values()))) == rows:
            groups = [(next(iter(by_path)), None)]
        else:
            groups = [(t, torch.tensor(r, dtype=torch.long, device=device)) for t, r in by_path.items()]
        self._groups = (mods, device, groups)
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.modalities:
            return y
        if self.protocol == "paper":  # one model for every input: the newest path, no label read
            return y + self.path(self.num_adapters - 1, x)
        for t, idx in self._route_groups(x.shape[0], x.device):
            if idx is None:
                return y + self.path(t, x)
            y = y.index_add(0, idx, self.path(t, x.index_select(0, idx)))
        return y


def wrapped_modules(llm: nn.Module) -> dict[str, PathWeaveLinear]:
    return {n: m for n, m in llm.named_modules() if isinstance(m, PathWeaveLinear)}


def _install(llm: nn.Module, names: list[str], rank: int, scaling: float, settings: dict,
             route) -> dict[str, PathWeaveLinear]:
    """Replace each named ``nn.Linear`` of ``llm`` by a PathWeaveLinear around it."""
    modules = dict(llm.named_modules())
    out = {}
    for name in names:
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"PathWeave: the LLM has no linear module {name!r}")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else llm
        wrapper = PathWeaveLinear(base, rank, scaling, route=route, **settings)
        setattr(parent, attr, wrapper)
        out[name] = wrapper
    return out


def export_state(llm: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(layout description for the manifest, tensors for strategy.safetensors)."""
    mods = wrapped_modules(llm)
    m = next(iter(mods.values()))  # every module has the same settings and paths
    layout = {"kind": "pathweave", "version": LAYOUT_VERSION, "rank": m.rank, "scaling": m.scaling,
              "in_adapter": m.in_adapter, "in_hidden": m.in_hidden, "top_k": m.top_k, "noise": m.noisy,
              "noise_epsilon": m.noise_epsilon, "protocol": m.protocol, "modalities": list(m.modalities),
              "num_adapters": m.num_adapters, "inner": sorted(m.inner.keys()), "modules": sorted(mods)}
    tensors = {}
    for name, m in mods.items():
        for pname, p in m.named_parameters():
            if not pname.startswith("base."):
                tensors[f"{PREFIX}{name}.{pname}"] = p.detach().float().clone()
    return layout, tensors


@torch.no_grad()
def install_from_state(llm: nn.Module, layout: dict, tensors: dict[str, torch.Tensor], route=None) -> None:
    """Rebuild the PathWeave modules of a saved stage on a (base) LLM and load their weights, routing
    by the layout's protocol; ``route``: the model's ``batch_modalities`` (by which the original
    protocol chooses each sample's path)."""
    if layout.get("version") != LAYOUT_VERSION or "modalities" not in layout:
        raise CheckpointError("the stage's PathWeave modules were saved by an older PathWeave (one shared gate, "
                              "no per-modality paths); train the stage again")
    settings = {k: layout[k] for k in ("in_adapter", "in_hidden", "top_k", "noise", "noise_epsilon")}
    # no key: a layout saved before the protocol existed, whose stages were trained and evaluated with
    # each modality through its own path, i.e. under the original protocol; they are rebuilt so
    settings["protocol"] = layout.get("protocol", "original")
    if settings["protocol"] not in PROTOCOLS:
        raise CheckpointError(f"PathWeave layout: unknown protocol {settings['protocol']!r} (known: paper, original)")
    mods = _install(llm, layout["modules"], layout["rank"], layout["scaling"], settings, route)
    for m in mods.values():
        for modality in layout["modalities"]:
            m.add_adapter(modality, init=False)
        if sorted(m.inner.keys()) != sorted(layout["inner"]):
            raise CheckpointError(f"PathWeave layout: in-adapters {layout['inner']} do not match "
                                  f"its modalities {layout['modalities']}")
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
    in_adapter: Literal["mlp", "linear"] = Field(
        "mlp", description="the in-adapter: 'mlp' = Linear(r, in_rank) -> Linear(in_rank, r), no activation; "
                           "'linear' = Linear(r, r) (r: train.lora's rank, the adapters' rank)")
    in_rank: int | None = Field(None, ge=1, description="hidden width of the 'mlp' in-adapter; None: 2r, the original's")
    top_k: int | None = Field(None, ge=1, description="adapters a token's gate keeps; None: all of its path (the "
                                                      "original's k)")
    noise: bool = Field(True, description="noisy gating in training (the original's); evaluation is deterministic")
    noise_epsilon: float = Field(1e-2, gt=0, description="floor of the gate noise's scale (the original's)")
    protocol: Literal["paper", "original"] = Field("paper", description=(
        "'paper' (footnote 3, nothing removed): every input through the newest stage's path, no modality label read; "
        "'original' (newer modules removed): each input through its own modality's path, in a method named so"))

    @model_validator(mode="after")
    def _linear_has_no_width(self):
        if self.in_adapter == "linear" and self.in_rank is not None:
            raise ValueError("in_rank is the width of the 'mlp' in-adapter; a 'linear' in-adapter has none")
        return self


@register("strategy", "pathweave", PathWeaveParams, llm=LLMPolicy.OWN_MODULES)
class PathWeave(Strategy):
    """PathWeave at stage t+1: adapter t for the new modality and its path (in-adapters into
    every old, frozen adapter, and its own gate); trained in step B instead of a LoRA."""

    name = "pathweave"
    reads_old_modalities = False  # a stage trains on the new modality only; old paths stay frozen
    install = staticmethod(install_from_state)  # rebuilds a saved stage's modules (mera.continual.stages)
    export_refusal = "its LLM holds extra modules (PathWeave's adapters) that cannot be folded into a plain HF model"

    @classmethod
    def check_method(cls, method: str, params) -> None:
        """The original protocol's scores are not PathWeave's as the paper tests it: its method must say so."""
        if params is not None and params.protocol == "original" and "original protocol" not in method.lower():
            raise ValueError(f"method {method!r}: pathweave with protocol: original tests each modality through its own "
                             "stage's path (the newer modules removed), which is not PathWeave as the paper tests it; "
                             "name the method so that it says so, e.g. \"PathWeave (original protocol)\"")

    def plan_counts(self, shapes, stage: int) -> OwnModuleCounts:
        """Adapter ``stage - 1`` and its path train; the rest of the modules is frozen (built on the meta device)."""
        t, p, trainable, frozen = stage - 1, self.params, 0, 0
        for (i, o), count in shapes.adapted_shapes.items():
            with torch.device("meta"):
                m = PathWeaveLinear(nn.Linear(i, o, bias=False), shapes.lora_rank, 1.0, in_adapter=p.in_adapter,
                                    in_hidden=p.in_rank, top_k=p.top_k, noise=p.noise)
                for k in range(t + 1):
                    m.add_adapter(f"m{k}", init=False)
            mine = sum(x.numel() for x in m.path_parameters(t))
            trainable += count * mine
            frozen += count * (sum(x.numel() for n, x in m.named_parameters() if not n.startswith("base.")) - mine)
        return OwnModuleCounts("PathWeave", trainable, frozen, stage,
                               f"PathWeave: adapter {t} and its path train; activations counted as {stage} LoRAs")

    def restore(self, ctx: StageContext) -> None:
        if ctx.llm_modules:
            llm = ctx.model.llm
            for name, m in wrapped_modules(llm).items():  # the parent's modules: rebuilt whole from the state
                parent_name, _, attr = name.rpartition(".")
                setattr(llm.get_submodule(parent_name) if parent_name else llm, attr, m.base)
            install_from_state(llm, ctx.llm_modules, ctx.tensors, route=ctx.model.batch_modalities)

    def adapter(self, ctx: StageContext) -> OwnModules:
        llm, route = ctx.model.llm, ctx.model.batch_modalities
        mods = wrapped_modules(llm)
        if not mods:  # the previous stage is the expert: its adapter becomes adapter 0
            prev = ctx.history.last_trained()
            if prev is None or prev[0].kind != "lora":
                raise CheckpointError(f"{ctx.history.folder}: PathWeave needs the expert's LoRA adapter; none in the chain")
            delta, coef = prev
            delta.fold(llm, -coef)  # take the expert's delta out of the weights ...
            ctx.folds.append((delta, -coef))  # ... and record it, so the checkpoint chain stays exact
            pairs = delta.modules
            scalings = {d["scaling"] for d in pairs.values()}
            if len(scalings) != 1:
                raise CheckpointError("PathWeave: the expert's adapter has several LoRA scalings")
            rank = next(iter(pairs.values()))["A"].shape[0]
            p = self.params
            settings = {"in_adapter": p.in_adapter, "in_hidden": p.in_rank, "top_k": p.top_k, "noise": p.noise,
                        "noise_epsilon": p.noise_epsilon, "protocol": p.protocol}
            mods = _install(llm, sorted(pairs), rank, scalings.pop() * coef, settings, route)
            for name, m in mods.items():
                m.add_adapter(ctx.seen[0], pairs[name]["A"], pairs[name]["B"])
        known = list(next(iter(mods.values())).modalities)
        if known != list(ctx.seen[:-1]):
            raise CheckpointError(f"PathWeave: the model has paths for {known}, but this stage's earlier "
                                  f"modalities are {list(ctx.seen[:-1])}")
        if (routed := sorted({m.protocol for m in mods.values()})) != [self.params.protocol]:
            raise CheckpointError(f"PathWeave: the parent stage's modules route by protocol {', '.join(routed)}, this "
                                  f"method's is {self.params.protocol}; a chain keeps one protocol")
        for p in llm.parameters():
            p.requires_grad_(False)
        torch.manual_seed(ctx.seed)
        params = []
        for m in mods.values():
            m.route = route
            t = m.add_adapter(ctx.modality)
            params += m.path_parameters(t)
        ctx.log["pathweave"] = {"adapters": t + 1, "modalities": list(ctx.seen), "modules": len(mods),
                                "trainable": sum(p.numel() for p in params)}
        return OwnModules(params)

    def after_instruct(self, ctx: StageContext) -> None:
        layout, tensors = export_state(ctx.model.llm)
        ctx.llm_modules = {**layout, "kind": self.name}  # the registered name: the loader's key to install()
        ctx.tensors.update(tensors)
