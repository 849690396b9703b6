"""Converters from the eight real data sets' official files into mera's dataset JSON.

``mera data convert SET --src DIR --out DIR [--split train|test|all] [--skip-missing]
[--seed 0] [--limit N] [--media-dir DIR] [--media-pattern PATTERN] [--no-confidence-filter]``

- ``mscoco`` (image caption, coco.py): ``captions_{train,val}2014.json``; first caption per image;
  test: random 1K of val.
- ``okvqa`` (image QA, coco.py): questions + annotations JSON; most frequent answer; test: random 1K of val.
- ``msvd`` (video caption, msvd.py): ``youtube_mapping.txt`` + the MSR Video Description CSV;
  English only; vid1-1200 train, vid1301-1970 test.
- ``msvd_qa`` (video QA, msvd.py): ``{train,test}_qa.json`` + ``youtube_mapping.txt``; test: random 1K.
- ``audiocaps`` (audio caption, audio.py): ``{train,test}.csv``; the user's clips by a name pattern.
- ``clotho_aqa`` (audio QA, audio.py): ``clotho_aqa_{train,test}.csv``; confidence == yes.
- ``cap3d`` (point caption, cap3d.py): ``Cap3D_automated_Objaverse_full.csv``; captions < 100
  characters; random 50K train, 1K test of the rest.
- ``cap3d_qa`` (point QA, cap3d.py): ``CAP3DQA_final.csv``; random 30K train, 1K test of other objects.

Each module's docstring gives the exact rules. For every split, ``<out>/<set>_<split>.json``
(the dataset, media as absolute paths to the user's files: nothing is copied),
``<set>_<split>.convert.json`` (source files, filters, seed, subset sizes, counts after each
step, missing media) and ``<set>_<split>.missing.txt`` (the missing media paths, one a line).

Subsets come from ``random.Random(seed)`` over the candidates in source order and are drawn
before the media check, so the selection depends only on the annotation files and the seed.
A missing media file stops the conversion (a :class:`~mera.errors.DataError` showing the
first paths and the count) and nothing is written, unless ``--skip-missing``: then the sample
is dropped and its path listed in the report. Every output is written atomically and only
after all requested splits converted, so a failed run never clobbers an earlier output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mera import __version__
from mera.data.convert import audio, cap3d, coco, msvd
from mera.data.convert._common import Context, Part
from mera.data.format import sample_to_dict
from mera.errors import ConfigError, DataError
from mera.io import write_json, write_text

SPLITS = ("train", "test")
SHOW_MISSING = 5  # missing paths shown in the error


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str
    task: str
    build: Callable[[Context, str], Part]
    summary: str


CONVERTERS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("mscoco", "image", "caption", coco.build_mscoco, "MSCOCO-2014 captions"),
    DatasetSpec("okvqa", "image", "qa", coco.build_okvqa, "OK-VQA"),
    DatasetSpec("msvd", "video", "caption", msvd.build_msvd, "MSVD captions"),
    DatasetSpec("msvd_qa", "video", "qa", msvd.build_msvd_qa, "MSVD-QA"),
    DatasetSpec("audiocaps", "audio", "caption", audio.build_audiocaps, "AudioCaps"),
    DatasetSpec("clotho_aqa", "audio", "qa", audio.build_clotho_aqa, "Clotho-AQA"),
    DatasetSpec("cap3d", "point", "caption", cap3d.build_cap3d, "Cap3D captions (Objaverse)"),
    DatasetSpec("cap3d_qa", "point", "qa", cap3d.build_cap3d_qa, "Cap3D-QA (X-InstructBLIP)"),
)}
KNOWN_SETS = tuple(CONVERTERS)
_ALIASES = {"coco": "mscoco", "mscoco2014": "mscoco", "ok_vqa": "okvqa", "msvdqa": "msvd_qa",
            "clothoaqa": "clotho_aqa", "cap3dqa": "cap3d_qa"}


def resolve_set(name: str) -> DatasetSpec:
    """The converter of ``name`` (case-insensitive; ``-`` and ``_`` alike, e.g. ``msvd-qa``)."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in CONVERTERS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(KNOWN_SETS)}")
    return CONVERTERS[key]


def _media_paths(media) -> list[str]:
    return [media] if isinstance(media, str) else list(media)


