"""Training curves and scores as JSON lines (``metrics.jsonl``), and the experiment trackers of
``train.report_to``.

One JSON object a line, in two kinds (the keys in this order; ``loss`` is the optimizer step's
loss averaged over its accumulated micro-batches, ``lr`` the learning rate it stepped with (the
phase's first parameter group: the connector's), ``grad_norm`` the gradient norm before
clipping; null where unknown or not finite)::

    {"type": "train", "seed": 0, "order": "sequential", "method": "MERA (10%)", "stage": 2,
     "modality": "video", "phase": "instruct", "step": 1, "total_steps": 40, "loss": 2.31,
     "lr": 0.0002, "grad_norm": 1.7}
    {"type": "eval", "seed": 0, "order": "sequential", "method": "MERA (10%)", "stage": 2,
     "modality": "video", "eval_modality": "image", "task": "caption", "score": 81.2}

An expert's lines have ``"order": null, "method": "expert", "stage": 1``. Stage 1 of a chain is
its expert (trained once): it has eval lines and no train lines. A stage's train lines are every
phase it trained, in order (align, instruct, then what its strategies train: realign); a stage
that reuses a shared step (mera.continual.sharing) gets the curve stored with the step, so its
lines are those it would have written training it.

Each stage folder (and expert folder) holds its own ``metrics.jsonl``, written before DONE with
the scores (DONE records it; a redone stage rewrites it whole, so a resume never duplicates a
line); ``<run>/metrics.jsonl`` is assembled from them in the plan's order at the end of a run
(:meth:`mera.runner.rundir.RunDir.assemble_metrics`), like ``scores.csv``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mera.errors import ConfigError
from mera.io import write_text

FILE = "metrics.jsonl"


def _num(x) -> float | None:
    """A JSON number: None stays None, and so does a value that is not finite (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class StageId:
    """Whose lines: a stage of a chain, or an expert (``order`` None, ``method`` "expert", stage 1)."""

    seed: int
    order: str | None
    method: str
    stage: int
    modality: str

    def head(self, kind: str) -> dict:
        return {"type": kind, "seed": self.seed, "order": self.order, "method": self.method, "stage": self.stage,
                "modality": self.modality}


def train_line(sid: StageId, phase: str, step: dict) -> dict:
    """One optimizer step (``step``: the dict of train_phase's ``on_step``)."""
    return {**sid.head("train"), "phase": phase, "step": int(step["step"]), "total_steps": int(step["total_steps"]),
            "loss": _num(step["loss"]), "lr": _num(step["lr"]), "grad_norm": _num(step["grad_norm"])}


def train_lines(sid: StageId, curve: list[dict]) -> list[dict]:
    """Every optimizer step of a stage's curve (mera.continual.training.curve_entry, in order)."""
    out = []
    for e in curve:
        n = len(e["losses"])
        for k in range(n):
            out.append(train_line(sid, e["phase"], {"step": k + 1, "total_steps": n, "loss": e["losses"][k],
                                                    "lr": e["lrs"][k], "grad_norm": e["grad_norms"][k]}))
    return out


def eval_lines(sid: StageId, rows: list[dict]) -> list[dict]:
    """The stage's score rows (``modality``, ``task``, ``score``: as in its scores.csv)."""
    return [{**sid.head("eval"), "eval_modality": r["modality"], "task": r["task"], "score": _num(r["score"])}
            for r in rows]


def dumps(lines: list[dict]) -> str:
    return "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines)


def write_lines(path: Path, lines: list[dict]) -> None:
    write_text(path, dumps(lines))


def read_lines(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl file of the run directory ([] when there is none: a stage written
    before the file existed)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------- trackers


def check_trackers(names: list[str]) -> None:
    """Fail before training when a tracker of ``train.report_to`` is not installed (accelerate itself
    would leave it out with a debug message only)."""
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    have = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in have]
    if missing:
        extra = ' (pip install "mera[trackers]")' if "tensorboard" in missing else ""
        raise ConfigError(f"train.report_to: {', '.join(missing)} is not installed{extra}; install it or remove it "
                          "from train.report_to")


class Trackers:
    """The trackers of ``train.report_to``, fed the lines of metrics.jsonl as they are made.

    accelerate's tracker classes are used directly (``LOGGER_TYPE_TO_CLASS``, as ``Accelerator.
    init_trackers`` builds them) rather than through an ``Accelerator(log_with=...)``: the stage
    loop logs, not the training loop (one CPU process steps with plain PyTorch, without an
    Accelerator of its own, and a reused step is logged without training), and an extra
    Accelerator would fix the process state that train_phase's own sets up. The run decides
    which process logs (the main one), so the trackers' own main-process check is switched off.

    One tracker run per expert and per (seed, order, method) chain in this process: tensorboard
    writes under ``<run>/trackers/<same path as the stage folders>/<run name>/``; the others get
    ``project = <run name>``. The step of a value is the chain's count of optimizer steps so far
    (its train lines), so every phase's ``<phase>/loss``, ``<phase>/lr``, ``<phase>/grad_norm``
    and the scores ``eval/<modality>/<task>`` share one axis; ``stage`` is logged with them.
    """

    def __init__(self, names: list[str], run: Path, project: str):
        self.names, self.run, self.project = list(names), Path(run), project
        self.active: list = []
        self.step = 0

    def open(self, folder: Path, steps_before: int = 0) -> None:
        """Start the tracker runs of one expert or chain (``folder``: the expert's folder, or the
        chain's method folder; ``steps_before``: its train lines already logged by an earlier session).
        Nothing without trackers."""
        if not self.names:
            return
        import torch
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        # accelerate's trackers log through its logger, which needs the process state: the one
        # train_phase's Accelerator and mera.dist set up (the same arguments, so nothing changes)
        PartialState(cpu=not torch.cuda.is_available())
        self.close()
        self.step = steps_before
        for name in self.names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if cls.requires_logging_directory:
                t = cls(self.project, str(self.run / "trackers" / Path(folder).relative_to(self.run)))
            else:
                t = cls(self.project)
            t.main_process_only = False  # only the run's main process logs (see the class docstring)
            t.start()
            self.active.append(t)

    def log(self, line: dict) -> None:
        if not self.active:
            return
        if line["type"] == "train":
            self.step += 1
            p = line["phase"]
            values = {f"{p}/{k}": line[k] for k in ("loss", "lr", "grad_norm") if line[k] is not None}
        else:
            values = {f"eval/{line['eval_modality']}/{line['task']}": line["score"]} if line["score"] is not None else {}
        if values:
            values["stage"] = line["stage"]
            for t in self.active:
                t.log(values, step=self.step)

    def close(self) -> None:
        for t in self.active:
            t.finish()
        self.active = []


def step_listener(trackers: Trackers, send, sid: StageId):
    """What hears each optimizer step of a stage (trained or reused: mera.continual.training.
    PhaseTrainer): the trackers, and ``send`` (a worker's progress events); None when nothing listens."""
    if not trackers.names and send is None:
        return None

    def on_step(phase: str, step: dict) -> None:
        trackers.log(train_line(sid, phase, step))
        if send is not None:
            send({"kind": "step", "phase": phase, "step": step["step"], "total": step["total_steps"]})

    return on_step
