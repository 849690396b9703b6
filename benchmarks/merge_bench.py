"""Factored CMA merge (W += dW / i, one rank-r product per linear layer) versus dense
averaging of two full state dicts, on a randomly initialised Llama of >= 0.5B parameters.

    python benchmarks/merge_bench.py [--hidden 1024 --layers 28 --rank 128 --stage 2]

Each variant runs in its own subprocess (same model, same LoRA delta) so that peak memory
is measured cleanly: a thread samples the process's resident memory during the merge.
Prints time and peak extra memory of each, and their ratios (dense / factored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, rss_bytes())


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mera.continual.merges import dense_average
    from mera.continual.merges.cma import cma_coefficient
    from mera.train.lora import fold_lora

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        llm = LlamaForCausalLM(cfg)
    llm = llm.to_empty(device="cpu")
    for p in llm.parameters():  # cheap random init (the values do not matter for timing)
        p.data.uniform_(-0.02, 0.02)
    n_params = sum(p.numel() for p in llm.parameters())
    g = torch.Generator().manual_seed(1)
    delta = {}
    for name, mod in llm.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            o, i = mod.weight.shape
            delta[name] = {"A": torch.randn(args.rank, i, generator=g) * 0.01,
                           "B": torch.randn(o, args.rank, generator=g) * 0.01, "scaling": 1.0}
    coef = cma_coefficient(args.stage)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if args.variant == "factored":
            fold_lora(llm, delta, coef)
        else:  # materialise theta_vanilla (a second full copy), then average the two state dicts
            prev = llm.state_dict()
            vanilla = {k: v.clone() for k, v in prev.items()}
            for name, d in delta.items():
                vanilla[f"{name}.weight"] += d["scaling"] * (d["B"] @ d["A"])
            merged = dense_average([prev, vanilla], [1 - coef, coef])
            llm.load_state_dict(merged)
        seconds = time.perf_counter() - t0
    return {"variant": args.variant, "params": n_params, "seconds": seconds, "peak_extra_bytes": mem.peak - mem.base}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--variant", choices=["factored", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    res = {}
    for v in ("factored", "dense"):
        cmd = [sys.executable, __file__, "--variant", v, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--rank", str(args.rank), "--stage", str(args.stage)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[v] = json.loads(out)
    f, d = res["factored"], res["dense"]
    gb = 1024**3
    print(f"Llama, {f['params'] / 1e9:.2f}B parameters (fp32), LoRA rank {args.rank} on every linear layer, stage {args.stage}")
    print(f"{'variant':10s} {'time (s)':>9s} {'peak extra memory (GiB)':>24s}")
    for r in (f, d):
        print(f"{r['variant']:10s} {r['seconds']:9.2f} {r['peak_extra_bytes'] / gb:24.2f}")
    print(f"ratio dense/factored: time {d['seconds'] / f['seconds']:.1f}x, "
          f"peak extra memory {d['peak_extra_bytes'] / max(f['peak_extra_bytes'], 1):.1f}x")


if __name__ == "__main__":
    main()
