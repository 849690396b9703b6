"""MSVD captions and MSVD-QA (video modality).

Both map clips through ``youtube_mapping.txt`` (lines ``{ytid}_{start}_{end} vid{N}``); a clip
is the file ``YouTubeClips/{ytid}_{start}_{end}.avi``. The media is that one video file (no
frames are extracted).

MSVD (``msvd``, video captioning):
    The MSR Video Description Corpus CSV (``VideoID,Start,End,WorkerID,Source,AnnotationTime,
    Language,Description``; looked for as ``MSR Video Description Corpus.csv``,
    ``video_corpus.csv`` or ``msvd_captions.csv``, else the one CSV in ``--src`` with those
    columns). Only rows with ``Language == English`` and a non-empty description; clips not in
    ``youtube_mapping.txt`` are dropped. Split by the standard ranges: vid1-vid1200 train,
    vid1301-vid1970 test (vid1201-1300, validation, unused). One sample per clip. Train: the
    clip's first English caption (the first row in the CSV's order). Test: the target is the
    first English caption, the references are all its English captions (CSV order).

MSVD-QA (``msvd_qa``, video QA):
    ``{train,test}_qa.json``: ``[{id, video_id, question, answer}]``, ``video_id`` N is
    ``vid{N}``. One sample per question. Train: every question. Test: a seeded random 1,000.

Media root: ``--media-dir`` (default ``--src``); ``--media-pattern`` fields: ``clip``
(``{ytid}_{start}_{end}``) and ``vid`` (``vid{N}``); default ``YouTubeClips/{clip}.avi``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mera.data.convert._common import (
    Context,
    Media,
    Part,
    caption_prompt,
    clean,
    csv_has_column,
    csv_records,
    find_file,
    get,
    json_list,
    qa_prompt,
    read_json,
    subset_note,
    take_subset,
)
from mera.data.format import Sample
from mera.errors import DataError

TRAIN_VIDS = (1, 1200)
TEST_VIDS = (1301, 1970)
QA_TEST_SIZE = 1000
CAPTION_CSV_NAMES = ("MSR Video Description Corpus.csv", "video_corpus.csv", "msvd_captions.csv")
_CSV_COLUMNS = ("VideoID", "Start", "End", "Language", "Description")
_VID = re.compile(r"vid(\d+)")


def read_mapping(path: Path) -> dict[str, int]:
    """``youtube_mapping.txt`` -> {clip name: N} (from lines ``{clip} vid{N}``)."""
    out: dict[str, int] = {}
    seen: dict[int, int] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        m = _VID.fullmatch(parts[1]) if len(parts) == 2 else None
        if m is None:
            raise DataError(f"{path}: line {k}: expected '{{ytid}}_{{start}}_{{end}} vid{{N}}', "
                            f"got {line.strip()[:80]!r}")
        n = int(m.group(1))
        if parts[0] in out or n in seen:
            raise DataError(f"{path}: line {k}: clip {parts[0]!r} or vid{n} already mapped")
        out[parts[0]] = n
        seen[n] = k
    return out


def _media(ctx: Context) -> Media:
    m = Media(ctx, ["YouTubeClips/{clip}.avi"], ["clip", "vid"])
    m.check()
    return m


def _caption_csv(src: Path) -> Path:
    try:
        return find_file(src, CAPTION_CSV_NAMES, "the MSVD captions CSV")
    except DataError:
        found = [p for p in sorted(src.glob("*.csv")) if csv_has_column(p, ["Description"])
                 and csv_has_column(p, ["Language"])]
        if len(found) == 1:
            return found[0]
        raise DataError(f"{src}: the MSVD captions CSV not found (looked for {list(CAPTION_CSV_NAMES)}, "
                        f"or one *.csv with columns {list(_CSV_COLUMNS)}; found {len(found)} such)") from None


def build_msvd(ctx: Context, split: str) -> Part:
    part = Part(split)
    media = _media(ctx)
    part.media_patterns = media.patterns
    mpath = find_file(ctx.src, ["youtube_mapping.txt"], "youtube_mapping.txt")
    cpath = _caption_csv(ctx.src)
    part.sources += [str(mpath.resolve()), str(cpath.resolve())]
    mapping = read_mapping(mpath)
    n_rows = n_en = 0
    caps: dict[str, list[str]] = {}
    for line, row, _ in csv_records(cpath, _CSV_COLUMNS):
        n_rows += 1
        if row["Language"].strip() != "English":
            continue
        n_en += 1
        where = f"{cpath}: line {line}"
        text = clean(row["Description"], where)
        if not text:
            continue
        clip = f"{row['VideoID'].strip()}_{row['Start'].strip()}_{row['End'].strip()}"
        caps.setdefault(clip, []).append(text)
    part.count(f"rows in {cpath.name}", n_rows)
    part.count("rows with Language == English", n_en)
    part.count("clips with a non-empty English caption", len(caps))
    part.filters.append("Language == English, non-empty Description")
    mapped = {mapping[c]: c for c in caps if c in mapping}
    part.count("clips in youtube_mapping.txt", len(mapped))
    lo, hi = TRAIN_VIDS if split == "train" else TEST_VIDS
    part.filters.append(f"{split}: vid{lo}-vid{hi}")
    vids = sorted(n for n in mapped if lo <= n <= hi)
    part.count(f"clips in vid{lo}-vid{hi}", len(vids))
    part.filters.append("train: the first English caption per clip (CSV row order)" if split == "train" else
                        "test: target = the first English caption (CSV row order), references = all English captions")
    subset_note(part, ctx, None, "clip")
    vids, part.subset = take_subset(vids, ctx.size(None), ctx.rng())
    part.count("subset", len(vids))
    for n in vids:
        clip = mapped[n]
        c = caps[clip]
        part.samples.append(Sample(
            id=f"msvd_{split}_vid{n}", modality="video", task="caption", media=media(clip=clip, vid=f"vid{n}"),
            prompt=caption_prompt("video"), answer=c[0], references=list(c) if split == "test" else None,
            meta={"source": "msvd", "vid": f"vid{n}", "clip": clip}))
    return part


def build_msvd_qa(ctx: Context, split: str) -> Part:
    part = Part(split)
    media = _media(ctx)
    part.media_patterns = media.patterns
    mpath = find_file(ctx.src, ["youtube_mapping.txt"], "youtube_mapping.txt")
    qpath = find_file(ctx.src, [f"{split}_qa.json"], f"{split}_qa.json")
    part.sources += [str(mpath.resolve()), str(qpath.resolve())]
    clips = {n: c for c, n in read_mapping(mpath).items()}
    rows = json_list(read_json(qpath), None, qpath)
    items = []
    seen: set[int] = set()
    for i, r in enumerate(rows):
        where = f"{qpath}: [{i}]"
        qid = get(r, "id", int, where)
        vid = get(r, "video_id", int, where)
        q = clean(get(r, "question", str, where), where)
        a = clean(get(r, "answer", str, where), where)
        if qid in seen:
            raise DataError(f"{where}: duplicate id {qid}")
        seen.add(qid)
        if vid not in clips:
            raise DataError(f"{where}: video_id {vid} (vid{vid}) is not in {mpath}")
        if q and a:
            items.append((qid, vid, q, a))
    part.count(f"questions in {qpath.name}", len(rows))
    part.count("with a non-empty question and answer", len(items))
    default = QA_TEST_SIZE if split == "test" else None
    subset_note(part, ctx, default, "question")
    items, part.subset = take_subset(items, ctx.size(default), ctx.rng())
    part.count("subset", len(items))
    for qid, vid, q, a in items:
        part.samples.append(Sample(
            id=f"msvd_qa_{split}_{qid}", modality="video", task="qa", media=media(clip=clips[vid], vid=f"vid{vid}"),
            prompt=qa_prompt("video", q), answer=a,
            meta={"source": "msvd_qa", "question_id": qid, "vid": f"vid{vid}"}))
    return part