def _check_media(part: Part, skip_missing: bool, where: str) -> list[str]:
    """Drop (with ``skip_missing``) or refuse samples whose media files are absent; the sorted missing paths."""
    present: dict[str, bool] = {}
    missing: list[str] = []
    kept = []
    for s in part.samples:
        gone = [m for m in _media_paths(s.media) if not present.setdefault(m, os.path.isfile(m))]
        missing += gone
        if not gone:
            kept.append(s)
    missing = sorted(set(missing))
    if missing and not skip_missing:
        shown = "\n  ".join(missing[:SHOW_MISSING])
        more = f"\n  ... and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
        raise DataError(
            f"{where}: {len(missing)} media file(s) not found (of {len(part.samples)} samples); "
            f"first:\n  {shown}{more}\n"
            f"check --src / --media-dir / --media-pattern (looked for {part.media_patterns}), or pass "
            f"--skip-missing to drop those samples and list them in the .missing.txt report; nothing was written")
    part.samples = kept
    part.count("media present", len(kept))
    return missing


def convert(set_name: str, src: str | os.PathLike, out: str | os.PathLike, split: str = "all",
            skip_missing: bool = False, seed: int = 0, limit: int | None = None,
            media_dir: str | os.PathLike | None = None, media_pattern: str | None = None,
            confidence_filter: bool = True) -> dict[str, dict]:
    """Convert one data set's official files under ``src`` into ``out``; see the module docstring.

    Returns, per converted split, ``{"dataset", "record", "missing_report", "samples", "missing"}``.
    """
    spec = resolve_set(set_name)
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"split must be one of train, test, all; got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit must be a positive integer, got {limit!r}")
    src_p = Path(os.path.abspath(src))
    if not src_p.is_dir():
        raise DataError(f"{src}: source folder not found")
    mdir = Path(os.path.abspath(media_dir)) if media_dir is not None else None
    if mdir is not None and not mdir.is_dir():
        raise DataError(f"{media_dir}: media folder not found")
    ctx = Context(spec.name, src_p, int(seed), limit, mdir, media_pattern, confidence_filter)
    splits = SPLITS if split == "all" else (split,)

    # Build and check every split before writing anything.
    done: list[tuple[Part, list[str]]] = []
    for sp in splits:
        part = spec.build(ctx, sp)
        where = f"{spec.name} {sp}"
        missing = _check_media(part, skip_missing, where)
        if not part.samples:
            steps = "; ".join(f"{c['step']}: {c['count']}" for c in part.counts)
            raise DataError(f"{where}: no samples left ({steps}); nothing was written")
        done.append((part, missing))

    out_p = Path(out)
    result = {}
    for part, missing in done:
        stem = f"{spec.name}_{part.split}"
        ds, rec, rep = out_p / f"{stem}.json", out_p / f"{stem}.convert.json", out_p / f"{stem}.missing.txt"
        _write_dataset_abs(ds, part.samples)
        write_text(rep, "".join(m + "\n" for m in missing))
        write_json(rec, {
            "set": spec.name, "split": part.split, "modality": spec.modality, "task": spec.task,
            "dataset": ds.name, "samples": len(part.samples), "missing_media": len(missing),
            "missing_report": rep.name, "skip_missing": bool(skip_missing),
            "seed": ctx.seed, "limit": limit, "subset": part.subset,
            "source_files": part.sources, "src": str(src_p), "media_root": str(ctx.media_root),
            "media_patterns": part.media_patterns, "confidence_filter": confidence_filter,
            "filters": part.filters, "counts": part.counts, "mera_version": __version__,
        })
        result[part.split] = {"dataset": str(ds), "record": str(rec), "missing_report": str(rep),
                              "samples": len(part.samples), "missing": len(missing)}
    return result


def _write_dataset_abs(path: Path, samples) -> None:
    """Like :func:`mera.data.format.write_dataset`, but media stay absolute paths to the user's files."""
    import json

    base = Path(os.path.abspath(path)).parent
    objs = []
    for s in samples:
        d = sample_to_dict(s, base)  # validates the placeholders
        d["media"] = s.media if isinstance(s.media, str) else list(s.media)
        objs.append(d)
    write_text(path, json.dumps(objs, indent=1, ensure_ascii=False) + "\n")


__all__ = ["CONVERTERS", "KNOWN_SETS", "DatasetSpec", "convert", "resolve_set"]
