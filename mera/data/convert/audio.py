"""AudioCaps and Clotho-AQA (audio modality), from their official CSV files.

AudioCaps (``audiocaps``, audio captioning):
    ``{train,test}.csv`` with columns ``audiocap_id,youtube_id,start_time,caption``. The audio
    is the user's own 10 s clip of each (youtube_id, start_time), found by the media pattern
    (default ``{youtube_id}_{start_time}.wav``; fields ``audiocap_id``, ``youtube_id``,
    ``start_time`` as written in the CSV, and ``split``). Train: one sample per row (train
    clips have one caption each). Test: one sample per clip; the target is the caption with
    the lowest ``audiocap_id``, the references are all its captions (``audiocap_id`` order).
    No subset (``--limit`` takes a seeded random one). Clips that were never downloaded are
    common: they stop the conversion unless ``--skip-missing``, which drops and reports them.

Clotho-AQA (``clotho_aqa``, audio QA):
    ``clotho_aqa_{train,test}.csv`` with columns ``file_name``, ``QuestionText``, ``answer``
    and a confidence column (``confidence``, any case). With the confidence filter (default on;
    ``--no-confidence-filter`` turns it off) only answers whose confidence is ``yes`` are kept,
    and asking for the filter on a file without the column is an error. The rows are grouped
    per (file, question): one sample each, the target is the most frequent kept answer (ties:
    the first row), the references are all distinct kept answers. No subset. Media pattern
    default ``audio_files/{file_name}`` (field ``file_name``, ``split``).
"""

from __future__ import annotations

from mera.data.convert._common import (
    Context,
    Media,
    Part,
    caption_prompt,
    clean,
    csv_has_column,
    csv_header,
    csv_records,
    find_file,
    qa_prompt,
    ranked_answers,
    subset_note,
    take_subset,
)
from mera.data.format import Sample
from mera.errors import DataError

CONFIDENCE_COLUMNS = ("confidence",)


def build_audiocaps(ctx: Context, split: str) -> Part:
    part = Part(split)
    media = Media(ctx, ["{youtube_id}_{start_time}.wav"], ["audiocap_id", "youtube_id", "start_time", "split"])
    media.check()
    part.media_patterns = media.patterns
    path = find_file(ctx.src, [f"{split}.csv", f"dataset/{split}.csv"], f"AudioCaps {split}.csv")
    part.sources.append(str(path.resolve()))
    rows = []
    seen: dict[int, int] = {}
    n = 0
    for line, r, _ in csv_records(path, ("audiocap_id", "youtube_id", "start_time", "caption")):
        n += 1
        where = f"{path}: line {line}"
        try:
            aid = int(r["audiocap_id"].strip())
        except ValueError:
            raise DataError(f"{where}: audiocap_id must be an integer, got {r['audiocap_id']!r}") from None
        if aid in seen:
            raise DataError(f"{where}: duplicate audiocap_id {aid} (also line {seen[aid]})")
        seen[aid] = line
        yid, start = r["youtube_id"].strip(), r["start_time"].strip()
        if not yid or not start:
            raise DataError(f"{where}: empty youtube_id or start_time")
        text = clean(r["caption"], where)
        if text:
            rows.append((aid, yid, start, text))
    part.count(f"rows in {path.name}", n)
    part.count("rows with a non-empty caption", len(rows))
    if split == "train":
        part.filters.append("train: one sample per row")
        items = [(aid, yid, start, [text]) for aid, yid, start, text in rows]
    else:
        part.filters.append("test: one sample per clip (youtube_id, start_time); target = the caption with the "
                            "lowest audiocap_id, references = all its captions")
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for aid, yid, start, text in rows:
            groups.setdefault((yid, start), []).append((aid, text))
        items = []
        for (yid, start), caps in groups.items():
            caps.sort()
            items.append((caps[0][0], yid, start, [t for _, t in caps]))
        items.sort()
        part.count("clips", len(items))
    subset_note(part, ctx, None, "sample")
    items, part.subset = take_subset(items, ctx.size(None), ctx.rng())
    part.count("subset", len(items))
    for aid, yid, start, caps in items:
        sid = f"audiocaps_{split}_{aid}" if split == "train" else f"audiocaps_{split}_{yid}_{start}"
        part.samples.append(Sample(
            id=sid, modality="audio", task="caption",
            media=media(audiocap_id=aid, youtube_id=yid, start_time=start, split=split),
            prompt=caption_prompt("audio"), answer=caps[0], references=caps if split == "test" else None,
            meta={"source": "audiocaps", "audiocap_id": aid, "youtube_id": yid, "start_time": start}))
    return part


def build_clotho_aqa(ctx: Context, split: str) -> Part:
    part = Part(split)
    media = Media(ctx, ["audio_files/{file_name}"], ["file_name", "split"])
    media.check()
    part.media_patterns = media.patterns
    path = find_file(ctx.src, [f"clotho_aqa_{split}.csv"], f"clotho_aqa_{split}.csv")
    part.sources.append(str(path.resolve()))
    has_conf = csv_has_column(path, CONFIDENCE_COLUMNS)
    if ctx.confidence_filter and not has_conf:
        raise DataError(f"{path}: no confidence column (looked for {list(CONFIDENCE_COLUMNS)}, any case; columns "
                        f"found: {csv_header(path)}); the confidence filter needs it - pass "
                        f"--no-confidence-filter to keep every answer")
    groups: dict[tuple[str, str], list[str]] = {}
    order: dict[tuple[str, str], int] = {}
    n = kept = 0
    for line, r, opt in csv_records(path, ("file_name", "QuestionText", "answer"), [CONFIDENCE_COLUMNS]):
        n += 1
        where = f"{path}: line {line}"
        fname = r["file_name"].strip()
        q = clean(r["QuestionText"], where)
        a = clean(r["answer"], where)
        if not fname or not q:
            raise DataError(f"{where}: empty file_name or QuestionText")
        key = (fname, q)
        order.setdefault(key, len(order))
        if ctx.confidence_filter and (opt["confidence"] or "").strip().lower() != "yes":
            continue
        if a:
            kept += 1
            groups.setdefault(key, []).append(a)
    part.count(f"rows in {path.name}", n)
    if ctx.confidence_filter:
        part.filters.append("confidence == yes")
        part.count("rows with confidence yes and a non-empty answer", kept)
    else:
        part.filters.append("confidence filter off (--no-confidence-filter): every answer kept")
        part.count("rows with a non-empty answer", kept)
    part.filters.append("one sample per (file_name, question): target = the most frequent kept answer "
                        "(ties: first row), references = all distinct kept answers")
    items = sorted(groups, key=order.__getitem__)
    part.count("(file, question) pairs with a kept answer", len(items))
    subset_note(part, ctx, None, "question")
    items, part.subset = take_subset(items, ctx.size(None), ctx.rng())
    part.count("subset", len(items))
    for key in items:
        fname, q = key
        refs = ranked_answers(groups[key])
        part.samples.append(Sample(
            id=f"clotho_aqa_{split}_{order[key]:06d}", modality="audio", task="qa",
            media=media(file_name=fname, split=split), prompt=qa_prompt("audio", q), answer=refs[0],
            references=refs, meta={"source": "clotho_aqa", "file_name": fname}))
    return part
