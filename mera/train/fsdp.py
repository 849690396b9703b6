"""FSDP for one training phase: shard while training, whole weights everywhere else.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets ``ACCELERATE_USE_FSDP=true``
and the ``FSDP_*`` settings in every process's environment. mera does not hand the model to
accelerate's FSDP plugin: that plugin refuses to run without a GPU (so no CPU test could cover
it), and it leaves the model wrapped (sharded) after training, while mera's stage loop reads and
changes whole weights between phases (it extracts the LoRA pairs, folds merges into the LLM,
saves connectors, evaluates). Instead :func:`train_phase` wraps the model with PyTorch's own
``FullyShardedDataParallel`` (the same class accelerate uses) for the phase, and :func:`unwrap`
gathers the whole weights back into the model's own parameters when the phase ends. What is
sharded during training: the parameters, gradients and AdamW state of every process; between
phases each process holds the whole model, as under DDP (docs/distributed.md).

The same code runs on CPU (gloo; tested) and on GPUs (NCCL; the device is the process's own).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from mera.errors import MeraError

_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
_POLICIES = ("NO_WRAP", "TRANSFORMER_BASED_WRAP")


@dataclass(frozen=True)
class FsdpSettings:
    sharding_strategy: str = "FULL_SHARD"
    auto_wrap_policy: str = "NO_WRAP"
    version: int = 1


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def settings() -> FsdpSettings | None:
    """The FSDP settings ``accelerate launch`` put in the environment; None when FSDP is not asked for."""
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy.isdigit():  # older accelerate configs write the enum's number (1 = FULL_SHARD)
        strategy = _STRATEGIES[int(strategy) - 1] if 1 <= int(strategy) <= len(_STRATEGIES) else strategy
    if strategy not in _STRATEGIES:
        raise MeraError(f"FSDP_SHARDING_STRATEGY={strategy!r} is not one of {', '.join(_STRATEGIES)} "
                        "(fsdp_sharding_strategy in the accelerate config)")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").strip().upper()
    if policy not in _POLICIES:
        raise MeraError(f"FSDP_AUTO_WRAP_POLICY={policy!r}: mera supports {' and '.join(_POLICIES)} "
                        "(fsdp_auto_wrap_policy in the accelerate config)")
    version = int(os.environ.get("FSDP_VERSION", "1") or 1)
    if version != 1:
        raise MeraError(f"FSDP_VERSION={version}: mera's FSDP phase uses FSDP version 1 (fsdp_version: 1 "
                        "in the accelerate config)")
    if not _flag("FSDP_USE_ORIG_PARAMS", "true"):
        raise MeraError("FSDP_USE_ORIG_PARAMS=false: mera trains LoRA and connectors while the LLM stays "
                        "frozen in the same FSDP unit, which needs fsdp_use_orig_params: true")
    return FsdpSettings(strategy, policy, version)


@contextlib.contextmanager
def accelerate_without_fsdp():
    """Build an ``Accelerator`` that sets up the processes (and splits the batches) but does not
    create accelerate's FSDP plugin: the phase wraps the model itself (see the module docstring)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def _layer_classes(model: torch.nn.Module) -> set[type]:
    """The LLM's decoder-layer classes (a transformers model names them in ``_no_split_modules``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def wrap(model: torch.nn.Module, fsdp: FsdpSettings, device: torch.device):
    """``model`` wrapped by FSDP (its parameters become views of this process's shard)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = None
    if fsdp.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
        layers = _layer_classes(model)
        if not layers:
            raise MeraError("fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP: the model names no decoder-layer "
                            "classes (_no_split_modules); use NO_WRAP")
        policy = ModuleWrapPolicy(layers)
    if device.type == "cpu":
        device = torch.device("cpu")  # FSDP compares it with the parameters' device, which has no index
    return FSDP(model, sharding_strategy=getattr(ShardingStrategy, fsdp.sharding_strategy),
                auto_wrap_policy=policy, device_id=device, use_orig_params=True, sync_module_states=False)


@torch.no_grad()
def unwrap(wrapped, model: torch.nn.Module) -> None:
    """Put the whole weights back into ``model``'s own parameters (every process) and leave FSDP.

    The parameter objects stay the same (the optimizer's and the strategies' references keep
    pointing at the trained values); their data become whole tensors of their own again.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    params = [p for _, p in wrapped.named_parameters()]
    with FSDP.summon_full_params(wrapped, writeback=False, recurse=True):
        full = [p.detach().clone() for p in params]
    for p, t in zip(params, full):
        p.data = t
        p.grad = None
        if hasattr(p, "_fsdp_flattened"):  # else the next phase's FSDP would take it as already sharded
            delattr(p, "_fsdp_flattened")
    # the FSDP units are gone once ``wrapped`` is; their hooks live on the wrappers, not on ``model``
    _strip(model)
    for m in model.modules():  # FSDP's marks: transformers' generate would take the model for a
        for mark in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):  # sharded one and sync
            if mark in m.__dict__:  # every step with the other processes (which generate other batches)
                delattr(m, mark)


def _strip(model: torch.nn.Module) -> None:
    """Replace every FSDP wrapper inside ``model`` (auto-wrapped layers) by the module it wraps."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for name, child in list(model.named_children()):
        if isinstance(child, FSDP):
            inner = child.module
            setattr(model, name, inner)
            _strip(inner)
        else:
            _strip(child)


@contextlib.contextmanager
def whole(wrapped):
    """Inside, every parameter of the wrapped model holds its whole value (for a step checkpoint)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False, recurse=True):
        yield


@contextlib.contextmanager
def whole_writeback(wrapped):
    """Inside, the parameters hold their whole values, and what is written into them is sharded
    back on leaving (restoring a step checkpoint)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=True, recurse=True):
        yield


