"""What measuring a stage's peak memory costs its training, on a CPU.

    python benchmarks/peak_memory_bench.py [--reps 10] [--batches 40]

The toy image instruct phase's first ``--batches`` micro-batches (benchmarks/loop_parity.py's
plain loop, one torch thread, as a worker of ``mera run --workers 2`` trains), interleaved
``--reps`` times: with no measurement, inside ``PeakMemory`` on the kernel's high-water mark
(what a stage's ``Cost`` uses on Linux), and inside the fallback that samples the resident set
from a thread every 5 ms (what it used before). Prints the medians, each one's ratio to no
measurement, and the peaks both measured. Needs the toy zoo (``mera toy build``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loop_parity  # noqa: E402  (this folder's benchmark: the same phase, batches and loop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "mera", "toy", "build"], check=True, stdout=subprocess.DEVNULL)
    from mera.eval import profile

    torch.set_num_threads(1)
    cfg, a, model, groups = loop_parity.setup("image")
    batches = loop_parity.plain_batches(cfg, a, model, list(a.sets["image"].train), 1234)[:args.batches]
    loop_parity.plain_loop(cfg, model, groups, batches[:5], 1)  # warm-up
    hwm_ok = profile._hwm_bytes() is not None and profile._reset_hwm()

    def sampled():
        orig = profile._reset_hwm
        profile._reset_hwm = lambda: False  # the fallback: a thread samples /proc/self/statm
        try:
            return profile.PeakMemory()
        finally:
            profile._reset_hwm = orig

    kinds = {"no measurement": contextlib.nullcontext, "sampled every 5 ms (before)": sampled}
    if hwm_ok:
        kinds["kernel high-water mark (now)"] = profile.PeakMemory
    times: dict[str, list[float]] = {k: [] for k in kinds}
    peaks: dict[str, float] = {}
    for _ in range(args.reps):  # interleaved: the machine's noise falls on every kind alike
        for name, make in kinds.items():
            ctx = make()
            with ctx:
                t0 = time.perf_counter()
                loop_parity.plain_loop(cfg, model, groups, batches, 1)
                times[name].append(time.perf_counter() - t0)
            if hasattr(ctx, "peak_mib"):
                peaks[name] = ctx.peak_mib
    base = statistics.median(times["no measurement"])
    print(f"image instruct phase, {len(batches)} micro-batches, 1 thread, {args.reps} interleaved repetitions (medians)")
    for name, ts in times.items():
        m = statistics.median(ts)
        peak = f"   peak {peaks[name]:.0f} MiB" if name in peaks else ""
        print(f"  {name:30s} {m:6.2f} s   ratio to none {m / base:.3f}{peak}")
    if not hwm_ok:
        print("  (no resettable VmHWM here: PeakMemory samples, as the fallback above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
