"""``--workers N``: independent units of a run (experts, then (order, method) chains) in N
spawned processes, each with its share of the config's CPU threads.

Each unit writes only its own folders (DONE last), so the run directory stays valid whatever
finishes first; the first failure stops the pool and is raised in the parent.
"""

from __future__ import annotations

import os
from pathlib import Path

_LOOP = None  # this worker process's StageLoop (set up once: tokenizer, encoders, data, features)


def run_parallel(loop, phases: list[list]) -> None:
    """Run each list of units of ``phases`` in a pool of ``loop.workers`` processes, one list after
    the other (a list starts when the one before is done: the experts, then the chains built on
    them); the pool's processes, their loaded assets and feature caches serve every list."""
    import concurrent.futures
    import multiprocessing

    import torch

    todos = []
    for units in phases:
        todo = [u for u in units if not loop.dir.unit_done(u)]
        for u in units:
            if u not in todo:
                loop.log(f"[{u.name(loop.cfg)}] done, skipped")
        todos.append(todo)
    if not any(todos):
        return
    n = min(loop.workers, max(len(t) for t in todos))
    threads = max(1, (loop.cfg.threads or torch.get_num_threads()) // n)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has started torch threads
    # when a failure stops the workers, multiprocessing's resource tracker (its own process,
    # which reads PYTHONWARNINGS) would warn about the pool's semaphores: not the user's concern
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                                initargs=(loop.cfg, str(loop.out), str(loop.config_dir),
                                                          threads, loop.verbose)) as pool:
        for todo in todos:
            futures = {pool.submit(_worker_run, u): u for u in todo}
            try:
                for f in concurrent.futures.as_completed(futures):
                    f.result()
            except BaseException:
                # stop at once: the other workers' unfinished stages have no DONE and are redone
                # by --resume (every file is written atomically, so killing them loses nothing
                # finished). ProcessPoolExecutor has no public way to stop running tasks.
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _worker_init(cfg, out: str, config_dir: str, threads: int, verbose: bool) -> None:
    global _LOOP
    import warnings

    from mera.continual.loop import StageLoop

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=FutureWarning)
    loop = StageLoop(cfg, out, config_dir=Path(config_dir), resume=True, progress=False,
                     log=None if verbose else (lambda msg: None))
    loop.threads = threads
    loop.setup()
    _LOOP = loop


def _worker_run(unit) -> None:
    loop = _LOOP
    if loop.verbose:  # lines of parallel units interleave: tag the indented ones with their unit
        tag = f"[{unit.name(loop.cfg)}]"
        loop.log = lambda msg: print(f"{tag}{msg}" if msg.startswith(" ") else msg, flush=True)
    loop.run_unit(unit)