_ADAMW = ("exp_avg", "exp_avg_sq")


def _through_params(wrapped, params, values: list, writeback: bool):
    """FSDP's own gathering, borrowed for tensors shaped like the parameters: ``values[i]``
    (this process's piece of parameter ``i``, or None) is written into the parameter's shard,
    the whole parameters are read (or, with ``writeback``, the whole ``values`` written and
    this process's pieces read back), and the parameters are restored.

    (FSDP.optim_state_dict would do this for the AdamW state, but with the model on the CPU
    its gathered states are views of one reused buffer: every state came out as the last one,
    seen with torch 2.13.)
    """
    with torch.no_grad(), whole(wrapped):
        saved = [p.detach().clone() for p in params]
    out = []
    with torch.no_grad():
        if not writeback:
            for p, v in zip(params, values):
                if v is not None:
                    p.copy_(v)
            with whole(wrapped):
                out = [p.detach().clone() for p in params]
        else:
            with whole_writeback(wrapped):
                for p, v in zip(params, values):
                    if v is not None:
                        p.copy_(v)
            out = [p.detach().clone() for p in params]
        with whole_writeback(wrapped):
            for p, s in zip(params, saved):
                p.copy_(s)
    return out


def full_optimizer_state(wrapped, optimizer, params) -> dict:
    """The AdamW state of ``params`` unsharded (every process takes part), laid out as
    ``optimizer.state_dict()`` of one process (state keyed by the index in ``params``)."""
    import torch.distributed as dist

    steps = torch.tensor([float(optimizer.state.get(p, {}).get("step", 0)) for p in params])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # a process without a piece of a parameter has no state
    state: dict = {i: {"step": torch.tensor(float(steps[i]))} for i in range(len(params)) if steps[i] > 0}
    for name in _ADAMW:
        values = [optimizer.state[p][name] if name in optimizer.state.get(p, {}) else None for p in params]
        for i, full in enumerate(_through_params(wrapped, params, values, writeback=False)):
            if i in state:
                state[i][name] = full
    index = {id(p): i for i, p in enumerate(params)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(wrapped, optimizer, params, state: dict) -> None:
    """The inverse of :func:`full_optimizer_state`: this process's pieces of a saved whole AdamW
    state into ``optimizer`` (the parameters are left as they were)."""
    saved = {int(i): st for i, st in state["state"].items()}
    for group, g in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: v for k, v in g.items() if k != "params"})
    pieces = {}
    for name in _ADAMW:
        values = [saved[i][name] if i in saved else None for i in range(len(params))]
        pieces[name] = _through_params(wrapped, params, values, writeback=True)
    for i, p in enumerate(params):
        if i in saved:
            optimizer.state[p] = {"step": saved[i]["step"].clone().float(),
                                  **{name: pieces[name][i].to(p.dtype) for name in _ADAMW}}


