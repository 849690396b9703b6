"""The on-disk dataset format, shared by the toy world and the real data sets.

A dataset file is a LLaVA-style JSON list. One sample::

    {
      "id": "image_qa_test_00012",
      "modality": "image",                  # image | video | audio | point
      "task": "qa",                         # caption | qa
      "media": "media/qa_test/00012.png",   # relative to the JSON file (or absolute);
                                            # a video is a list of frame files
      "conversations": [
        {"from": "human", "value": "<image>\\nwhat colour is the circle ?"},
        {"from": "gpt", "value": "red"}
      ],
      "references": ["red"],                # acceptable answers / reference captions (optional)
      "meta": {...}                         # optional free-form JSON object (provenance)
    }

The human turn holds exactly one placeholder, the one of its modality (``<image>``,
``<video>``, ``<audio>``, ``<point>``); the gpt turn holds none. ``references``
defaults to ``[answer]``. Every problem is a :class:`~mera.errors.DataError` that names
the file, the sample and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mera import MODALITIES, PLACEHOLDERS
from mera.errors import DataError
from mera.io import write_text

TASKS = ("caption", "qa")
_KEYS = ("id", "modality", "task", "media", "conversations", "references", "meta")
_REQUIRED = ("id", "modality", "task", "media", "conversations")


@dataclass
class Sample:
    """One sample in memory. ``media`` is an absolute path (a list of them for video frames)."""

    id: str
    modality: str
    task: str
    media: str | list[str]
    prompt: str  # the human turn, placeholder included
    answer: str  # the gpt turn
    references: list[str] | None = None  # None -> [answer]
    meta: dict | None = field(default=None, compare=True)

    def __post_init__(self):
        if not self.references:
            self.references = [self.answer]


def _check_placeholders(text: str, modality: str) -> str | None:
    """Why ``text`` is not a valid human turn for ``modality``, or None."""
    own = PLACEHOLDERS[modality]
    n = text.count(own)
    if n != 1:
        return f"the human turn must contain exactly one {own!r}, found {n}"
    others = [p for m, p in PLACEHOLDERS.items() if m != modality and p in text]
    if others:
        return f"the human turn of {'an' if modality[0] in 'aeiou' else 'a'} {modality} sample must not contain {others}"
    return None


def _parse(raw, i: int, base: Path, where: str) -> Sample:
    sid = raw.get("id") if isinstance(raw, dict) else None
    tag = f"{where}: sample {i}" + (f" (id {sid!r})" if isinstance(sid, str) else "")

    def bad(msg: str):
        raise DataError(f"{tag}: {msg}")

    if not isinstance(raw, dict):
        bad(f"must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        bad(f"missing field(s) {missing}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        bad(f"unknown field(s) {unknown}; allowed: {list(_KEYS)}")
    if not isinstance(sid, str) or not sid:
        bad("'id' must be a non-empty string")
    modality = raw["modality"]
    if modality not in MODALITIES:
        bad(f"'modality' must be one of {list(MODALITIES)}, got {modality!r}")
    task = raw["task"]
    if task not in TASKS:
        bad(f"'task' must be one of {list(TASKS)}, got {task!r}")

    media = raw["media"]
    if isinstance(media, str):
        if not media:
            bad("'media' must not be empty")
        media_abs: str | list[str] = os.path.normpath(base / media)
    elif isinstance(media, list) and modality == "video":
        if not media or not all(isinstance(m, str) and m for m in media):
            bad("'media' of a video must be a non-empty list of frame file paths (strings)")
        media_abs = [os.path.normpath(base / m) for m in media]
    else:
        kind = "a path string or, for video, a list of frame paths" if modality == "video" else "a path string"
        bad(f"'media' must be {kind}, got {type(media).__name__}")

    conv = raw["conversations"]
    if not isinstance(conv, list) or len(conv) != 2:
        bad("'conversations' must be a list of two turns: [{'from': 'human', ...}, {'from': 'gpt', ...}]")
    for j, (turn, who) in enumerate(zip(conv, ("human", "gpt"))):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            bad(f"'conversations'[{j}] must be an object with exactly the keys 'from' and 'value'")
        if turn["from"] != who:
            bad(f"'conversations'[{j}]['from'] must be {who!r}, got {turn['from']!r}")
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            bad(f"'conversations'[{j}]['value'] must be a non-empty string")
    prompt, answer = conv[0]["value"], conv[1]["value"]
    why = _check_placeholders(prompt, modality)
    if why:
        bad(why)
    if any(p in answer for p in PLACEHOLDERS.values()):
        bad("the gpt turn must not contain a modality placeholder")

    refs = raw.get("references")
    if refs is not None:
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            bad("'references' must be a non-empty list of non-empty strings")
    meta = raw.get("meta")
    if meta is not None and not isinstance(meta, dict):
        bad("'meta' must be a JSON object")
    return Sample(sid, modality, task, media_abs, prompt, answer, list(refs) if refs else None, meta)


def load_dataset(path: str | os.PathLike, check_media: bool = True) -> list[Sample]:
    """Read and validate a dataset file; media paths become absolute.

    With ``check_media`` every media file must exist (the error names the sample and the file).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: dataset file not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read dataset file ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise DataError(f"{p}: not a dataset file (JSON nested too deeply)") from None
    if not isinstance(raw, list):
        raise DataError(f"{p}: expected a JSON list of samples, got a JSON {type(raw).__name__}")
    base = Path(os.path.abspath(p)).parent
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(raw):
        s = _parse(r, i, base, str(p))
        if s.id in seen:
            raise DataError(f"{p}: sample {i} (id {s.id!r}): duplicate id (also sample {seen[s.id]})")
        seen[s.id] = i
        if check_media:
            for m in [s.media] if isinstance(s.media, str) else s.media:
                if not os.path.isfile(m):
                    raise DataError(f"{p}: sample {i} (id {s.id!r}): media file not found: {m}")
        samples.append(s)
    return samples


def _relative(media: str, base: Path) -> str:
    m = Path(media)
    if not m.is_absolute():
        return m.as_posix()
    try:
        return Path(os.path.relpath(m, base)).as_posix()
    except ValueError:  # another drive (Windows)
        return m.as_posix()


def sample_to_dict(s: Sample, base: Path) -> dict:
    """The JSON object of ``s``, media made relative to ``base`` (the dataset file's folder)."""
    why = _check_placeholders(s.prompt, s.modality) if s.modality in PLACEHOLDERS else "unknown modality"
    if why:
        raise ValueError(f"sample {s.id!r}: {why}")
    if isinstance(s.media, (str, os.PathLike)):
        media: str | list[str] = _relative(s.media, base)
    else:
        media = [_relative(m, base) for m in s.media]
    d = {
        "id": s.id,
        "modality": s.modality,
        "task": s.task,
        "media": media,
        "conversations": [{"from": "human", "value": s.prompt}, {"from": "gpt", "value": s.answer}],
        "references": list(s.references or [s.answer]),
    }
    if s.meta is not None:
        d["meta"] = s.meta
    return d


def write_dataset(path: str | os.PathLike, samples: list[Sample]) -> None:
    """Write ``samples`` as a dataset file (atomically); absolute media paths become relative to it."""
    p = Path(path)
    base = Path(os.path.abspath(p)).parent
    objs = [sample_to_dict(s, base) for s in samples]
    write_text(p, json.dumps(objs, indent=1, ensure_ascii=False) + "\n")
