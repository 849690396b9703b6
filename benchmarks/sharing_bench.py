"""A grid with shared training steps against the same grid training every stage, in one session.

    python benchmarks/sharing_bench.py [--workers 2] [--modalities image video audio] [--keep DIR]

The toy paper grid (configs/toy/paper_grid.yaml: its 13 methods) on a shorter order, one seed,
run twice: ``share: false`` (every method trains every stage) and ``share: true`` (a step that
another method already trained identically is reused: mera.continual.sharing). Prints both wall
times, the ratio, how many stage steps were trained and reused, and whether the two scores.csv
are byte-identical (they must be). Needs the toy zoo (``mera toy build``, or ``make demo`` once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run(base: Path, share: bool, workers: int, modalities: list[str]) -> float:
    cfg = yaml.safe_load((ROOT / "configs/toy/paper_grid.yaml").read_text())
    cfg.pop("seeds", None)
    cfg.update(seed=0, share=share, orders={"sequential": modalities})
    path = base / f"share_{share}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mera", "run", str(path), "--out", str(base / f"share_{share}"), "--quiet",
                    "--workers", str(workers)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT / "configs/toy")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modalities", nargs="+", default=["image", "video", "audio"])
    ap.add_argument("--keep", default=None, help="keep the two run directories here")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mera-sharing-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "mera", "toy", "build"], check=True, stdout=subprocess.DEVNULL)
    off = run(base, False, args.workers, args.modalities)
    on = run(base, True, args.workers, args.modalities)
    same = (base / "share_False/scores.csv").read_bytes() == (base / "share_True/scores.csv").read_bytes()
    reused = trained = 0
    for f in (base / "share_True").glob("sequential/*/stage_*/manifest.json"):
        m = json.loads(f.read_text())
        if m.get("stage", 1) > 1:
            reused += "shared" in m.get("log", {})
            trained += "shared" not in m.get("log", {})
    print(f"grid: 13 methods, order {' -> '.join(args.modalities)}, one seed, --workers {args.workers}")
    print(f"  share: false  {off:7.1f} s  (every method trains every stage)")
    print(f"  share: true   {on:7.1f} s  ({trained} stage steps trained, {reused} reused)")
    print(f"  scores identical: {same}")
    print(f"ratio unshared/shared wall time: {off / on:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
