"""``--workers N``: independent units of a run (experts, then (order, method) chains) in N
spawned processes, each with its share of the config's CPU threads.

Each worker builds a loop of the class of the loop it is given (a class reaches a spawned process
by name, and is imported there): this module has no import of mera.runner.loop, which imports it.
Each unit writes only its own folders (DONE last), so the run directory stays valid whatever
finishes first; the first failure stops the pool and is raised in the parent. The workers' log
lines and progress go to the parent through a queue (mera.runner.progress), and the parent
profiles the final models once the pool has ended (a profile taken while others train is noisy).
"""

from __future__ import annotations

import os
from pathlib import Path

_LOOP = None  # this worker process's StageLoop (set up once: tokenizer, encoders, data, features)


def run_parallel(loop, phases: list[list]) -> None:
    """Run each list of units of ``phases`` in a pool of ``loop.workers`` processes, one list after
    the other (a list starts when the one before is done: the experts, then the chains built on
    them); the pool's processes, their loaded assets and feature caches serve every list. Each
    process builds a loop of its own, of ``loop``'s class (StageLoop).

    The workers send their progress and log lines to this process through a queue
    (mera.runner.progress): on a terminal (``loop.progress``) a live board, one line per worker
    and an overall line; else the log lines and, at each unit's end, the overall line. They leave
    the final models' inference profiles to this process, after the pool
    (``StageLoop.profile_finals``)."""
    import concurrent.futures
    import multiprocessing

    import torch

    from mera.runner.progress import Board, LiveDisplay, PlainDisplay, drain

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
    events = ctx.Queue()
    board = Board({u.name(loop.cfg): _weight(loop.dir, u) for todo in todos for u in todo})
    display = LiveDisplay(board, loop.log) if loop.progress else PlainDisplay(board, loop.log)
    with display, concurrent.futures.ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_worker_init,
            initargs=(type(loop), loop.cfg, str(loop.out), str(loop.config_dir), threads, events)) as pool:
        for todo in todos:
            futures = {pool.submit(_worker_run, u): u for u in todo}
            pending = set(futures)
            try:
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.25,
                                                            return_when=concurrent.futures.FIRST_COMPLETED)
                    drain(events, display)
                    for f in done:
                        f.result()
                        display.unit_done(futures[f].name(loop.cfg))
            except BaseException:
                # stop at once: the other workers' unfinished stages have no DONE and are redone
                # by --resume (every file is written atomically, so killing them loses nothing
                # finished). ProcessPoolExecutor has no public way to stop running tasks.
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
                drain(events, display)
                raise
        drain(events, display)


def _weight(rd, unit) -> float:
    """A unit's stages to train (an expert: 1; a chain: its methods' stages but the expert's copy): the ETA's guess
    of its cost."""
    if unit.kind == "expert":
        return 1.0
    return float(max(1, sum(not st.is_expert for k in unit.methods for st in rd.chain(unit.order, rd.cfg.methods[k]))))


def _worker_init(loop_class, cfg, out: str, config_dir: str, threads: int, events) -> None:
    global _LOOP
    import warnings

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=FutureWarning)
    pid = os.getpid()

    def send(ev: dict) -> None:
        events.put({**ev, "worker": pid})

    # the log lines go to the main process too, which prints them (or not: its own log decides)
    loop = loop_class(cfg, out, config_dir=Path(config_dir), resume=True, progress=False,
                      log=lambda msg: send({"kind": "log", "msg": msg}))
    loop.threads = threads
    loop.events = send
    loop.defer_profile = True  # measured by the main process once the pool has ended
    loop.setup()
    _LOOP = loop


def _worker_run(unit) -> None:
    loop = _LOOP
    tag = f"[{unit.name(loop.cfg)}]"  # lines of parallel units interleave: tag the indented ones with their unit
    send = loop.events
    loop.log = lambda msg: send({"kind": "log", "msg": f"{tag}{msg}" if msg.startswith(" ") else msg})
    loop.run_unit(unit)
