"""How exactly an 8-stage MERA chain's folds land in a bfloat16 / float16 LLM: the old fold (rounded
to the weight's dtype at every fold) against mera's (an fp32 master copy, rounded once per fold;
mera.train.precision), both against the float64 result.

    python benchmarks/merge_precision.py [--layers q,k,gate] [--rank 128] [--dtypes bfloat16,float16]

Weights of Llama-3-8B's shapes (layer-0 q_proj 4096x4096, k_proj 1024x4096, gate_proj 14336x4096),
random with rms 0.02 (the real model's scale), eight random LoRA deltas of rank ``--rank`` with an
update of rms 1e-3, folded with the coefficients of the merge rules (the expert whole, then 1/2 ...
1/8). Prints per stage the error of what that fold applied (``||W_k - W_{k-1} - c_k dW_k|| / ||c_k
dW_k||``) and of everything applied so far (``||W_k - W_0 - sum|| / ||sum||``), for the old fold, mera's
and the floor (the exact result rounded once to the dtype: no tensor of that dtype is closer), then the
time of the eight folds (both on this machine's CPU, same run) and the master copy's memory.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
COEFS = [1.0] + [1 / i for i in range(2, 9)]


def rel(diff: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return (sum(d.double().pow(2).sum() for d in diff) / sum(r.double().pow(2).sum() for r in ref)).sqrt().item()


def main() -> int:
    from mera.train.lora import fold_delta, lora_delta
    from mera.train.precision import master_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="q,k,gate", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    args = ap.parse_args()
    names = args.layers.split(",")
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(SHAPES[n], generator=g) * 0.02 for n in names}
    deltas = []
    for _ in COEFS:
        stage = {}
        for n in names:
            out_f, in_f = SHAPES[n]
            a, b = torch.randn(args.rank, in_f, generator=g), torch.randn(out_f, args.rank, generator=g)
            b *= 1e-3 / lora_delta(a, b, 1.0).pow(2).mean().sqrt()
            stage[n] = (a, b)
        deltas.append(stage)
    n_params = sum(t.numel() for t in base.values())
    print(f"weights: {', '.join(f'{n} {SHAPES[n][0]}x{SHAPES[n][1]}' for n in names)} ({n_params / 1e6:.1f}M values, "
          f"rms 0.02); 8 LoRA deltas of rank {args.rank}, update rms 1e-3; coefficients 1, 1/2, ..., 1/8")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        w0 = {n: t.to(dtype) for n, t in base.items()}
        old = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in w0.items()}
        new = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in w0.items()}
        exact = {n: t.double() for n, t in w0.items()}
        print(f"\n{dtype_name}: relative error of the applied delta (old fold | mera's | floor)")
        print("  stage  coef    this fold: old     mera    floor     all so far: old     mera    floor")
        seconds = {"old": 0.0, "mera": 0.0}
        for k, (coef, stage) in enumerate(zip(COEFS, deltas), 1):
            prev_old = {n: w.detach().clone() for n, w in old.items()}
            prev_new = {n: w.detach().clone() for n, w in new.items()}
            upd = {n: lora_delta(a, b, coef) for n, (a, b) in stage.items()}
            t0 = time.perf_counter()
            for n, (a, b) in stage.items():  # the old fold: rounded to the dtype at every fold
                d = lora_delta(a, b, coef)
                old[n].data.copy_((old[n].float() + d).to(dtype))
            seconds["old"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for n, (a, b) in stage.items():  # mera's (mera.train.lora.fold_delta)
                fold_delta(new[n], a, b, 1.0, coef)
            seconds["mera"] += time.perf_counter() - t0
            prev_exact = exact
            exact = {n: exact[n] + upd[n].double() for n in names}
            floor = {n: exact[n].to(dtype) for n in names}
            prev_floor = {n: prev_exact[n].to(dtype) for n in names}
            ref_all = [exact[n] - w0[n].double() for n in names]
            this = [upd[n] for n in names]
            row = [rel([old[n].double() - prev_old[n].double() - upd[n].double() for n in names], this),
                   rel([new[n].double() - prev_new[n].double() - upd[n].double() for n in names], this),
                   rel([floor[n].double() - prev_floor[n].double() - upd[n].double() for n in names], this),
                   rel([old[n].double() - exact[n] for n in names], ref_all),
                   rel([new[n].double() - exact[n] for n in names], ref_all),
                   rel([floor[n].double() - exact[n] for n in names], ref_all)]
            print(f"  {k:5d}  1/{round(1 / coef):<3d}  " + "  ".join(f"{x * 100:7.2f}%" for x in row[:3])
                  + "     " + "  ".join(f"{x * 100:7.2f}%" for x in row[3:]))
        bits_equal = all(torch.equal(new[n].detach(), floor[n]) for n in names)
        holder = torch.nn.Module()
        for n, p in new.items():
            holder.register_parameter(n, p)
        mib = master_bytes(holder) / 2**20
        print(f"  after 8 folds: mera's weights equal the floor (exact result rounded once) bit for bit: {bits_equal}"
              f" ({sum(int((new[n].detach() != floor[n]).sum()) for n in names)} of {n_params} values differ)")
        print(f"  time of the 8 folds on the CPU: old {seconds['old']:.2f} s, mera {seconds['mera']:.2f} s "
              f"(ratio mera/old {seconds['mera'] / seconds['old']:.2f}); master copy {mib:.0f} MiB "
              f"(4 bytes x {n_params / 1e6:.1f}M values)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
