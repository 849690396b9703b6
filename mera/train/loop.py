"""The one training loop (on accelerate) used by every phase: align, instruct, realign.

Readable in one sitting: seeded data order, AdamW with per-group learning rates, cosine
schedule with linear warmup, gradient accumulation to reach the effective batch size,
gradient clipping, an optional extra loss term (a strategy's penalty), a progress bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


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
    bar = tqdm(total=total_steps, desc=desc, disable=not progress or not acc.is_local_main_process, leave=False)
    while done_micro < total_micro:
        for batch in loader:
            with acc.accumulate(model):
                loss = model(batch).loss
                if extra_loss is not None:
                    extra = extra_loss()
                    if extra is not None:
                        loss = loss + extra
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
            if done_micro >= total_micro:
                break
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result
