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

**The LLM policy.** A strategy that decides how step B trains the LLM declares it, an
:class:`LLMPolicy`, as the class attribute ``llm_policy`` or at registration
(``register("strategy", "ewc", EWCParams, llm=LLMPolicy.CONTINUED_ADAPTER)``; the first
release's strings ``"own"`` / ``"continued"`` are read too, any other value is a registration
error naming the plug-in). A strategy that leaves the LLM to the others (replay, realign)
declares nothing. ``whole_delta=True`` at registration says the strategy's LLM delta must be
folded whole. The config loader refuses a method whose parts cannot all act
(mera.continual.methods): two strategies that declare a policy, or a merge rule other than
``finetune`` beside an ``OWN_MODULES`` or ``FROZEN`` strategy (no adapter delta to merge) or a
``whole_delta`` one. A strategy may refuse more per method with the class method
``check_method(method, params)`` (PathWeave: a protocol that must show in the method's name).

**Own LLM modules.** A strategy that trains its own modules (``OWN_MODULES``) saves their layout
in ``ctx.llm_modules``, a dict whose ``kind`` is the strategy's registered name, and their weights
in ``ctx.tensors``. Three hooks let the rest of mera use a stage of it without knowing the
strategy: the class method ``install(llm, layout, tensors, route)`` rebuilds the modules when a
stage is loaded (mera.continual.stages), the class method ``export_check(layout)`` says why a stage
cannot be exported as a plain model (mera.interop.export; by default the class attribute
``export_refusal``), and ``plan_counts(shapes, stage)`` counts their parameters for ``mera plan``
(:class:`OwnModuleCounts`). :func:`layout_owner` finds the strategy of a saved layout.

Two class attributes say what a stage's training depends on, so that a step two methods train
identically is trained once (mera.continual.sharing): ``only_after_stage = True`` (the strategy
changes nothing before the fold: realign) and ``reads_old_modalities = False`` (its training
never passes an earlier modality's data through that modality's connector: PathWeave; by default
a strategy is assumed to, e.g. replay). ``training_key(ctx)`` and ``reads(ctx)`` refine them per
stage (EWC reads the previous modality only where it estimates a Fisher from it); ``restore(ctx)``
rebuilds a strategy's own LLM modules from ``ctx.llm_modules`` / ``ctx.tensors`` when a step is
reused instead of trained. A third-party strategy that keeps the defaults is never wrongly
shared: its registered name, its parameters and every earlier connector enter the key.

Strategies see a :class:`StageContext`, never the run loop or the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable

import torch

from mera.config import registry
from mera.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from mera.continual.deltas import Delta
    from mera.data.format import Sample
    from mera.model.mllm import MultimodalLM
    from mera.train.loop import PhaseResult
    from mera.train.plan import Shapes


class LLMPolicy(str, Enum):
    """How a strategy's stages train the LLM (its values are the registration keywords' strings)."""

    FRESH_ADAPTER = "fresh"  # a fresh LoRA each stage, its delta handed to the merge rule (no strategy: this)
    CONTINUED_ADAPTER = "continued"  # the same adapter trained again each stage (EWC)
    OWN_MODULES = "own"  # the strategy's own LLM modules instead of a LoRA (PathWeave)
    FROZEN = "frozen"  # the LLM stays frozen: step B trains the connectors only, nothing to merge


def _policy(value, where: str) -> "LLMPolicy | None":
    """``value`` (an LLMPolicy, one of its strings or names, or None) as an LLMPolicy; ConfigError naming ``where``."""
    if value is None or isinstance(value, LLMPolicy):
        return value
    for p in LLMPolicy:
        if isinstance(value, str) and value in (p.value, p.name, p.name.lower()):
            return p
    raise ConfigError(f"{where}: llm={value!r} is not an LLM policy; use one of "
                      + ", ".join(f"LLMPolicy.{p.name}" for p in LLMPolicy))


def _check_registration(entry: "registry.Entry") -> None:
    """A strategy's declared LLM policy (``llm=`` at registration or the class's ``llm_policy``) as an
    LLMPolicy in ``entry.info["llm"]`` (and on the class); a bad value names the plug-in."""
    where = f"strategy plug-in {entry.name!r}"
    declared = _policy(entry.info.get("llm"), where)
    on_class = _policy(getattr(entry.obj, "llm_policy", None), where) if isinstance(entry.obj, type) else None
    if declared is not None and on_class is not None and declared != on_class \
            and "llm_policy" in vars(entry.obj):
        raise ConfigError(f"{where}: registered with llm={declared.name} but its class declares "
                          f"llm_policy = {on_class.name}; declare it once")
    policy = declared if declared is not None else on_class
    entry.info["llm"] = policy
    if isinstance(entry.obj, type):
        entry.obj.llm_policy = policy


def llm_policy(entry: "registry.Entry") -> "LLMPolicy | None":
    """The LLM policy a registered strategy declares (None: it leaves the LLM to the others)."""
    return _policy(entry.info.get("llm"), f"strategy plug-in {entry.name!r}")


@dataclass
class OwnModuleCounts:
    """What a strategy's own LLM modules weigh in one phase of ``mera plan`` (mera.runner.plan)."""

    label: str  # the plan's name of the modules (a column of its trainable / frozen parameters)
    trainable: int  # parameters step B trains
    frozen: int  # parameters of the modules it keeps frozen
    lora_copies: int  # LoRA-sized adapters the activations pass through (the memory estimate's)
    note: str = ""  # a line for the plan's notes


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

    name = "strategy"  # set to the registered name by register() (and on a factory's product by build_method)
    llm_policy: LLMPolicy | None = None  # how step B trains the LLM; None: the strategy does not decide it
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

    # ---- a strategy with its own LLM modules (OWN_MODULES); the defaults suit the LoRA strategies

    # why a stage whose LLM holds the strategy's own modules cannot be exported (export_check's answer)
    export_refusal: str | None = "its LLM holds modules of its own that cannot be folded into a plain HF model"

    @classmethod
    def install(cls, llm: torch.nn.Module, layout: dict, tensors: dict, route=None) -> None:
        """Rebuild the strategy's own modules on ``llm`` (the base LLM with the chain's folds) from a
        stage folder's ``layout`` (the manifest's ``llm_modules``) and ``tensors`` (its
        strategy.safetensors); ``route``: the model's ``batch_modalities``."""
        raise CheckpointError(f"strategy {cls.name!r} saved LLM modules of its own but has no install hook "
                              "to rebuild them")

    @classmethod
    def export_check(cls, layout: dict) -> str | None:
        """None if a stage whose LLM holds this strategy's modules (``layout``) can be exported as a plain
        model, else why not (mera export prints it): ``export_refusal`` unless a strategy decides per layout."""
        return cls.export_refusal

    @classmethod
    def check_method(cls, method: str, params) -> None:
        """Called when a config loads, for each method that lists this strategy (``method``: its name,
        ``params``: the strategy's validated parameters, or None): raise ValueError, one line naming
        the method and what to do, to refuse it. By default every method is accepted."""

    def plan_counts(self, shapes: "Shapes", stage: int) -> OwnModuleCounts | None:
        """The strategy's own LLM modules when stage ``stage`` (1-based, >= 2) trains them, for
        ``mera plan``; None (the default): step B trains a LoRA."""
        return None


def layout_owner(layout: dict, where: str) -> type[Strategy]:
    """The registered strategy class whose own LLM modules ``layout`` describes (its ``kind``: the
    strategy's registered name); CheckpointError naming ``where`` otherwise."""
    kind = layout.get("kind") if isinstance(layout, dict) else None
    if not isinstance(kind, str):
        raise CheckpointError(f"{where}: the manifest's llm_modules name no strategy (no 'kind')")
    try:
        entry = registry.lookup("strategy", kind)
    except registry.UnknownPlugin:
        raise CheckpointError(f"{where}: the stage's LLM holds modules of the strategy {kind!r}, which is not "
                              f"installed (strategies: {', '.join(registry.names('strategy'))})") from None
    if not (isinstance(entry.obj, type) and issubclass(entry.obj, Strategy)):
        raise CheckpointError(f"{where}: the strategy {kind!r} that saved the stage's LLM modules is not a "
                              "Strategy class, so it has no hooks to rebuild them")
    return entry.obj


registry.on_register("strategy", _check_registration)

__all__ = ["Continue", "InstructStep", "LLMPolicy", "OwnModuleCounts", "OwnModules", "StageContext", "Strategy",
           "layout_owner", "llm_policy"]
