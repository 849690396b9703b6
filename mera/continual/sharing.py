"""Training steps shared between methods: a step trained once is reused by every method that
would train it identically.

A stage's *step* is its training before the fold: step A, the adapter, step B and what the
strategies do around them (mera.continual.training). Its result does not depend on the method's
name, only on its inputs, so its *content key* hashes exactly those:

- the parent stage's state key (its LLM, its strategies' state and modules and its history of
  trained deltas: mera.continual.checkpoint), the run seed, the stage's seed, stage and modalities;
- every strategy's ``training_key`` (name and parameters; none for one that acts only after the
  stage, such as realign) and the weights of the connectors its training reads (``reads``: an
  earlier modality's connector only where its data passes through it, e.g. replay);
- the model and training recipe of the config.

Step A alone (the new connector on the new modality's captions, through the parent's frozen
model) has a key of its own, without the strategies (``align_key``): at stage 2 every method of
the grid starts from the same expert and trains step A once.

The merge rule is not part of it: the fold comes after the step. So in the paper's grid
Fine-Tuning, Merge only, MERA (1%), MERA (10%) and Realign only train stage 2 once; Fine-Tuning
and Realign only every stage once, Merge only and the two MERAs every stage once; EWC and
PathWeave with and without realign likewise. Replay + Realign differs from Replay after stage 2
(its replayed data passes through realigned connectors), and its key says so.

The store is ``<run>/.shared/<key>/``: a stage-like checkpoint of the step's result (the folds the
step made itself, the trained delta before the merge, the connectors it changed, the strategies'
state and modules, its log, its training curve and time) plus DONE, written under a temporary name and renamed: two
workers that train the same step at once both finish, and the first rename wins; ``--resume``
finds only complete entries. A reused step is logged in the stage's manifest (``shared``) and its
training time counts in the efficiency table as if trained. ``share: false`` turns it off; the
scores are the same either way (tests/test_sharing.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mera.continual import checkpoint as ckpt
from mera.continual.deltas import Delta
from mera.errors import CheckpointError

KEY_VERSION = 1


def connector_digest(model, modality: str) -> str:
    return ckpt.tensor_digest(model.branches[modality].connector.state_dict())


def _recipe(assets) -> dict:
    """The training recipe of a key: ``train`` without ``report_to`` (where the curves are sent
    changes nothing trained; keys stay those of runs written before the option existed)."""
    return assets.cfg.train.model_dump(mode="json", exclude={"report_to"})


def step_key(assets, ctx, strategies: list) -> str | None:
    """The content key of the step ``ctx`` is about to train (None: its parent has no state key,
    a stage written before keys existed, so nothing is shared)."""
    parent = ckpt.state_key(ctx.history.folder if ctx.history is not None else None)
    if parent is None:
        return None
    sigs, reads = [], set()
    for s in strategies:
        k = s.training_key(ctx)
        if k is not None:
            sigs.append(k)
            reads |= set(s.reads(ctx))
    payload = {
        "v": KEY_VERSION, "parent": parent, "run_seed": assets.cfg.seed, "seed": ctx.seed, "stage": ctx.stage,
        "modality": ctx.modality, "seen": list(ctx.seen), "strategies": sigs,
        "connectors": {m: connector_digest(ctx.model, m) for m in sorted(reads)},
        "model": assets.cfg.model.model_dump(mode="json"), "train": _recipe(assets),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def align_key(assets, ctx) -> str | None:
    """The content key of step A alone (the new connector on captions through the parent's frozen
    model): the parent's state key, the seeds, the modality and the recipe; no strategy enters it."""
    parent = ckpt.state_key(ctx.history.folder if ctx.history is not None else None)
    if parent is None:
        return None
    payload = {"v": KEY_VERSION, "step": "align", "parent": parent, "run_seed": assets.cfg.seed, "seed": ctx.seed,
               "stage": ctx.stage, "modality": ctx.modality, "seen": list(ctx.seen),
               "model": assets.cfg.model.model_dump(mode="json"), "train": _recipe(assets)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StepResult:
    """What a step leaves besides the model itself (see mera.continual.training)."""

    own: bool  # the LLM trained as a strategy's own modules (no merge of a delta)
    pre_folds: list = field(default_factory=list)  # (Delta, coef) folded by the step itself, in order
    trained: Delta | None = None  # the delta step B trained (before the merge rule)
    seconds: float = 0.0


class StepStore:
    """``<run>/.shared``: finished steps by content key. ``root`` None: sharing off; ``writer``:
    whether this process writes entries (the main process of a launch)."""

    def __init__(self, root: Path | None, writer: bool = True):
        self.root = Path(root) if root is not None else None
        self.writer = writer

    def get(self, key: str | None) -> Path | None:
        if self.root is None or key is None:
            return None
        folder = self.root / key
        return folder if ckpt.is_done(folder) else None

    def put(self, key: str | None, result: StepResult, ctx, changed: dict, by: str, log: dict | None = None,
            tensors: dict | None = None, curve: list[dict] | None = None) -> None:
        """Record ``result`` (``changed``: the connectors the step changed, modality -> state; ``log``
        and ``tensors``: ctx's unless given; ``curve``: the step's phases, their losses, learning rates
        and gradient norms per optimizer step, so that a stage reusing it logs what it would have
        trained: mera.runner.telemetry)."""
        if self.root is None or key is None or not self.writer or self.get(key) is not None:
            return
        tmp = self.root / f".tmp-{uuid.uuid4().hex[:12]}"
        try:
            ckpt.save_stage(tmp, parent=None, folds=result.pre_folds, trained=result.trained, connectors=changed,
                            tensors=dict(ctx.tensors) if tensors is None else tensors,
                            info={"kind": "step", "what": "align" if log is not None else "step", "key": key,
                                  "own": result.own, "by": by,
                                  "log": ctx.log if log is None else log,
                                  "seconds": round(result.seconds, 3), "llm_modules": ctx.llm_modules,
                                  **({"curve": curve} if curve is not None else {})})
            ckpt.mark_done(tmp)
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # another process recorded the same step first: same content
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def load_step(folder: Path) -> tuple[StepResult, dict, dict, dict]:
    """(result, connectors changed, strategy tensors, manifest) of a stored step; everything is
    read before anything is changed (a damaged entry raises CheckpointError and changes nothing)."""
    m = ckpt.read_manifest(folder)
    trained = ckpt.load_trained(folder)
    result = StepResult(own=bool(m.get("own")), pre_folds=ckpt.load_folds(folder),
                        trained=trained[0] if trained else None, seconds=float(m.get("seconds") or 0.0))
    if not isinstance(m.get("log"), dict) or any(d is None for d, _ in result.pre_folds):
        raise CheckpointError(f"{folder / ckpt.MANIFEST}: not a shared step of this release")
    return result, ckpt.load_connectors(folder), ckpt.load_strategy_tensors(folder), m
