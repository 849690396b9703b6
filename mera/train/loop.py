"""The one training loop (on accelerate) used by every phase: align, instruct, realign.

Readable in one sitting: seeded data order, AdamW with per-group learning rates, cosine
schedule with linear warmup, gradient accumulation to reach the effective batch size,
gradient clipping, an optional extra loss term (a strategy's penalty), a progress bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mera.errors import MeraError
from mera.faults import fault_point


@dataclass
class StepCheckpoint:
    """Where and how often a phase saves its full training state (``<path>.safetensors`` + ``.json``).

    Saved every ``every`` optimizer steps and once more when the phase completes: the
    trainable parameters, the AdamW state, the scheduler, torch's RNG, the data order (the
    shuffling generator's state at the start of the current epoch and the position in it)
    and the losses so far. A phase started with a checkpoint present continues from it (a
    completed one is not trained again), giving the same parameters as an uninterrupted run.
    """

    path: Path
    every: int = 0  # 0: only the completion checkpoint

    def files(self) -> tuple[Path, Path]:
        return self.path.with_suffix(".safetensors"), self.path.with_suffix(".json")


def _save_state(ck: StepCheckpoint, params, optimizer, scheduler, gen_state, state: dict) -> None:
    from safetensors.torch import save_file

    from mera.io import atomic_path, write_json

    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
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


def _load_state(ck: StepCheckpoint, params, optimizer, scheduler) -> tuple[dict, torch.Tensor] | None:
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
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
    opt_state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    return state, tensors["rng.epoch"]


@dataclass
class PhaseResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step (mean over micro-batches)
    steps: int = 0
    seconds: float = 0.0


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
) -> PhaseResult:
    """Train the parameters of ``param_groups`` (each ``{"params": [...], "lr": float}``) on ``dataset``.

    ``epochs`` may be fractional. The effective batch is ``batch_size``; it is split into
    micro-batches of ``micro_batch_size`` with gradient accumulation.
    """
    import time

    t0 = time.perf_counter()
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups or len(dataset) == 0:
        return PhaseResult()
    micro = min(micro_batch_size or batch_size, batch_size)
    accum = max(1, batch_size // micro)
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accum)
    acc.gradient_accumulation_steps = accum

    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=micro, shuffle=True, generator=gen, collate_fn=collate_fn, drop_last=False)
    # the schedule is laid out on the whole data set; under several processes accelerate
    # advances it once per process at each step, and each process sees its shard only
    sched_steps = max(1, math.ceil(max(1, int(round(len(loader) * epochs))) / accum))
    warmup = int(math.ceil(warmup_ratio * sched_steps))

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, sched_steps)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    total_micro = max(1, int(round(len(loader) * epochs)))
    total_steps = max(1, math.ceil(total_micro / accum))
    params = [p for g in param_groups for p in g["params"]]

    result = PhaseResult()
    model.train()
    done_micro, window = 0, []
    skip, epoch_start = 0, 0  # micro-batches of the current epoch already done (resume)
    epoch_gen = gen.get_state()
    if checkpoint is not None:
        loaded = _load_state(checkpoint, params, optimizer, scheduler)
        if loaded is not None:
            state, epoch_gen = loaded
            done_micro, epoch_start = state["done_micro"], state["epoch_start"]
            result.losses, result.steps = list(state["losses"]), state["steps"]
            skip = done_micro - epoch_start
            gen.set_state(epoch_gen)
    bar = tqdm(total=total_steps, initial=result.steps, desc=desc,
               disable=not progress or not acc.is_local_main_process, leave=False)
    while done_micro < total_micro:
        epoch_gen = gen.get_state()  # the permutation of this epoch is drawn from here
        if skip == 0:
            epoch_start = done_micro
        for batch in loader:
            if skip:  # resumed mid-epoch: replay the data order up to where the checkpoint was
                skip -= 1
                continue
            with acc.accumulate(model):
                loss = model(batch).loss
                if extra_loss is not None:
                    extra = extra_loss()
                    if extra is not None:
                        loss = loss + extra
                if not torch.isfinite(loss.detach()).all():  # stop before a NaN step spoils the weights
                    phase = desc.split()[-1] if desc else ""
                    knob = f"train.{phase}'s learning rates" if phase in ("align", "instruct", "realign") else "the learning rate"
                    raise MeraError(f"{desc}: the training loss is {loss.detach().float().item()} at step "
                                    f"{result.steps + 1} of {total_steps} (micro-batch {done_micro + 1}); training "
                                    f"stopped before that step (lower {knob}, or check the data)")
                acc.backward(loss)
                if acc.sync_gradients and max_grad_norm:
                    acc.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach().float().item())
            done_micro += 1
            if acc.sync_gradients or done_micro == total_micro:
                result.losses.append(sum(window) / len(window))
                window = []
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
                if (checkpoint is not None and checkpoint.every and result.steps % checkpoint.every == 0
                        and done_micro < total_micro and acc.is_main_process):
                    _save_state(checkpoint, params, optimizer, scheduler, epoch_gen,
                                {"done_micro": done_micro, "epoch_start": epoch_start, "losses": result.losses,
                                 "steps": result.steps, "complete": False})
                fault_point("train_step")
            if done_micro >= total_micro:
                break
    if checkpoint is not None and acc.is_main_process:
        _save_state(checkpoint, params, optimizer, scheduler, epoch_gen,
                    {"done_micro": done_micro, "epoch_start": epoch_start, "losses": result.losses,
                     "steps": result.steps, "complete": True})
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
