"""The judge cache's lookup time and memory against its size, in one run.

    python benchmarks/judge_cache_bench.py [--small 1000] [--large 100000] [--lookups 2000]

Fills two caches (mera.eval.llm_judge.JudgeCache: an indexed SQLite table) with ``--small`` and
``--large`` records of realistic size, then times ``--lookups`` lookups (hits and misses) and one
insert in each, each in a fresh JudgeCache as a new evaluation opens it, and measures the peak
Python memory of that evaluation (tracemalloc). Prints both and the ratios large/small, which stay
near 1 when the cost is flat in the cache's size. No network, no judge.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


def fill(folder: Path, n: int) -> list[str]:
    from mera.eval.llm_judge import JudgeCache, cache_key

    cache = JudgeCache(folder)
    keys = []
    db = cache._conn()
    rows = []
    for i in range(n):
        k = cache_key(f"question {i}: what is shown?", [f"answer {i}"], f"prediction {i}", "openai:judge-mini")
        keys.append(k)
        rows.append((k, '{"key":"%s","judge":"openai:judge-mini","reply":"{\'pred\': \'yes\', \'score\': 4}",'
                        '"pred":"yes","score":4.0,"judgement":1.0,"question":"q","answers":["a"],"prediction":"p"}' % k))
    db.execute("BEGIN")
    db.executemany("INSERT INTO judgements VALUES (?, ?)", rows)
    db.execute("COMMIT")
    cache.close()
    return keys


def evaluation(folder: Path, keys: list[str], lookups: int) -> tuple[float, float]:
    """(seconds, peak MiB) of one evaluation: open the cache, look up, store one new reply."""
    from mera.eval.llm_judge import JudgeCache

    rng = random.Random(0)
    asked = [rng.choice(keys) for _ in range(lookups // 2)] + [f"missing-{i}" for i in range(lookups // 2)]
    tracemalloc.start()
    t0 = time.perf_counter()
    cache = JudgeCache(folder)
    hits = sum(cache.get(k) is not None for k in asked)
    cache.put({"key": "new", "judgement": 1.0, "reply": "{'pred': 'yes', 'score': 5}"})
    cache.close()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert hits == lookups // 2
    return seconds, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--lookups", type=int, default=2000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mera-judge-cache-bench-"))
    res = {}
    for name, n in (("small", args.small), ("large", args.large)):
        keys = fill(base / name, n)
        runs = [evaluation(base / name, keys, args.lookups) for _ in range(3)]
        res[name] = (min(r[0] for r in runs), max(r[1] for r in runs), (base / name / "judgements.sqlite").stat().st_size)
    for name, n in (("small", args.small), ("large", args.large)):
        s, m, size = res[name]
        print(f"  {n:>7} records ({size / 2**20:6.1f} MiB on disk): {args.lookups} lookups + 1 insert in {s * 1000:7.1f} ms, "
              f"peak {m:5.2f} MiB")
    print(f"ratio large/small: time {res['large'][0] / res['small'][0]:.2f}x, memory {res['large'][1] / res['small'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
