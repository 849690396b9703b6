"""The one training loop (on accelerate) used by every phase: align, instruct, realign.

Readable in one sitting: seeded data order, AdamW with per-group learning rates, cosine
schedule with linear warmup, gradient accumulation to reach the effective batch size,
gradient clipping, an optional extra loss term (a strategy's penalty), a progress bar, and a
record of each optimizer step (loss, learning rate, gradient norm: ``PhaseResult`` and the
``on_step`` callback) that reads the training state without changing it.

Several processes (``torchrun`` / ``accelerate launch``, see docs/distributed.md) train one
phase together and take the same optimizer steps as one process would:

* ``split_batches=True``: each micro-batch of the (seeded, identical on every process) data
  order is split across the processes, so the effective batch, the data order and the
  number of optimizer (and scheduler) steps do not depend on the number of processes. A
  micro-batch that does not split evenly (the last one of an epoch, or a micro-batch size
  that is not a multiple of the number of processes) is padded with weightless copies
  (labels masked) so that every process gets a piece of the same size.
* the loss of each process is weighted by its share of the micro-batch's labelled tokens,
  so that DDP's mean over processes is the token mean over the whole micro-batch, as in
  one process (the mean of per-process means would weigh tokens differently).
* ``find_unused_parameters=True``: in a mixed-modality batch (replay, realign) a process's
  piece may hold no sample of some modality, leaving that connector without a gradient there.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mera.errors import MeraError
from mera.faults import fault_point
from mera.train.fsdp import accelerate_without_fsdp, full_optimizer_state, load_full_optimizer_state
from mera.train.fsdp import settings as fsdp_settings
from mera.train.fsdp import unwrap as fsdp_unwrap
from mera.train.fsdp import whole as fsdp_whole
from mera.train.fsdp import whole_writeback as fsdp_whole_writeback
from mera.train.fsdp import wrap as fsdp_wrap


@dataclass
class StepCheckpoint:
    """Where and how often a phase saves its full training state (``<path>.safetensors`` + ``.json``).

    Saved every ``every`` optimizer steps and once more when the phase completes: the
    trainable parameters, the AdamW state, the scheduler, torch's RNG, the data order (the
    shuffling generator's state at the start of the current epoch and the position in it)
    and the losses, learning rates and gradient norms so far. A phase started with a checkpoint
    present continues from it (a completed one is not trained again), giving the same parameters as an uninterrupted run.
    """

    path: Path
    every: int = 0  # 0: only the completion checkpoint

    def files(self) -> tuple[Path, Path]:
        return self.path.with_suffix(".safetensors"), self.path.with_suffix(".json")


def _save_state(ck: StepCheckpoint, params, optimizer, scheduler, gen_state, state: dict, *,
                main: bool = True, fsdp=None) -> None:
    """Write the step checkpoint (the main process). Under FSDP (``fsdp``: the wrapped model)
    every process takes part in gathering the whole parameters and AdamW state first."""
    from safetensors.torch import save_file

    from mera.io import atomic_path, write_json

    if fsdp is not None:
        opt = full_optimizer_state(fsdp, optimizer, params)
        with fsdp_whole(fsdp):
            tensors = {f"param.{i}": p.detach().cpu().clone() for i, p in enumerate(params)}
        if not main:
            return
    else:
        if not main:
            return
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        for d, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{d}"] = st
    tensors["rng.epoch"] = gen_state
    t_file, j_file = ck.files()
    with atomic_path(t_file) as tmp:
        save_file(tensors, str(tmp))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    write_json(j_file, {**state, "param_groups": opt["param_groups"], "scheduler": sched,
                        "n_params": len(params), "tensors_sha": _digest(t_file)})


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_state(ck: StepCheckpoint, params, optimizer, scheduler, fsdp=None) -> tuple[dict, torch.Tensor] | None:
    """Restore a saved state into ``params``/``optimizer``/``scheduler``; None if there is none
    (or it belongs to another file pair: a crash between the two writes)."""
    import json

    from safetensors.torch import load_file

    t_file, j_file = ck.files()
    if not (t_file.is_file() and j_file.is_file()):
        return None
    state = json.loads(j_file.read_text())
    if state.get("tensors_sha") != _digest(t_file) or state.get("n_params") != len(params):
        return None  # the pair is out of step: start the phase over
    tensors = load_file(str(t_file))
    with torch.no_grad(), (fsdp_whole_writeback(fsdp) if fsdp is not None else contextlib.nullcontext()):
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = v
    if fsdp is not None:  # a whole (unsharded) state, sharded into this process's optimizer
        load_full_optimizer_state(fsdp, optimizer, params, {"state": opt_state, "param_groups": state["param_groups"]})
    else:
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state, tensors["rng.epoch"]


def _state(result: PhaseResult, done_micro: int, epoch_start: int, complete: bool) -> dict:
    """The JSON part of a step checkpoint: where the phase is and its record so far."""
    return {"done_micro": done_micro, "epoch_start": epoch_start, "losses": result.losses, "steps": result.steps,
            "lrs": result.lrs, "grad_norms": result.grad_norms, "complete": complete}


class _SplitBatches:
    """The micro-batches of ``batch_sampler``, each laid out for accelerate's ``split_batches``
    over ``world`` processes: ``world`` contiguous pieces of ``per`` indices, the real samples
    spread as evenly as possible (in order), the free places filled with ``-1 - i`` (a
    weightless copy of sample ``i``, the micro-batch's first one)."""

    drop_last = False

    def __init__(self, batch_sampler: BatchSampler, world: int):
        self.batch_sampler = batch_sampler
        self.sampler = batch_sampler.sampler  # where accelerate finds the shuffling generator
        self.world = world
        self.per = math.ceil(batch_sampler.batch_size / world)
        self.batch_size = self.per * world

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            n, out, start = len(batch), [], 0
            for r in range(self.world):
                c = n // self.world + (r < n % self.world)
                out += batch[start:start + c] + [-1 - batch[0]] * (self.per - c)
                start += c
            yield out


class _Weighted(Dataset):
    """``dataset`` where index ``-1 - i`` is a weightless copy of item ``i`` (see _SplitBatches)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (self.dataset[i], True) if i >= 0 else (self.dataset[-1 - i], False)


_REAL = "_mera_real_samples"


class _WeightedCollate:
    """Collate the items of ``_Weighted``; the copies' labels are masked (-100), so that they add
    nothing to the loss; the number of real samples goes in the batch under ``_REAL``."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        batch = self.collate_fn([it for it, _ in items])
        real = torch.tensor([r for _, r in items])
        if not bool(real.all()):
            if not (isinstance(batch, dict) and torch.is_tensor(batch.get("labels"))):
                raise MeraError("training on several processes pads uneven micro-batches with masked copies, "
                                "which needs batches with 'labels'")
            batch["labels"][~real] = -100
        batch[_REAL] = int(real.sum())
        return batch


def _weight(batch: dict, n_real: int) -> torch.Tensor:
    """What a process's loss is weighted by: its labelled next-token positions (the loss of
    MultimodalLM is their mean), else its number of real samples."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if torch.is_tensor(labels):
        return (labels[:, 1:] != -100).sum().float()
    return torch.tensor(float(n_real))


def train_only(model: torch.nn.Module, groups: list[dict]) -> None:
    """Freeze every parameter of ``model``, then unfreeze those of ``groups`` (``{"params": [...]}``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)


@dataclass
class PhaseResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step (mean over micro-batches)
    steps: int = 0
    seconds: float = 0.0
    # per optimizer step too: the learning rate it stepped with (the first parameter group's) and
    # the gradient norm before clipping (None: the phase ended inside an accumulation window, whose
    # gradient is never applied, or a checkpoint of an earlier release did not record it)
    lrs: list[float | None] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)


