"""The strategy interface: a few hooks around the standard two-step training of a stage.

The stage loop itself lives in ``mera.continual.runner`` (read it there, in one place).
A method is a list of strategies composed in order (``[merge, realign]`` is MERA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from mera.continual.runner import Runner
    from mera.data.format import Sample
    from mera.model.mllm import MultimodalLM


@dataclass
class StageContext:
    runner: "Runner"
    model: "MultimodalLM"
    order: str
    method: str
    stage: int  # 1-based
    modality: str  # the modality learned at this stage
    seen: list[str]  # modalities up to and including this stage, in order
    seed: int
    parent: "Path | None" = None  # the previous stage's folder (None for an expert)
    log: dict = field(default_factory=dict)  # what the hooks did (goes into the stage manifest)
    tensors: dict = field(default_factory=dict)  # a strategy's state, saved as strategy.safetensors
    # what a strategy that trains its own LLM modules (llm_params) changed in the LLM's weights,
    # as (LoRA delta, coefficient) pairs, and the layout of its modules (rebuilt on load)
    llm_deltas: list = field(default_factory=list)
    llm_modules: dict | None = None


class Strategy:
    """Base: plain fine-tuning. Override only the hooks you need."""

    name = "finetune"

    def before_stage(self, ctx: StageContext) -> None:
        """Called after the new branch is added, before step A (align)."""

    def continue_lora(self, ctx: StageContext):
        """(delta, coef) of the previous stage's adapter to continue in step B instead of a fresh one."""
        return None

    def llm_params(self, ctx: StageContext) -> list[torch.nn.Parameter] | None:
        """The LLM parameters step B trains, for a strategy with its own LLM modules (PathWeave).

        None (the default): a fresh LoRA adapter (or the one ``continue_lora`` returns) is
        attached, trained and folded. Otherwise no LoRA is used; the strategy records any
        change it makes to the LLM's weights in ``ctx.llm_deltas`` and its modules' layout in
        ``ctx.llm_modules`` (their weights in ``ctx.tensors``).
        """
        return None

    def before_instruct(self, ctx: StageContext) -> None:
        """Called with the LoRA adapter attached, before step B."""

    def after_instruct(self, ctx: StageContext) -> None:
        """Called with the trained LoRA adapter still attached, after step B."""

    def instruct_extra_data(self, ctx: StageContext) -> list["Sample"]:
        """Extra samples mixed into step B (e.g. replay of old modalities)."""
        return []

    def instruct_extra_params(self, ctx: StageContext) -> list[tuple[str, list[torch.nn.Parameter]]]:
        """Extra (group name, parameters) trained in step B, e.g. old connectors fed by replayed data."""
        return []

    def extra_loss(self, ctx: StageContext) -> Callable[[], torch.Tensor | None] | None:
        """A penalty added to step B's loss (e.g. EWC); None for none."""
        return None

    def merge_coefficient(self, ctx: StageContext) -> float | None:
        """Coefficient of this stage's LLM delta; None: no opinion (1.0 = plain fine-tuning)."""
        return None

    def after_stage(self, ctx: StageContext) -> None:
        """Called after the delta is folded, before the checkpoint and the evaluation (e.g. realign)."""


class Composite(Strategy):
    """Hooks of several strategies, called in order. At most one may set the merge coefficient."""

    def __init__(self, parts: list[Strategy]):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def before_stage(self, ctx):
        for p in self.parts:
            p.before_stage(ctx)

    def continue_lora(self, ctx):
        conts = [c for c in (p.continue_lora(ctx) for p in self.parts) if c is not None]
        if len(conts) > 1:
            raise ValueError(f"strategies {self.name}: only one may continue the adapter")
        return conts[0] if conts else None

    def llm_params(self, ctx):
        own = [(p.name, r) for p, r in ((p, p.llm_params(ctx)) for p in self.parts) if r is not None]
        if len(own) > 1:
            raise ValueError(f"strategies {self.name}: only one may train its own LLM modules")
        return own[0][1] if own else None

    def before_instruct(self, ctx):
        for p in self.parts:
            p.before_instruct(ctx)

    def after_instruct(self, ctx):
        for p in self.parts:
            p.after_instruct(ctx)

    def instruct_extra_data(self, ctx):
        return [s for p in self.parts for s in p.instruct_extra_data(ctx)]

    def instruct_extra_params(self, ctx):
        return [g for p in self.parts for g in p.instruct_extra_params(ctx)]

    def extra_loss(self, ctx):
        fns = [f for f in (p.extra_loss(ctx) for p in self.parts) if f is not None]
        if not fns:
            return None

        def total():
            terms = [t for t in (f() for f in fns) if t is not None]
            return sum(terms) if terms else None

        return total

    def merge_coefficient(self, ctx):
        coefs = [c for c in (p.merge_coefficient(ctx) for p in self.parts) if c is not None]
        if len(coefs) > 1:
            raise ValueError(f"strategies {self.name} disagree on the merge coefficient")
        return coefs[0] if coefs else None

    def after_stage(self, ctx):
        for p in self.parts:
            p.after_stage(ctx)
