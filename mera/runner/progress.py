"""Progress of a run with ``--workers N``, shown by the main process from the workers' events.

Each worker process sends small events through a multiprocessing queue (mera.runner.workers):

    {"kind": "unit", "worker": pid, "unit": "sequential / Fine-Tuning + MERA (10%)"}   a unit starts
    {"kind": "stage", "worker": pid, "what": "MERA (10%): stage 2 point"}              a stage starts
    {"kind": "step", "worker": pid, "phase": "instruct", "step": 12, "total": 36}     a step (or "eval image" 1/2)
    {"kind": "log", "worker": pid, "msg": "..."}                                       a log line

:class:`Board` keeps the state they describe and the units done (told by the pool, which knows
when a unit ends); on a terminal :class:`LiveDisplay` draws it with rich (one line per worker:
unit, stage, phase, step / total; and an overall line: units done / total, elapsed, ETA), else
:class:`PlainDisplay` prints the log lines and, at each unit's end, the overall line.
"""

from __future__ import annotations

import queue as queue_mod
import sys
import time
from dataclasses import dataclass


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class WorkerState:
    unit: str = ""
    what: str = ""
    phase: str = ""
    step: int = 0
    total: int = 0


class Board:
    """What the workers are doing and how far the run is. ``units``: name -> weight (its stages to
    train, a guess of its cost for the ETA), in the order planned."""

    def __init__(self, units: dict[str, float], clock=time.monotonic):
        self.units = dict(units)
        self.done: list[str] = []
        self.workers: dict[int, WorkerState] = {}  # pid -> state
        self.slots: dict[int, int] = {}  # pid -> 1, 2, ... in the order first heard from
        self.clock = clock
        self.t0 = clock()

    def handle(self, ev: dict) -> str | None:
        """Take one event; returns the log line it carries, if any."""
        pid = ev.get("worker", 0)
        if pid not in self.slots:
            self.slots[pid] = len(self.slots) + 1
            self.workers[pid] = WorkerState()
        w = self.workers[pid]
        kind = ev.get("kind")
        if kind == "log":
            return ev.get("msg", "")
        if kind == "unit":
            self.workers[pid] = WorkerState(unit=ev.get("unit", ""))
        elif kind == "stage":
            w.what, w.phase, w.step, w.total = ev.get("what", ""), "", 0, 0
        elif kind == "step" and w.unit not in self.done:  # a late event of a finished unit changes nothing
            w.phase, w.step, w.total = ev.get("phase", ""), int(ev.get("step", 0)), int(ev.get("total", 0))
        return None

    def unit_done(self, name: str) -> None:
        if name not in self.done:
            self.done.append(name)
        for w in self.workers.values():
            if w.unit == name:
                w.what, w.phase, w.step, w.total = "done", "", 0, 0

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        """Seconds left: the elapsed time scaled by the weight left over the weight done."""
        done = sum(self.units.get(u, 1.0) for u in self.done)
        left = sum(w for u, w in self.units.items() if u not in self.done)
        if left == 0:
            return 0.0
        return None if done == 0 else self.elapsed() * left / done

    def overall_line(self) -> str:
        return (f"{len(self.done)}/{len(self.units)} units done, {_clock(self.elapsed())} elapsed, "
                f"ETA {_clock(self.eta())}")

    def worker_lines(self) -> list[str]:
        out = []
        for pid, slot in sorted(self.slots.items(), key=lambda x: x[1]):
            w = self.workers[pid]
            step = f"{w.phase} {w.step}/{w.total}" if w.phase else ""
            out.append("  ".join(x for x in (f"worker {slot}", f"[{w.unit}]" if w.unit else "idle", w.what, step) if x))
        return out

    def renderable(self):
        """The rich renderable of the board: one line per worker, then the overall line with a bar."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        rows = Table.grid(padding=(0, 2))
        for pid, slot in sorted(self.slots.items(), key=lambda x: x[1]):
            w = self.workers[pid]
            rows.add_row(Text(f"worker {slot}", style="bold"), Text(w.unit or "idle", style="cyan"), Text(w.what),
                         Text(f"{w.phase} {w.step}/{w.total}" if w.phase else "", style="green"))
        total = sum(self.units.values()) or 1.0
        done = sum(self.units.get(u, 1.0) for u in self.done)
        overall = Table.grid(padding=(0, 2))
        overall.add_row(ProgressBar(total=total, completed=done, width=30), Text(self.overall_line()))
        return Group(rows, overall)


class PlainDisplay:
    """Not a terminal: the workers' log lines as they come, the overall line at each unit's end."""

    def __init__(self, board: Board, log):
        self.board, self.log = board, log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def event(self, ev: dict) -> None:
        msg = self.board.handle(ev)
        if msg is not None:
            self.log(msg)

    def unit_done(self, name: str) -> None:
        self.board.unit_done(name)
        self.log(f"[{self.board.overall_line()}]")


class LiveDisplay(PlainDisplay):
    """A terminal: the board drawn live with rich on stderr; log lines printed above it."""

    def __init__(self, board: Board, log, console=None):
        super().__init__(board, log)
        from rich.console import Console

        self.console = console or Console(stderr=True)

    def __enter__(self):
        from rich.live import Live

        self.live = Live(_Board(self.board), console=self.console, refresh_per_second=4, transient=True,
                         redirect_stdout=False, redirect_stderr=False)
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)
        return False

    def _print(self, msg: str) -> None:
        # on the terminal the board is drawn on, a line goes above it (printing past rich would tear
        # the board); when stdout is elsewhere (a file) it goes there, as without the board
        if self.console.file.isatty() and sys.stdout.isatty():
            self.live.console.print(msg, markup=False, highlight=False)
        else:
            self.log(msg)

    def event(self, ev: dict) -> None:
        msg = self.board.handle(ev)
        if msg is not None:
            self._print(msg)

    def unit_done(self, name: str) -> None:
        self.board.unit_done(name)
        self._print(f"[{self.board.overall_line()}]")


class _Board:
    """Rendered afresh at each refresh of the Live display."""

    def __init__(self, board: Board):
        self.board = board

    def __rich__(self):
        return self.board.renderable()


def drain(q, display) -> None:
    """Pass every event waiting in ``q`` to ``display``."""
    while True:
        try:
            ev = q.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        display.event(ev)