def _grad_norm(params) -> torch.Tensor:
    """The total 2-norm of the gradients of ``params``, read only (what clip_grad_norm_ computes first)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def train_phase(
    model: torch.nn.Module,
    param_groups: list[dict],
    dataset,
    collate_fn,
    *,
    batch_size: int,
    micro_batch_size: int | None,
    epochs: float,
    warmup_ratio: float,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    extra_loss: Callable[[], torch.Tensor | None] | None = None,
    desc: str = "train",
    progress: bool = True,
    accelerator: Accelerator | None = None,
    checkpoint: StepCheckpoint | None = None,
    num_workers: int = 0,
    on_step: Callable[[dict], None] | None = None,
) -> PhaseResult:
    """Train the parameters of ``param_groups`` (each ``{"params": [...], "lr": float}``) on ``dataset``.

    ``epochs`` may be fractional. The effective batch is ``batch_size``; it is split into
    micro-batches of ``micro_batch_size`` with gradient accumulation. Under several processes
    each micro-batch is split across them (see the module's docstring): the optimizer steps,
    the losses and the step checkpoints (saved by the main process) are those of one process,
    up to floating-point rounding.

    ``on_step`` (main process only) is called after each optimizer step with ``{"step",
    "total_steps", "loss", "lr", "grad_norm"}`` (the step's entries of the result); the values are
    read from the training state (the norm is the one clipping computes, or the same norm computed
    without touching the gradients when clipping is off), so logging changes no number.
    """
    import time

    t0 = time.perf_counter()
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups or len(dataset) == 0:
        return PhaseResult()
    micro = min(micro_batch_size or batch_size, batch_size)
    accum = max(1, batch_size // micro)
    own = accelerator is None
    fsdp = fsdp_settings()
    if own:
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

        # cpu=True is what makes accelerate set up a (gloo) process group on CPU; split_batches:
        # a loader batch is the micro-batch of all processes together; find_unused_parameters:
        # a connector may get no gradient in a mixed-modality batch (replay, realign). Under FSDP
        # the phase wraps the model itself (mera/train/fsdp.py), not accelerate's plugin.
        with accelerate_without_fsdp() if fsdp else contextlib.nullcontext():
            accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accum,
                                      dataloader_config=DataLoaderConfiguration(split_batches=True),
                                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    acc = accelerator
    acc.gradient_accumulation_steps = accum
    world = acc.num_processes
    sharded = fsdp is not None and own and world > 1
    if world > 1 and not acc.split_batches:
        raise MeraError("train_phase on several processes needs an Accelerator with split_batches=True")

    gen = torch.Generator().manual_seed(seed)
    if world == 1:
        loader = DataLoader(dataset, batch_size=micro, shuffle=True, generator=gen, collate_fn=collate_fn,
                            drop_last=False, num_workers=num_workers)
    else:  # the same batches, each split across the processes by accelerate (the same draws from gen)
        batches = _SplitBatches(BatchSampler(RandomSampler(dataset, generator=gen), micro, drop_last=False), world)
        loader = DataLoader(_Weighted(dataset), batch_sampler=batches, generator=gen,
                            collate_fn=_WeightedCollate(collate_fn), num_workers=num_workers)
    # the schedule is laid out on the whole data set: with split_batches accelerate advances
    # it once per optimizer step whatever the number of processes
    sched_steps = max(1, math.ceil(max(1, int(round(len(loader) * epochs))) / accum))
    warmup = int(math.ceil(warmup_ratio * sched_steps))

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, sched_steps)
    # one process on the CPU, with our own Accelerator: plain PyTorch steps, exactly what accelerate
    # does there (the loss / accumulation, the optimizer and scheduler stepped and the gradients
    # cleared at the end of each accumulation window and of each epoch) without its wrappers' cost
    # (benchmarks/loop_parity.py; the golden files are byte-identical either way)
    plain = own and world == 1 and not torch.cuda.is_available()
    module = model
    if sharded:  # our own FSDP wrapper (mera/train/fsdp.py); accelerate only splits the batches
        loader = acc.prepare(loader)
        model = fsdp_wrap(module, fsdp, acc.device)
    elif not plain:
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    manual = plain or sharded  # we step the optimizer ourselves
    if sharded and extra_loss is not None:
        raise MeraError(f"{desc}: a loss term computed from the parameters (EWC's penalty) cannot run under "
                        "FSDP, where each process holds only a shard of them outside the forward pass; "
                        "use the DDP preset (or torchrun) for this method")
    per_epoch = len(loader)
    total_micro = max(1, int(round(len(loader) * epochs)))
    total_steps = max(1, math.ceil(total_micro / accum))
    params = [p for g in param_groups for p in g["params"]]

    result = PhaseResult()
    model.train()
    done_micro, window = 0, []
    skip, epoch_start = 0, 0  # micro-batches of the current epoch already done (resume)
    epoch_gen = gen.get_state()
    if checkpoint is not None:
        loaded = _load_state(checkpoint, params, optimizer, scheduler, fsdp=model if sharded else None)
        if loaded is not None:
            state, epoch_gen = loaded
            done_micro, epoch_start = state["done_micro"], state["epoch_start"]
            result.losses, result.steps = list(state["losses"]), state["steps"]
            # a checkpoint of an earlier release has no learning rates or norms: unknown (None)
            result.lrs = list(state.get("lrs") or [None] * len(result.losses))
            result.grad_norms = list(state.get("grad_norms") or [None] * len(result.losses))
            skip = done_micro - epoch_start
            gen.set_state(epoch_gen)
        if world > 1:  # everyone has read the checkpoint before the main process writes it again
            acc.wait_for_everyone()
    bar = tqdm(total=total_steps, initial=result.steps, desc=desc,
               disable=not progress or not acc.is_local_main_process, leave=False)
    while done_micro < total_micro:
        epoch_gen = gen.get_state()  # the permutation of this epoch is drawn from here
        if skip == 0:
            epoch_start = done_micro
        for k, batch in enumerate(loader):
            if skip:  # resumed mid-epoch: replay the data order up to where the checkpoint was
                skip -= 1
                continue
            # accelerate's window: every accum micro-batches of an epoch, and the epoch's last one
            sync = (k + 1) % accum == 0 or k + 1 == per_epoch
            if sharded and not sync:
                ctx = model.no_sync()  # FSDP: accumulate unsharded gradients until the window's last one
            else:
                ctx = contextlib.nullcontext() if manual else acc.accumulate(model)
            with ctx:
                if world == 1:
                    loss = model(batch).loss
                    shown = loss
                else:
                    n_real = batch.pop(_REAL)
                    local = model(batch).loss
                    n = _weight(batch, n_real).to(local.device)
                    tot = acc.reduce(torch.stack([n, local.detach().float() * n]), reduction="sum")
                    # DDP averages the gradients over the processes: weighted so, the mean is
                    # the token mean over the whole micro-batch, as in one process
                    loss = local * (n * world / tot[0].clamp(min=1))
                    shown = tot[1] / tot[0].clamp(min=1)  # the loss one process would see
                if extra_loss is not None:
                    extra = extra_loss()
                    if extra is not None:  # the same on every process: DDP's mean leaves it as it is
                        loss = loss + extra
                        shown = shown + extra if world > 1 else loss
                if not torch.isfinite(shown.detach()).all():  # stop before a NaN step spoils the weights
                    phase = desc.split()[-1] if desc else ""
                    knob = f"train.{phase}'s learning rates" if phase in ("align", "instruct", "realign") else "the learning rate"
                    raise MeraError(f"{desc}: the training loss is {shown.detach().float().item()} at step "
                                    f"{result.steps + 1} of {total_steps} (micro-batch {done_micro + 1}); training "
                                    f"stopped before that step (lower {knob}, or check the data)")
                # the record of the step: the learning rate it steps with and the gradient norm
                # before clipping (clip_grad_norm_ returns it; without clipping the same norm is
                # computed from the gradients, read only), taken before the step changes them
                norm = None
                if manual:
                    (loss / accum).backward()
                    if sync:
                        lr = optimizer.param_groups[0]["lr"]
                        if sharded:  # the norm over every process's shard (max_norm inf: nothing clipped)
                            norm = model.clip_grad_norm_(max_grad_norm or float("inf"))
                        else:
                            norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm
                                    else _grad_norm(params))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                else:
                    acc.backward(loss)
                    if acc.sync_gradients:
                        lr = optimizer.param_groups[0]["lr"]
                        norm = acc.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else _grad_norm(params)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    sync = acc.sync_gradients
                if not sync:  # inside a window (or the phase's last, unfinished one): the lr it would step with
                    lr = optimizer.param_groups[0]["lr"]
            window.append(shown.detach().float().item())
            done_micro += 1
            if sync or done_micro == total_micro:
                result.losses.append(sum(window) / len(window))
                result.lrs.append(float(lr))
                result.grad_norms.append(None if norm is None else float(norm))
                window = []
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
                if on_step is not None and acc.is_main_process:
                    on_step({"step": result.steps, "total_steps": total_steps, "loss": result.losses[-1],
                             "lr": result.lrs[-1], "grad_norm": result.grad_norms[-1]})
                if (checkpoint is not None and checkpoint.every and result.steps % checkpoint.every == 0
                        and done_micro < total_micro):
                    _save_state(checkpoint, params, optimizer, scheduler, epoch_gen,
                                _state(result, done_micro, epoch_start, False),
                                main=acc.is_main_process, fsdp=model if sharded else None)
                fault_point("train_step")
            if done_micro >= total_micro:
                break
    if checkpoint is not None:
        _save_state(checkpoint, params, optimizer, scheduler, epoch_gen,
                    _state(result, done_micro, epoch_start, True),
                    main=acc.is_main_process, fsdp=model if sharded else None)
    bar.close()
    if sharded:  # whole weights again in every process, in the model's own parameters
        fsdp_unwrap(model, module)
        model = module
    model.eval()
    if own and world > 1:
        # drop the DDP wrapper (and its gradient hooks on the shared parameters) before the next
        # phase wraps the model again
        acc.free_memory(model, optimizer, loader, scheduler)
        del model, optimizer, loader, scheduler
        import gc

        gc.collect()
    result.seconds = time.perf_counter() - t0
    return result
