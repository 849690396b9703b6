"""A method in a config: a name and a list of plug-ins (strategies and at most one merge rule).

    methods:
      - {name: Fine-Tuning, strategies: [finetune]}
      - {name: MERA (10%), strategies: [cma, {name: realign, ratio: 0.1}]}
      - {name: EWC, strategies: [{name: ewc, lam: 100, fisher_ratio: 0.01}]}

An item is a plug-in's name, or ``{name: ..., <its parameters>}``; the parameters are
validated against the plug-in's pydantic model, and the combination is checked (one merge
rule, one strategy that decides how the LLM trains, no merge rule on a delta that must stay
whole) when the config loads, before anything trains.

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
    """The merge rule or strategy called ``name`` (ValueError naming both kinds' plug-ins)."""
    for kind in ("merge", "strategy"):
        try:
            return registry.lookup(kind, name)
        except Exception:
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
    """ValueError (one line) unless the plug-ins of ``items`` can be combined."""
    names = [x["name"] for x in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method {method!r}: {', '.join(dup)} listed twice")
    entries = [resolve(n) for n in names]
    merges = [e.name for e in entries if e.kind == "merge"]
    if len(merges) > 1:
        raise ValueError(f"method {method!r}: {' and '.join(merges)} are both merge rules (they decide how the "
                         "stage's LLM delta is folded); keep one")
    llm = [e.name for e in entries if e.kind == "strategy" and e.info.get("llm")]
    if len(llm) > 1:
        raise ValueError(f"method {method!r}: {' and '.join(llm)} both decide how step B trains the LLM; keep one")
    whole = [e.name for e in entries if e.kind == "strategy" and e.info.get("whole_delta")]
    if whole and merges and merges[0] != "finetune":
        raise ValueError(f"method {method!r}: {whole[0]} keeps its LLM change whole, so the merge rule "
                         f"{merges[0]} cannot apply; drop one of them")


def build_method(method: MethodConfig):
    """(strategies in config order, the merge rule) of a validated method."""
    strategies, merge = [], None
    for item in method.strategies:
        entry = resolve(item["name"])
        opts = {k: v for k, v in item.items() if k != "name"}
        obj = registry.build(entry.kind, entry.name, opts, f"method {method.name!r}")
        if entry.kind == "merge":
            merge = obj
        else:
            strategies.append(obj)
    if merge is None:
        merge = registry.build("merge", "finetune")
    return strategies, merge
