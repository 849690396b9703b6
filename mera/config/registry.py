"""One registry for every kind of plug-in: strategy, merge, encoder, connector, judge.

A plug-in is one file. It registers itself under its kind and name, with a pydantic model
of its parameters declared next to its code::

    from mera.config.registry import register
    from mera.config.base import StrictModel

    class EMAParams(StrictModel):
        beta: float = 0.5

    @register("merge", "ema", EMAParams)
    class EMA:
        def __init__(self, params: EMAParams): ...

A config names a plug-in and gives its parameters (``{name: ema, beta: 0.9}``); they are
validated against the model when the config loads, and the error names the plug-in, the
parameter and what was expected.

The built-in plug-ins of a kind are found by importing every module of the kind's package
(``mera.continual.merges`` for merges, ...): a new file there is picked up with no other
change. Plug-ins outside mera register from the ``mera.plugins`` entry-point group of an
installed package: an entry names a module whose import registers them (or a function without
arguments, called once); every entry is loaded when a kind is first looked up.

Registering a class sets its ``name`` to the registered name (the name a config gives, which
enters a strategy's content key). A kind may add a check of its own that every registration
passes (:func:`on_register`: strategies check their declared LLM policy there). An unknown name
raises :class:`UnknownPlugin`; an entry point that fails to load raises a ConfigError naming the
entry point, its target and the failure, and is tried again on the next lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from mera.errors import ConfigError

# kind -> the packages (or modules) whose modules register the built-in plug-ins of that kind
PACKAGES: dict[str, tuple[str, ...]] = {
    "strategy": ("mera.continual.strategies",),
    "merge": ("mera.continual.merges",),
    "encoder": ("mera.model.encoders",),
    "connector": ("mera.model.connectors",),
    "judge": ("mera.eval.judges", "mera.eval.llm_judge"),
}
KINDS = tuple(PACKAGES)


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any  # the class or factory; called as obj(params) (or obj(**params) for factories that ask so)
    params: type[BaseModel] | None
    aliases: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)  # kind-specific facts (e.g. a strategy's slots)


class UnknownPlugin(ConfigError):
    """No plug-in of the kind has the name (or alias) looked up."""


_ENTRIES: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
_ALIASES: dict[str, dict[str, str]] = {k: {} for k in KINDS}
_CHECKS: dict[str, list[Callable[[Entry], None]]] = {k: [] for k in KINDS}
_LOADED: set[str] = set()  # kinds whose built-ins and entry points all loaded
_LOADING: set[str] = set()  # kinds being loaded (a plug-in module that looks a plug-in up while imported)
_EPS_DONE: set[tuple[str, str]] = set()  # (name, target) of the entry points loaded


def register(kind: str, name: str, params: type[BaseModel] | None = None, *, aliases: tuple[str, ...] = (),
             **info) -> Callable:
    """Decorator: register a class or factory as the plug-in ``name`` of ``kind``; a class's ``name``
    is set to ``name``. ``info``: kind-specific facts (checked by the kind's :func:`on_register` checks,
    which raise ConfigError naming the plug-in)."""
    if kind not in _ENTRIES:
        raise ValueError(f"unknown plug-in kind {kind!r}; kinds: {', '.join(KINDS)}")

    def deco(obj):
        entry = Entry(kind, name, obj, params, tuple(aliases), dict(info))
        for check in _CHECKS[kind]:
            check(entry)
        if isinstance(obj, type):
            obj.name = name
        _ENTRIES[kind][name] = entry
        for a in aliases:
            _ALIASES[kind][a] = name
        return obj

    return deco


def on_register(kind: str, check: Callable[[Entry], None]) -> None:
    """Run ``check(entry)`` on every plug-in of ``kind`` registered from now on and on those registered
    already: it may complete ``entry.info`` (and the class) or raise ConfigError naming the plug-in."""
    if check in _CHECKS[kind]:
        return
    _CHECKS[kind].append(check)
    for entry in list(_ENTRIES[kind].values()):
        check(entry)


def _load(kind: str) -> None:
    """Import the built-in modules of ``kind`` and the installed plug-in packages' entry points (until
    they all load: a failed entry point raises again on the next lookup)."""
    if kind in _LOADED or kind in _LOADING:
        return
    _LOADING.add(kind)
    try:
        for pkg_name in PACKAGES[kind]:
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{mod.name}")
        _load_entry_points()
    finally:
        _LOADING.discard(kind)
    _LOADED.add(kind)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="mera.plugins"):
        if (ep.name, ep.value) in _EPS_DONE:
            continue
        try:
            target = ep.load()
            if callable(target) and not isinstance(target, type):  # a registration function
                target()
        except Exception as e:  # a broken third-party plug-in names itself, not a traceback
            raise ConfigError(f"plug-in entry point {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(e).__name__}: {e}") from None
        _EPS_DONE.add((ep.name, ep.value))


def names(kind: str) -> list[str]:
    _load(kind)
    return sorted(_ENTRIES[kind])


def lookup(kind: str, name: str) -> Entry:
    """The entry of ``name`` (or an alias of it); UnknownPlugin naming the known ones otherwise."""
    _load(kind)
    key = _ALIASES[kind].get(name, name)
    if key not in _ENTRIES[kind]:
        import difflib

        known = names(kind)
        close = difflib.get_close_matches(str(name), known + sorted(_ALIASES[kind]), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownPlugin(f"unknown {kind} {name!r} ({hint}known: {', '.join(known)})")
    return _ENTRIES[kind][key]


def parse_params(entry: Entry, options: dict | None, source: str) -> BaseModel | None:
    """Validate ``options`` against the entry's parameter model (ConfigError naming ``source``)."""
    options = dict(options or {})
    if entry.params is None:
        if options:
            raise ConfigError(f"{source}: {entry.kind} {entry.name!r} takes no parameters, got "
                              f"{', '.join(sorted(options))}")
        return None
    try:
        return entry.params.model_validate(options)
    except ValidationError as e:
        from mera.config.loading import format_validation_error

        raise ConfigError(format_validation_error(f"{source} ({entry.kind} {entry.name!r})", e, entry.params)) from None


def build(kind: str, name: str, options: dict | None = None, source: str = "config"):
    """``obj(params)`` for the plug-in ``name`` of ``kind`` with validated ``options``."""
    entry = lookup(kind, name)
    params = parse_params(entry, options, source)
    return entry.obj(params) if params is not None else entry.obj()
