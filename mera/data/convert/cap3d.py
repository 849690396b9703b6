"""Cap3D captions and Cap3D-QA (point-cloud modality).

Point clouds are the user's files per Objaverse uid, found under the media root
(``--media-dir``, default ``--src``) by the first of these that exists:
``8192_npy/{uid}_8192.npy`` (PointLLM's 8192 x 6 arrays), ``{uid}_8192.npy``, ``{uid}.npy``,
``{uid}.npz`` (``arr_0``), ``{uid}.ply``; when none exists the first is reported missing.
``--media-pattern`` (field ``uid``) replaces the list. Note: mera's point reader reads
``.npy`` / ``.npz``; a ``.ply`` path is written as found but cannot be trained on yet.

Cap3D (``cap3d``, point captioning):
    ``Cap3D_automated_Objaverse_full.csv`` (no header; rows ``uid,caption``; a first row
    ``uid,caption`` is skipped). Kept: the first row of each uid, captions under 100
    characters (``len`` of the whitespace-collapsed caption < 100; "letters" in the paper is
    read as characters). The kept objects (file order) are shuffled once with
    ``random.Random(seed)``: the first 50,000 are train, the next 1,000 test, so test is a
    random 1,000 of the objects not in train. ``--limit N`` sets both sizes to N.

Cap3D-QA (``cap3d_qa``, point QA):
    ``CAP3DQA_final.csv`` (X-InstructBLIP), columns read by name (any case): ``sample_id``
    (the Objaverse uid), ``question``, ``answer``; other columns are ignored. The rows are
    shuffled once with ``random.Random(seed)``: the first 30,000 are train; test is the next
    1,000 rows whose object is not in train (test objects never occur in train). ``--limit N``
    sets both sizes to N. (The file's layout is unverified: a missing column is an error
    listing the columns found.)
"""

from __future__ import annotations

from mera.data.convert._common import (
    Context,
    Media,
    Part,
    caption_prompt,
    clean,
    csv_headerless,
    csv_records,
    find_file,
    qa_prompt,
)
from mera.data.format import Sample
from mera.errors import DataError

POINT_PATTERNS = ("8192_npy/{uid}_8192.npy", "{uid}_8192.npy", "{uid}.npy", "{uid}.npz", "{uid}.ply")
CAP3D_FILE = "Cap3D_automated_Objaverse_full.csv"
CAP3D_QA_FILE = "CAP3DQA_final.csv"
MAX_CAPTION_CHARS = 100  # captions are kept when shorter than this
CAP3D_TRAIN, CAP3D_TEST = 50_000, 1_000
QA_TRAIN, QA_TEST = 30_000, 1_000


def _media(ctx: Context) -> Media:
    m = Media(ctx, POINT_PATTERNS, ["uid"])
    m.check()
    return m


def _split_note(part: Part, ctx: Context, n_train: int, n_test: int, what: str) -> None:
    src = "--limit" if ctx.limit is not None else "the paper's sizes"
    part.filters.append(f"random.Random(seed).shuffle of the kept {what}s (file order): train = the first "
                        f"{n_train}, test = the next {n_test}{' of other objects' if what == 'row' else ''} ({src})")


def build_cap3d(ctx: Context, split: str) -> Part:
    part = Part(split)
    media = _media(ctx)
    part.media_patterns = media.patterns
    path = find_file(ctx.src, [CAP3D_FILE], CAP3D_FILE)
    part.sources.append(str(path.resolve()))
    n = 0
    first: dict[str, str] = {}
    for line, (uid, cap) in csv_headerless(path, 2):
        uid = uid.strip()
        if n == 0 and uid.lower() == "uid" and cap.strip().lower() == "caption":
            continue  # a header row
        n += 1
        where = f"{path}: line {line}"
        if not uid:
            raise DataError(f"{where}: empty uid")
        text = clean(cap, where)
        if text and uid not in first:
            first[uid] = text
    part.count(f"rows in {path.name}", n)
    part.count("objects with a non-empty caption (first row per uid)", len(first))
    kept = [(u, c) for u, c in first.items() if len(c) < MAX_CAPTION_CHARS]
    part.filters.append(f"caption shorter than {MAX_CAPTION_CHARS} characters")
    part.count(f"captions under {MAX_CAPTION_CHARS} characters", len(kept))
    n_train, n_test = ctx.size(CAP3D_TRAIN), ctx.size(CAP3D_TEST)
    _split_note(part, ctx, n_train, n_test, "object")
    order = list(range(len(kept)))
    ctx.rng().shuffle(order)
    chosen = sorted(order[:n_train] if split == "train" else order[n_train:n_train + n_test])
    part.subset = {"size": n_train if split == "train" else n_test, "from": len(kept), "taken": len(chosen),
                   "random": True, "train_size": n_train}
    part.count(f"{split} subset", len(chosen))
    for i in chosen:
        uid, cap = kept[i]
        part.samples.append(Sample(
            id=f"cap3d_{split}_{uid}", modality="point", task="caption", media=media(uid=uid),
            prompt=caption_prompt("point"), answer=cap, meta={"source": "cap3d", "uid": uid}))
    return part


def build_cap3d_qa(ctx: Context, split: str) -> Part:
    part = Part(split)
    media = _media(ctx)
    part.media_patterns = media.patterns
    path = find_file(ctx.src, [CAP3D_QA_FILE], CAP3D_QA_FILE)
    part.sources.append(str(path.resolve()))
    rows = []
    n = 0
    for line, r, _ in csv_records(path, ("sample_id", "question", "answer")):
        n += 1
        where = f"{path}: line {line}"
        uid = r["sample_id"].strip()
        if not uid:
            raise DataError(f"{where}: empty sample_id")
        q, a = clean(r["question"], where), clean(r["answer"], where)
        if q and a:
            rows.append((n - 1, uid, q, a))
    part.count(f"rows in {path.name}", n)
    part.count("rows with a non-empty question and answer", len(rows))
    n_train, n_test = ctx.size(QA_TRAIN), ctx.size(QA_TEST)
    _split_note(part, ctx, n_train, n_test, "row")
    order = list(range(len(rows)))
    ctx.rng().shuffle(order)
    train = order[:n_train]
    if split == "train":
        chosen = train
    else:
        train_uids = {rows[i][1] for i in train}
        chosen = [i for i in order[n_train:] if rows[i][1] not in train_uids][:n_test]
    chosen = sorted(chosen)
    part.subset = {"size": n_train if split == "train" else n_test, "from": len(rows), "taken": len(chosen),
                   "random": True, "train_size": n_train}
    part.count(f"{split} subset", len(chosen))
    for i in chosen:
        k, uid, q, a = rows[i]
        part.samples.append(Sample(
            id=f"cap3d_qa_{split}_{k:06d}", modality="point", task="qa", media=media(uid=uid),
            prompt=qa_prompt("point", q), answer=a, meta={"source": "cap3d_qa", "uid": uid, "row": k}))
    return part
