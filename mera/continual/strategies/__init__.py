"""Strategies: what a method does around the standard two-step training of a stage.

A strategy is one file in this package that registers itself (kind ``strategy``) with the
pydantic model of its parameters and overrides only the hooks it needs (all optional):

- ``adapter(ctx)``: how step B trains the LLM. None (the default) attaches a fresh LoRA
  adapter; ``Continue(delta, coef)`` trains the given adapter again (taken back out of the
  weights first; EWC); ``OwnModules(params)`` trains the strategy's own LLM modules instead of
  a LoRA (PathWeave; it records any change of the LLM's weights in ``ctx.folds`` and its
  modules in ``ctx.llm_modules`` / ``ctx.tensors``).
- ``prepare_instruct(ctx, step)``: before step B, with the adapter attached: add samples
  (``step.data``), parameter groups (``step.groups``) or loss terms (``step.losses``).
- ``after_instruct(ctx)``: after step B, the adapter still attached (e.g. estimate a Fisher).
- ``after_stage(ctx)``: after the fold, before the checkpoint (e.g. realign the connectors).

The registration's keywords state what a strategy decides, so that a method's combination is
checked when its config loads (mera.continual.methods): ``llm="own" | "continued"`` (it
decides how step B trains the LLM: one such strategy per method) and ``whole_delta=True``
(its LLM delta must be folded whole: no merge rule other than ``finetune`` applies).

Two class attributes say what a stage's training depends on, so that a step two methods train
identically is trained once (mera.continual.sharing): ``only_after_stage = True`` (the strategy
changes nothing before the fold: realign) and ``reads_old_modalities = False`` (its training
never passes an earlier modality's data through that modality's connector: PathWeave; by default
a strategy is assumed to, e.g. replay). ``training_key(ctx)`` and ``reads(ctx)`` refine them per
stage (EWC reads the previous modality only where it estimates a Fisher from it); ``restore(ctx)``
rebuilds a strategy's own LLM modules from ``ctx.llm_modules`` / ``ctx.tensors`` when a step is
reused instead of trained. A third-party strategy that keeps the defaults is never wrongly
shared: its parameters and every earlier connector enter the key.

Strategies see a :class:`StageContext`, never the run loop or the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mera.continual.deltas import Delta
    from mera.data.format import Sample
    from mera.model.mllm import MultimodalLM
    from mera.train.loop import PhaseResult


@dataclass
class Continue:
    """Step B trains this adapter again (folded with ``coef`` so far: it is taken out first)."""

    delta: "Delta"
    coef: float


@dataclass
class OwnModules:
    """Step B trains these parameters of the strategy's own LLM modules instead of a LoRA."""

    params: list[torch.nn.Parameter]


@dataclass
class InstructStep:
    """What step B trains on, open to ``prepare_instruct``."""

    data: list["Sample"]
    groups: list[tuple[str, list[torch.nn.Parameter]]] = field(default_factory=list)  # extra groups, connector lr
    losses: list[Callable[[], "torch.Tensor | None"]] = field(default_factory=list)  # extra loss terms


@dataclass
class StageContext:
    """What a strategy may see and use at one stage."""

    model: "MultimodalLM"
    order: str
    method: str
    stage: int  # 1-based
    modality: str  # the modality learned at this stage
    seen: list[str]  # modalities up to and including this stage, in order
    seed: int
    # train(params or param groups, samples, phase) -> PhaseResult: one phase with the recipe of
    # train.<phase> (its batch size, epochs, schedule; a plain parameter list gets its lr_connector)
    train: Callable[..., "PhaseResult"]
    data: Callable[[str], list["Sample"]]  # training samples of a modality: the current one's (step B's data)
    # replay(modality, r): the r% replay memory of a modality, drawn once per run and modality
    # (mera.continual.replay): all a strategy may use of an earlier modality's data
    replay: Callable[[str, float], list["Sample"]]
    batch: Callable[[list["Sample"]], dict]  # a training batch of samples (features, tokens, labels)
    history: "object | None" = None  # the parent chain: mera.continual.checkpoint.ChainView
    log: dict = field(default_factory=dict)  # what the hooks did (goes into the stage manifest)
    tensors: dict = field(default_factory=dict)  # a strategy's state, saved as strategy.safetensors
    folds: list = field(default_factory=list)  # (Delta, coef) a strategy folded itself (OwnModules)
    llm_modules: dict | None = None  # layout of a strategy's own LLM modules (rebuilt on load)


class Strategy:
    """Base: every hook does nothing. ``params`` are the validated parameters (or None)."""

    name = "strategy"
    only_after_stage = False  # True: the strategy acts only in after_stage (the training is not its)
    reads_old_modalities = True  # False: its training passes no earlier modality's data through a connector

    def __init__(self, params=None):
        self.params = params

    def training_key(self, ctx: StageContext):
        """What this strategy makes of the stage's training (steps A and B, before the fold), as a
        JSON-able value of the step's content key; None if nothing (only_after_stage)."""
        if self.only_after_stage:
            return None
        dump = self.params.model_dump(mode="json") if hasattr(self.params, "model_dump") else self.params
        return {"name": self.name, "params": dump}

    def reads(self, ctx: StageContext) -> list[str]:
        """The earlier modalities whose connectors this stage's training uses (their data passes through
        them, or they are trained): their weights enter the step's content key."""
        return list(ctx.seen[:-1]) if self.reads_old_modalities and not self.only_after_stage else []

    def restore(self, ctx: StageContext) -> None:
        """A reused step: rebuild what training left in the model besides the LLM's folds and the
        connectors (own LLM modules), from ``ctx.llm_modules`` and ``ctx.tensors``."""

    def adapter(self, ctx: StageContext) -> "Continue | OwnModules | None":
        return None

    def prepare_instruct(self, ctx: StageContext, step: InstructStep) -> None:
        pass

    def after_instruct(self, ctx: StageContext) -> None:
        pass

    def after_stage(self, ctx: StageContext) -> None:
        pass


__all__ = ["Continue", "InstructStep", "OwnModules", "StageContext", "Strategy"]
