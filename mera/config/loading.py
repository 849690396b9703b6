"""YAML configs validated by pydantic, with ``key=value`` overrides and readable errors.

    cfg = load_config("configs/toy/demo.yaml", ["train.instruct.lr_lora=3e-3"], RunConfig)

Errors name the file, the field and what was expected; unknown keys are errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mera.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, second: int):
        super().__init__(f"duplicate key {key!r} (lines {first} and {second}); a later one would silently replace "
                         "the earlier")
        self.problem, self.problem_mark = str(self), None


class _Alias(yaml.YAMLError):
    def __init__(self, line: int):
        super().__init__(f"an alias (*name) at line {line}; mera's configs do not use YAML anchors and aliases "
                         "(nested aliases can expand a small file into billions of values): write the values out")
        self.problem, self.problem_mark = str(self), None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last) and
    any alias (the "billion laughs" expansion)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise _Alias(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
            except TypeError:  # an unhashable key: the base loader gives its own error
                break
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read the config ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> ``(["train", "lr"], 1e-4)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.align.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; pydantic turns numeric strings into floats where a float is expected.
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any, origin: str) -> None:
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, keys[: i + 1], origin)]
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {origin!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys, origin)] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, path: list[str], origin: str) -> int:
    try:
        idx = int(key)
        node[idx]
        return idx
    except (ValueError, IndexError):
        raise ConfigError(
            f"override {origin!r}: {'.'.join(path)} must index a list of {len(node)} items"
        ) from None


def _unwrap(t: Any) -> Any:
    """``X | None`` -> ``X``."""
    import types
    import typing

    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return t


def _known_keys(schema: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the config section at ``loc`` (``()``: the top level), or [] if unknown."""
    import typing

    node: Any = schema
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return []
            node = field.annotation
        elif typing.get_origin(node) in (dict, list) and typing.get_args(node):
            node = typing.get_args(node)[-1]  # dict[str, X] by key, list[X] by index: X
        else:
            return []
    node = _unwrap(node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def format_validation_error(source: str, err: ValidationError, schema: type[BaseModel] | None = None) -> str:
    import difflib

    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]  # our validators' own messages, without pydantic's prefix
        if e["type"] == "extra_forbidden":
            known = _known_keys(schema, tuple(e["loc"][:-1]))
            hint = ""
            if known:
                close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
                hint = f" ({f'did you mean {close[0]!r}? ' if close else ''}known keys: {', '.join(known)})"
            parts.append(f"{loc}: unknown key{hint}")
        elif e["type"] == "missing":
            parts.append(f"{loc}: required field is missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or (isinstance(got, str) and repr(got) in msg) else f" (got {got!r})"
            parts.append(f"{loc}: {msg}{shown}" if loc else msg)  # a whole-config check names its fields
    return f"{source}: " + "; ".join(parts)


def validate(data: dict, schema: type[M], source: str) -> M:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e, schema)) from None


_VAR = re.compile(r"\$\{paths\.([A-Za-z0-9_]+)\}")


def interpolate_paths(data: dict, source: str) -> dict:
    """Replace ``${paths.NAME}`` in every string of ``data`` by ``data["paths"][NAME]``.

    ``paths`` is where a config names the folders a user sets once (``paths.models``,
    ``paths.data``); ``key=value`` overrides of ``paths.*`` are applied before this. The
    ``paths`` section itself is kept (it is part of the resolved config).
    """
    paths = data.get("paths") or {}
    if not isinstance(paths, dict):
        raise ConfigError(f"{source}: paths: expected a mapping of names to folders")
    for k, v in paths.items():
        if not isinstance(v, str):
            raise ConfigError(f"{source}: paths.{k}: expected a string, got {v!r}")
        if _VAR.search(v):
            raise ConfigError(f"{source}: paths.{k}: a path may not refer to another path")

    def sub(node, where):
        if isinstance(node, str):
            def repl(m):
                if m.group(1) not in paths:
                    raise ConfigError(f"{source}: {where}: ${{paths.{m.group(1)}}} is not defined "
                                      f"(defined: {', '.join(sorted(paths)) or 'none'}); set it in the config's "
                                      f"'paths' section or with paths.{m.group(1)}=DIR")
                return paths[m.group(1)]
            return _VAR.sub(repl, node)
        if isinstance(node, dict):
            return {k: (v if where == "" and k == "paths" else sub(v, f"{where}.{k}".lstrip("."))) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v, f"{where}.{i}") for i, v in enumerate(node)]
        return node

    return sub(data, "")


def load_config(path: str | Path | None, overrides: list[str] | None, schema: type[M]) -> M:
    """Read ``path`` (YAML), apply ``overrides`` (``a.b=value``), substitute ``${paths.NAME}``,
    validate against ``schema``."""
    data = read_yaml(path) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value, text)
    source = str(path) if path is not None else "config"
    if isinstance(data, dict) and "paths" in data:
        data = interpolate_paths(data, source)
    return validate(data, schema, source)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a repeated value out again rather than as an alias (the loader refuses aliases)."""

    def ignore_aliases(self, data):
        return True


def dump_config(cfg: BaseModel) -> str:
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_NoAliasDumper, sort_keys=False)
