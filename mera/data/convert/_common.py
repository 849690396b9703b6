"""Shared pieces of the converters: reading the official files, prompts, subsets, media paths.

Every problem with an input file is a :class:`~mera.errors.DataError` that names the file
and the row (CSV: the line number; JSON: the list index); a bad option is a
:class:`~mera.errors.ConfigError`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from mera import PLACEHOLDERS
from mera.data.format import Sample
from mera.errors import ConfigError, DataError

# The instruction of a caption sample: the human turn is f"{placeholder}\n{instruction}",
# laid out like the toy world's caption prompts ("<image>\ndescribe the image .").
CAPTION_INSTRUCTIONS = {
    "image": "Describe the image briefly.",
    "video": "Describe the video briefly.",
    "audio": "Describe the audio briefly.",
    "point": "Describe the 3D object briefly.",
}


def caption_prompt(modality: str) -> str:
    """The human turn of a caption sample: the placeholder, a newline, the instruction."""
    return f"{PLACEHOLDERS[modality]}\n{CAPTION_INSTRUCTIONS[modality]}"


def qa_prompt(modality: str, question: str) -> str:
    """The human turn of a QA sample: the placeholder, a newline, the question (as the toy world)."""
    return f"{PLACEHOLDERS[modality]}\n{question}"


def clean(text: str, where: str) -> str:
    """Whitespace collapsed to single spaces; a modality placeholder inside the text is an error."""
    t = " ".join(text.split())
    bad = [p for p in PLACEHOLDERS.values() if p in t]
    if bad:
        raise DataError(f"{where}: the text contains the placeholder(s) {bad}, which mera reserves for media")
    return t


def ranked_answers(answers: Sequence[str]) -> list[str]:
    """Distinct answers, most frequent first (ties: first seen first). ``[0]`` is the training target."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    order = {a: i for i, a in reversed(list(enumerate(answers)))}
    return sorted(counts, key=lambda a: (-counts[a], order[a]))


# ------------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a converter gets: the source folder and the user's options."""

    set_name: str
    src: Path
    seed: int = 0
    limit: int | None = None
    media_dir: Path | None = None
    media_pattern: str | None = None
    confidence_filter: bool = True

    @property
    def media_root(self) -> Path:
        return self.media_dir if self.media_dir is not None else self.src

    def size(self, default: int | None) -> int | None:
        """The subset size of a split: ``--limit`` when given, else the paper's (None: every sample)."""
        return self.limit if self.limit is not None else default

    def rng(self) -> random.Random:
        return random.Random(self.seed)


@dataclass
class Part:
    """One split's samples before the media check, with the record of how they were chosen."""

    split: str
    samples: list[Sample] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)
    subset: dict = field(default_factory=dict)
    media_patterns: list[str] = field(default_factory=list)

    def count(self, step: str, n: int) -> None:
        self.counts.append({"step": step, "count": int(n)})


def take_subset(items: list, size: int | None, rng: random.Random) -> tuple[list, dict]:
    """A seeded random subset of ``size`` items, kept in their original order (all when ``size`` is None or larger)."""
    n = len(items)
    if size is None or size >= n:
        return list(items), {"size": size, "from": n, "taken": n, "random": False}
    idx = sorted(rng.sample(range(n), size))
    return [items[i] for i in idx], {"size": size, "from": n, "taken": size, "random": True}


def subset_note(part: Part, ctx: Context, default: int | None, what: str) -> None:
    size = ctx.size(default)
    if size is None:
        part.filters.append(f"no subset: every {what}")
    else:
        src = "--limit" if ctx.limit is not None else "the paper's size"
        part.filters.append(f"random subset of {size} {what}s ({src}), random.Random(seed).sample over the "
                            f"candidates in source order, kept in source order")


# ------------------------------------------------------------------------------- files


