"""`mera run --workers 2` against one process, on the toy demo restricted to two modalities.

    python benchmarks/workers_bench.py [--modalities image video] [--keep DIR]

Runs configs/toy/demo.yaml (experts, fine-tuning and MERA (10%)) twice in the same session,
once with one process and the config's 2 threads, once with 2 worker processes of 1 thread
each, and prints both wall times, their ratio, and whether the two scores.csv are identical.
Needs the toy zoo (`mera toy build`, or `make demo` once).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, workers: int, modalities: list[str]) -> float:
    order = "{sequential: [" + ", ".join(modalities) + "]}"
    cmd = [sys.executable, "-m", "mera", "run", str(ROOT / "configs/toy/demo.yaml"), f"orders={order}",
           "--out", str(out), "--quiet", "--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modalities", nargs="+", default=["image", "video"])
    ap.add_argument("--keep", default=None, help="keep the two run directories here")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mera-workers-bench-"))
    subprocess.run([sys.executable, "-m", "mera", "toy", "build"], check=True, stdout=subprocess.DEVNULL)
    one = run(base / "workers1", 1, args.modalities)
    two = run(base / "workers2", 2, args.modalities)
    same = (base / "workers1/scores.csv").read_bytes() == (base / "workers2/scores.csv").read_bytes()
    print(f"modalities: {' -> '.join(args.modalities)} (experts, Fine-Tuning, MERA (10%))")
    print(f"  1 process, 2 threads     {one:7.1f} s")
    print(f"  2 workers, 1 thread each {two:7.1f} s")
    print(f"  speed-up 1 process / 2 workers: {one / two:.2f}x; scores identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
