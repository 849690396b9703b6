"""MSCOCO-2014 captions and OK-VQA (image modality), from their official JSON files.

MSCOCO (``mscoco``, image captioning):
    ``annotations/captions_{train,val}2014.json`` (``images[{id, file_name}]``,
    ``annotations[{id, image_id, caption}]``); images under ``train2014/`` and ``val2014/``.
    One sample per image. Train: every train2014 image, its first caption (the lowest
    annotation id) as the target. Test: a seeded random 1,000 of the val2014 images; the
    target is the first caption, the references are all its captions (annotation id order).

OK-VQA (``okvqa``, image QA):
    ``OpenEnded_mscoco_{train,val}2014_questions.json`` (``questions[{image_id, question,
    question_id}]``) and ``mscoco_{train,val}2014_annotations.json`` (``annotations[{question_id,
    image_id, answers[{answer}]}]``); images are COCO's, ``{train,val}2014/COCO_{split}2014_{image_id:012d}.jpg``.
    One sample per question; the target is the most frequent of its answers (ties: the first
    given), the references are all its distinct answers. Train: every train question. Test: a
    seeded random 1,000 of the val questions.

Media root: ``--media-dir`` (default ``--src``); ``--media-pattern`` fields: ``coco_split``
(``train2014`` / ``val2014``), ``image_id``, and for MSCOCO ``file_name``.
"""

from __future__ import annotations

from mera.data.convert._common import (
    Context,
    Media,
    Part,
    caption_prompt,
    clean,
    find_file,
    get,
    json_list,
    qa_prompt,
    ranked_answers,
    read_json,
    subset_note,
    take_subset,
)
from mera.data.format import Sample
from mera.errors import DataError

TEST_SIZE = 1000


def _coco_split(split: str) -> str:
    return "train2014" if split == "train" else "val2014"


def build_mscoco(ctx: Context, split: str) -> Part:
    cs = _coco_split(split)
    part = Part(split)
    media = Media(ctx, ["{coco_split}/{file_name}"], ["coco_split", "image_id", "file_name"])
    media.check()
    part.media_patterns = media.patterns
    path = find_file(ctx.src, [f"annotations/captions_{cs}.json", f"captions_{cs}.json"], f"captions_{cs}.json")
    part.sources.append(str(path.resolve()))
    data = read_json(path)
    images: dict[int, str] = {}
    for i, im in enumerate(json_list(data, "images", path)):
        where = f"{path}: images[{i}]"
        iid = get(im, "id", int, where)
        fname = get(im, "file_name", str, where)
        if iid in images:
            raise DataError(f"{where}: duplicate image id {iid}")
        images[iid] = fname
    caps: dict[int, list[tuple[int, str]]] = {}
    anns = json_list(data, "annotations", path)
    for i, a in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        aid = get(a, "id", int, where)
        iid = get(a, "image_id", int, where)
        text = clean(get(a, "caption", str, where), where)
        if iid not in images:
            raise DataError(f"{where}: image_id {iid} is not in 'images'")
        if text:
            caps.setdefault(iid, []).append((aid, text))
    part.count(f"images in {path.name}", len(images))
    part.count(f"captions in {path.name}", len(anns))
    part.filters.append("first caption per image = the lowest annotation id (the target); "
                        + ("test references: all the image's captions in annotation-id order" if split == "test"
                           else "train: one sample per image"))
    ids = sorted(iid for iid in images if iid in caps)
    part.count("images with a non-empty caption", len(ids))
    subset_note(part, ctx, TEST_SIZE if split == "test" else None, "image")
    ids, part.subset = take_subset(ids, ctx.size(TEST_SIZE if split == "test" else None), ctx.rng())
    part.count("subset", len(ids))
    for iid in ids:
        c = sorted(caps[iid])
        refs = [t for _, t in c] if split == "test" else None
        part.samples.append(Sample(
            id=f"mscoco_{split}_{iid}", modality="image", task="caption",
            media=media(coco_split=cs, image_id=iid, file_name=images[iid]),
            prompt=caption_prompt("image"), answer=c[0][1], references=refs,
            meta={"source": "mscoco", "image_id": iid, "annotation_id": c[0][0]}))
    return part


def build_okvqa(ctx: Context, split: str) -> Part:
    cs = _coco_split(split)
    part = Part(split)
    media = Media(ctx, ["{coco_split}/COCO_{coco_split}_{image_id:012d}.jpg"], ["coco_split", "image_id"])
    media.check()
    part.media_patterns = media.patterns
    qpath = find_file(ctx.src, [f"OpenEnded_mscoco_{cs}_questions.json"], f"OpenEnded_mscoco_{cs}_questions.json")
    apath = find_file(ctx.src, [f"mscoco_{cs}_annotations.json"], f"mscoco_{cs}_annotations.json")
    part.sources += [str(qpath.resolve()), str(apath.resolve())]
    answers: dict[int, list[str]] = {}
    for i, a in enumerate(json_list(read_json(apath), "annotations", apath)):
        where = f"{apath}: annotations[{i}]"
        qid = get(a, "question_id", int, where)
        got = []
        for j, ans in enumerate(get(a, "answers", list, where)):
            w = f"{where}.answers[{j}]"
            t = clean(get(ans, "answer", str, w), w)
            if t:
                got.append(t)
        if qid in answers:
            raise DataError(f"{where}: duplicate question_id {qid}")
        answers[qid] = got
    questions = []
    qlist = json_list(read_json(qpath), "questions", qpath)
    for i, q in enumerate(qlist):
        where = f"{qpath}: questions[{i}]"
        qid = get(q, "question_id", int, where)
        iid = get(q, "image_id", int, where)
        text = clean(get(q, "question", str, where), where)
        if qid not in answers:
            raise DataError(f"{where}: question_id {qid} has no entry in {apath}")
        if text and answers[qid]:
            questions.append((qid, iid, text))
    part.count(f"questions in {qpath.name}", len(qlist))
    part.filters.append("target = the most frequent answer (ties: first given); references = all distinct answers")
    part.count("questions with a non-empty question and answer", len(questions))
    subset_note(part, ctx, TEST_SIZE if split == "test" else None, "question")
    questions, part.subset = take_subset(questions, ctx.size(TEST_SIZE if split == "test" else None), ctx.rng())
    part.count("subset", len(questions))
    for qid, iid, text in questions:
        refs = ranked_answers(answers[qid])
        part.samples.append(Sample(
            id=f"okvqa_{split}_{qid}", modality="image", task="qa", media=media(coco_split=cs, image_id=iid),
            prompt=qa_prompt("image", text), answer=refs[0], references=refs,
            meta={"source": "okvqa", "question_id": qid, "image_id": iid}))
    return part