def find_file(src: Path, names: Sequence[str], what: str) -> Path:
    """The first of ``names`` found in ``src`` or a folder up to two levels below it."""
    for name in names:
        p = src / name
        if p.is_file():
            return p
    for depth in ("*/", "*/*/"):
        for name in names:
            hits = sorted(h for h in src.glob(depth + name) if h.is_file())
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise DataError(f"{src}: several {what} files found: {[str(h) for h in hits]}; "
                                f"point --src at the folder holding the one to use")
    raise DataError(f"{src}: {what} not found (looked for {list(names)} in it and two folder levels below)")


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def get(obj: Any, key: str, typ: type, where: str) -> Any:
    """``obj[key]``, checked to be of ``typ`` (an int is never a bool)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    v = obj[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise DataError(f"{where}: field {key!r} must be {_TYPE_NAMES.get(typ, typ.__name__)}, "
                        f"got {type(v).__name__} {str(v)[:40]!r}")
    return v


def json_list(obj: Any, key: str | None, path: Path) -> list:
    """``obj[key]`` (or ``obj`` itself when ``key`` is None), checked to be a list."""
    v = obj
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            got = f"keys {sorted(obj)[:10]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise DataError(f"{path}: expected a JSON object with a {key!r} list, got {got}")
        v = obj[key]
    if not isinstance(v, list):
        raise DataError(f"{path}: {key or 'the file'!s} must be a JSON list, got {type(v).__name__}")
    return v


def _open_csv(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _rows(path: Path, f) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(f)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: after line {reader.line_num}: not UTF-8 text ({e})") from None
        if not row or all(not c.strip() for c in row):
            continue
        yield reader.line_num, row


def csv_headerless(path: Path, ncols: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of a CSV without a header; every row must have ``ncols`` cells."""
    with _open_csv(path) as f:
        for line, row in _rows(path, f):
            if len(row) != ncols:
                raise DataError(f"{path}: line {line}: expected {ncols} columns, got {len(row)}: {row[:4]}")
            yield line, row


def csv_records(path: Path, need: Sequence[str], optional: Sequence[Sequence[str]] = ()
                ) -> Iterator[tuple[int, dict[str, str], dict[str, str | None]]]:
    """(line number, needed cells, optional cells) of a headered CSV, columns matched by name.

    Names are matched case-insensitively, surrounding spaces ignored. A needed column that is
    absent is an error listing the columns found. ``optional`` holds alternatives per optional
    column (the first present wins; None when none is). The second element of each yielded
    triple maps the needed names, the third maps each optional group's first name.
    Every row must have as many cells as the header.
    """
    with _open_csv(path) as f:
        rows = _rows(path, f)
        try:
            _, header = next(rows)
        except StopIteration:
            raise DataError(f"{path}: empty CSV file (expected a header with columns {list(need)})") from None
        index = {h.strip().lower(): i for i, h in reversed(list(enumerate(header)))}
        absent = [n for n in need if n.lower() not in index]
        if absent:
            raise DataError(f"{path}: column(s) {absent} not found; columns found: {[h.strip() for h in header]}")
        want = {n: index[n.lower()] for n in need}
        opt = {}
        for names in optional:
            opt[names[0]] = next((index[n.lower()] for n in names if n.lower() in index), None)
        for line, row in rows:
            if len(row) != len(header):
                raise DataError(f"{path}: line {line}: expected {len(header)} columns (as the header), got {len(row)}")
            yield (line, {n: row[i] for n, i in want.items()},
                   {n: (row[i] if i is not None else None) for n, i in opt.items()})


def csv_header(path: Path) -> list[str]:
    """The header cells of a CSV file, stripped ([] for an empty file)."""
    with _open_csv(path) as f:
        for _, header in _rows(path, f):
            return [h.strip() for h in header]
    return []


def csv_has_column(path: Path, names: Sequence[str]) -> bool:
    cols = {h.lower() for h in csv_header(path)}
    return any(n.lower() in cols for n in names)


# ------------------------------------------------------------------------------- media


class Media:
    """Media file paths from name patterns, under the media root (``--media-dir``, default ``--src``).

    A pattern is a :meth:`str.format` template over per-sample fields, relative to the root
    (or absolute). With several default patterns the first whose file exists wins; when none
    does, the first pattern's path is the one reported missing. ``--media-pattern`` replaces
    the defaults with one pattern.
    """

    def __init__(self, ctx: Context, defaults: Sequence[str], fields: Sequence[str]):
        self.root = ctx.media_root
        self.patterns = [ctx.media_pattern] if ctx.media_pattern else list(defaults)
        self.fields = list(fields)
        self.user = bool(ctx.media_pattern)

    def _one(self, pattern: str, values: dict) -> str:
        try:
            rel = pattern.format(**values)
        except (KeyError, IndexError) as e:
            raise ConfigError(f"media pattern {pattern!r}: unknown field {e}; fields: {self.fields}") from None
        except ValueError as e:
            raise ConfigError(f"media pattern {pattern!r}: {e} (fields: {self.fields})") from None
        return os.path.normpath(os.path.abspath(self.root / rel))

    def __call__(self, **values) -> str:
        paths = [self._one(p, values) for p in self.patterns]
        if len(paths) > 1:
            for p in paths:
                if os.path.isfile(p):
                    return p
        return paths[0]

    def check(self) -> None:
        """Fail early on a pattern naming an unknown field."""
        for p in self.patterns:
            for _, name, _, _ in string.Formatter().parse(p):
                if name is not None:
                    base = re.split(r"[.\[]", name, maxsplit=1)[0]
                    if base not in self.fields:
                        raise ConfigError(f"media pattern {p!r}: unknown field {{{name}}}; fields: {self.fields}")
