"""mera's training loop against a minimal PyTorch + PEFT loop, on the very same batches.

    python benchmarks/loop_parity.py [--reps 20] [--modality image] [--epochs 2]

The toy demo's instruct phase of one modality (step B: the new connector and a fresh LoRA on its
captions + QA, train.instruct's recipe): mera's ``train_phase`` as a run calls it (data set,
collator, accelerate) and a plain loop over the same micro-batches collated beforehand (AdamW,
cosine schedule with warmup, gradient accumulation, clipping: nothing else), from the same
initial weights, interleaved ``--reps`` times. Prints both throughputs in trained tokens/s
(labelled and prompt tokens alike: the attention mask's sum), whether the two loops' final
weights agree, and ends with ``ratio mera/plain tokens/s: X.XX``. Needs the toy zoo
(``mera toy build``, or ``make demo`` once).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def setup(modality: str):
    from mera.config import load_config
    from mera.continual.assets import load_assets, seed_for
    from mera.runner.run_config import RunConfig
    from mera.train.lora import attach_lora, lora_parameters

    cfg = load_config(ROOT / "configs/toy/demo.yaml", [], RunConfig)
    a = load_assets(cfg, ROOT / "configs/toy", progress=False)
    model = a.base_model()
    a.add_branch(model, modality)
    model.llm = attach_lora(model.llm, cfg.train.lora, seed_for(0, "lora"))
    params = [{"params": model.connector_parameters(modality), "lr": cfg.train.instruct.lr_connector},
              {"params": list(lora_parameters(model.llm).values()), "lr": cfg.train.instruct.lr_lora}]
    return cfg, a, model, params


def mera_loop(cfg, a, model, groups, samples, seed: int) -> tuple[float, int]:
    from mera.data.pipeline import ItemDataset
    from mera.model.collate import MultimodalCollator
    from mera.train.loop import train_phase

    pc = cfg.train.instruct
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    t0 = time.perf_counter()
    res = train_phase(model, groups, ItemDataset(samples, a.provider), MultimodalCollator(a.tokenizer, model, train=True),
                      batch_size=pc.batch_size, micro_batch_size=pc.micro_batch_size, epochs=pc.epochs,
                      warmup_ratio=pc.warmup_ratio, weight_decay=pc.weight_decay, max_grad_norm=pc.max_grad_norm,
                      seed=seed, progress=False)
    return time.perf_counter() - t0, res.steps


def plain_batches(cfg, a, model, samples, seed: int) -> list[dict]:
    """The micro-batches mera's loop draws (same seeded generator and sampler), collated once."""
    from torch.utils.data import DataLoader

    from mera.data.pipeline import ItemDataset
    from mera.model.collate import MultimodalCollator

    pc = cfg.train.instruct
    micro = min(pc.micro_batch_size or pc.batch_size, pc.batch_size)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ItemDataset(samples, a.provider), batch_size=micro, shuffle=True, generator=gen,
                        collate_fn=MultimodalCollator(a.tokenizer, model, train=True))
    total = max(1, int(round(len(loader) * pc.epochs)))
    out = []
    while len(out) < total:
        for b in loader:
            out.append(b)
            if len(out) == total:
                break
    return out


def plain_loop(cfg, model, groups, batches, seed: int) -> float:
    """A minimal loop: what any PyTorch user would write for this recipe."""
    from transformers import get_cosine_schedule_with_warmup

    pc = cfg.train.instruct
    micro = min(pc.micro_batch_size or pc.batch_size, pc.batch_size)
    accum = max(1, pc.batch_size // micro)
    steps = max(1, math.ceil(len(batches) / accum))
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(groups, weight_decay=pc.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(math.ceil(pc.warmup_ratio * steps)), steps)
    model.train()
    for i, b in enumerate(batches):
        (model(b).loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == len(batches):
            if pc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, pc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--modality", default="image")
    args = ap.parse_args()
    import subprocess

    subprocess.run([sys.executable, "-m", "mera", "toy", "build"], check=True, stdout=subprocess.DEVNULL)
    torch.set_num_threads(2)
    cfg, a, model, groups = setup(args.modality)
    samples = list(a.sets[args.modality].train)
    seed = 1234
    start = {id(p): p.detach().clone() for g in groups for p in g["params"]}

    def reset():
        with torch.no_grad():
            for g in groups:
                for p in g["params"]:
                    p.copy_(start[id(p)])
                    p.grad = None

    batches = plain_batches(cfg, a, model, samples, seed)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    mera_s, plain_s, steps = [], [], 0
    from mera.model import collate

    for _ in range(args.reps):  # interleaved: the machine's noise falls on both alike
        collate._TOKEN_CACHE.clear()  # mera tokenises within its timing, once per text, as a phase of a run would
        reset()
        s, steps = mera_loop(cfg, a, model, groups, samples, seed)
        mera_s.append(s)
        after_mera = [p.detach().clone() for g in groups for p in g["params"]]
        reset()
        plain_s.append(plain_loop(cfg, model, groups, batches, seed))
        after_plain = [p.detach().clone() for g in groups for p in g["params"]]
    same = all(torch.equal(x, y) for x, y in zip(after_mera, after_plain))
    m, p = statistics.median(mera_s), statistics.median(plain_s)
    print(f"{args.modality} instruct phase: {len(batches)} micro-batches, {steps} optimizer steps, {tokens} tokens, "
          f"{args.reps} interleaved repetitions (medians)")
    print(f"  plain PyTorch + PEFT loop  {p:6.2f} s  {tokens / p:9.0f} tokens/s")
    print(f"  mera train_phase           {m:6.2f} s  {tokens / m:9.0f} tokens/s")
    print(f"  final weights identical: {same}")
    print(f"ratio mera/plain tokens/s: {p / m:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
