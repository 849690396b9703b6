"""A method in a config: a name and a list of plug-ins (strategies and at most one merge rule).

    methods:
      - {name: Fine-Tuning, strategies: [finetune]}
      - {name: MERA (10%), strategies: [cma, {name: realign, ratio: 0.1}]}
      - {name: EWC, strategies: [{name: ewc, lam: 100, fisher_ratio: 0.01}]}

An item is a plug-in's name, or ``{name: ..., <its parameters>}``; the parameters are
validated against the plug-in's pydantic model, and the combination is checked when the
config loads, before anything trains (:func:`check_combination`: one merge rule, at most one
strategy that declares an LLM policy, no merge rule where there is no adapter delta to merge or
where the delta must stay whole).

The first release's shorthands are still read: ``merge`` is ``cma``; ``replay_ratio`` sets the
ratio of ``replay`` and of ``realign`` (``realign_ratio`` overrides the latter),
``ewc_lambda`` / ``fisher_ratio`` set ``ewc``'s ``lam`` / ``fisher_ratio`` and
``pathweave_in_rank`` sets ``pathweave``'s ``in_rank``. The resolved config (config.yaml of
a run) lists every plug-in with all its parameters.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from mera.config import registry
from mera.config.base import StrictModel
from mera.continual.strategies import LLMPolicy, llm_policy
from mera.errors import ConfigError

# legacy key -> [(plug-in, parameter)] it sets when the plug-in is in the list
LEGACY = {
    "replay_ratio": [("replay", "ratio"), ("realign", "ratio")],
    "realign_ratio": [("realign", "ratio")],
    "ewc_lambda": [("ewc", "lam")],
    "fisher_ratio": [("ewc", "fisher_ratio")],
    "pathweave_in_rank": [("pathweave", "in_rank")],
}


def resolve(name: str) -> registry.Entry:
    """The merge rule or strategy called ``name`` (ValueError naming both kinds' plug-ins); a plug-in
    package that fails to load raises its own ConfigError (naming its entry point and the failure)."""
    for kind in ("merge", "strategy"):
        try:
            return registry.lookup(kind, name)
        except registry.UnknownPlugin:
            continue
    import difflib

    known = sorted(set(registry.names("merge") + registry.names("strategy") + ["merge"]))
    close = difflib.get_close_matches(str(name), known, n=1)
    raise ValueError(f"unknown strategy {name!r} ({f'did you mean {close[0]!r}? ' if close else ''}"
                     f"known: {', '.join(known)})")


class MethodConfig(StrictModel):
    name: str
    strategies: list[str | dict] = Field(default_factory=lambda: ["finetune"])
    # the first release's shorthands (see the module docstring); not written back
    replay_ratio: float | None = Field(None, exclude=True)
    ewc_lambda: float | None = Field(None, exclude=True)
    fisher_ratio: float | None = Field(None, exclude=True)
    realign_ratio: float | None = Field(None, exclude=True)
    pathweave_in_rank: int | None = Field(None, exclude=True)

    @field_validator("replay_ratio", "realign_ratio", "fisher_ratio")
    @classmethod
    def _ratio(cls, v, info):
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"{info.field_name} must be in (0, 1] (a share: 0.1 is 10%)")
        return v

    @field_validator("pathweave_in_rank")
    @classmethod
    def _rank(cls, v):
        if v is not None and v < 1:
            raise ValueError("pathweave_in_rank must be >= 1")
        return v

    @field_validator("strategies")
    @classmethod
    def _items(cls, v):
        if not v:
            raise ValueError("a method needs at least one strategy (e.g. [finetune])")
        out = []
        for item in v:
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item.get("name"), str):
                raise ValueError(f"an item {item!r} has no name: write {{name: <plug-in>, ...parameters}}")
            entry = resolve(item["name"])
            out.append({**item, "name": entry.name})
        return out

    @model_validator(mode="after")
    def _resolve(self):
        items = [{"name": x} if isinstance(x, str) else dict(x) for x in self.strategies]
        # the shorthands fill in parameters of the plug-ins present (an explicit one wins)
        for key in ("replay_ratio", "realign_ratio", "ewc_lambda", "fisher_ratio", "pathweave_in_rank"):
            value = getattr(self, key)
            if value is None:
                continue
            for plugin, param in LEGACY[key]:
                for it in items:
                    explicit = key == "realign_ratio" or param not in it
                    if it["name"] == plugin and explicit:
                        it[param] = value
        resolved = []
        for it in items:
            entry = resolve(it["name"])
            opts = {k: v for k, v in it.items() if k != "name"}
            try:
                params = registry.parse_params(entry, opts, f"method {self.name!r}")
            except ConfigError as e:  # raised as a ValueError, pydantic names the file and methods.<i>
                raise ValueError(str(e)) from None
            resolved.append({"name": entry.name, **(params.model_dump() if params is not None else {})})
        check_combination(self.name, resolved)
        object.__setattr__(self, "strategies", resolved)  # no re-validation loop (validate_assignment)
        for key in LEGACY:
            object.__setattr__(self, key, None)
        return self

    @property
    def names(self) -> list[str]:
        return [x["name"] for x in self.strategies]


def check_combination(method: str, items: list[dict]) -> None:
    """ValueError (one line naming the method, the plug-ins and what to do) unless every plug-in of
    ``items`` can act: one merge rule at most, one strategy at most that declares how step B trains
    the LLM, and no merge rule other than ``finetune`` where there is no adapter delta to merge
    (an ``OWN_MODULES`` or ``FROZEN`` strategy) or where the delta must be folded whole; and unless
    each strategy's ``check_method`` accepts the method."""
    names = [x["name"] for x in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method {method!r}: {', '.join(dup)} listed twice")
    entries = [resolve(n) for n in names]
    merges = [e.name for e in entries if e.kind == "merge"]
    if len(merges) > 1:
        raise ValueError(f"method {method!r}: {' and '.join(merges)} are both merge rules (they decide how the "
                         "stage's LLM delta is folded); keep one")
    try:
        policies = {e.name: llm_policy(e) for e in entries if e.kind == "strategy"}
    except ConfigError as e:
        raise ValueError(str(e)) from None
    for e, item in zip(entries, items):  # a strategy's own refusal of this method (Strategy.check_method)
        check = getattr(e.obj, "check_method", None) if e.kind == "strategy" and isinstance(e.obj, type) else None
        if check is not None:
            try:
                params = registry.parse_params(e, {k: v for k, v in item.items() if k != "name"}, f"method {method!r}")
            except ConfigError as err:
                raise ValueError(str(err)) from None
            check(method, params)
    deciding = [(n, p) for n, p in policies.items() if p is not None]
    if len(deciding) > 1:
        said = " and ".join(f"{n} (LLMPolicy.{p.name})" for n, p in deciding)
        raise ValueError(f"method {method!r}: {said} both decide how step B trains the LLM (only the first would "
                         "act); keep one")
    merge = merges[0] if merges else None
    if merge is None or merge == "finetune":
        return
    for n, p in deciding:
        if p in (LLMPolicy.OWN_MODULES, LLMPolicy.FROZEN):
            what = "trains its own LLM modules" if p is LLMPolicy.OWN_MODULES else "keeps the LLM frozen"
            raise ValueError(f"method {method!r}: {n} {what} (LLMPolicy.{p.name}), so no adapter delta is left "
                             f"for the merge rule {merge} to fold and it would never run; drop {merge}")
    whole = [e.name for e in entries if e.kind == "strategy" and e.info.get("whole_delta")]
    if whole:
        raise ValueError(f"method {method!r}: {whole[0]} keeps its LLM change whole, so the merge rule "
                         f"{merge} cannot apply; drop one of them")


def build_method(method: MethodConfig):
    """(strategies in config order, the merge rule) of a validated method."""
    strategies, merge = [], None
    for item in method.strategies:
        entry = resolve(item["name"])
        opts = {k: v for k, v in item.items() if k != "name"}
        obj = registry.build(entry.kind, entry.name, opts, f"method {method.name!r}")
        if entry.kind == "merge":
            merge = obj
        else:  # a factory's product too carries its registered name (it enters the step's content key)
            obj.name, obj.llm_policy = entry.name, llm_policy(entry)
            strategies.append(obj)
    if merge is None:
        merge = registry.build("merge", "finetune")
    return strategies, merge
