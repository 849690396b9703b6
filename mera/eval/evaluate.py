"""Evaluate one modality of a model on its test sets: CIDEr-D on captions, a judge on QA.

Batched greedy generation (left padding, KV cache) through ``MultimodalLM.generate``.

Under several processes (see docs/distributed.md) the batches are shared out: the samples are
cut into the batches one process would make (same size, same order) and process ``r`` generates
batches ``r, r + world, ...``; the answers are gathered back in the original order on every
process, so they are exactly those of one process (each batch is the same batch, padded the
same way). The metrics are computed once, by the main process, and sent to the others.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mera import dist
from mera.data.format import Sample
from mera.data.pipeline import FeatureProvider, ItemDataset
from mera.eval.cider import cider_d_scores
from mera.eval.judges import Judge, judge_qa
from mera.faults import fault_point
from mera.model.collate import MultimodalCollator


@torch.no_grad()
def generate_answers(model, tokenizer, samples: list[Sample], provider: FeatureProvider, batch_size: int,
                     max_new_tokens: int, desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy answers of ``samples``, in order, in batches of ``batch_size`` (shared out over the
    processes of a multi-process run, every process getting all the answers)."""
    if not samples:
        return []
    model.eval()
    world, rank = dist.world_size(), dist.rank()
    batch_size = max(1, int(batch_size))
    starts = list(range(0, len(samples), batch_size))
    mine = starts[rank::world]  # whole batches, as one process would make them
    shard = [s for i in mine for s in samples[i:i + batch_size]]
    out: list[str] = []
    if shard:
        collate = MultimodalCollator(tokenizer, model, train=False)
        loader = DataLoader(ItemDataset(shard, provider, with_answer=False), batch_size=batch_size,
                            shuffle=False, collate_fn=collate)
        for batch in tqdm(loader, desc=desc, disable=not progress or not dist.is_main(), leave=False):
            out += model.generate(batch, max_new_tokens=max_new_tokens)
            fault_point("eval")
    if world == 1:
        return out
    answers: dict[int, list[str]] = {}
    for starts_r, out_r in dist.gather_object((mine, out)):
        for k, i in enumerate(starts_r):
            answers[i] = out_r[k * batch_size:(k + 1) * batch_size]
    return [a for i in starts for a in answers[i]]


def evaluate_modality(model, tokenizer, modality: str, caption_test: list[Sample], qa_test: list[Sample],
                      provider: FeatureProvider, judge: Judge, batch_size: int, max_new_tokens: int,
                      names: tuple[str, str], progress: bool = True) -> tuple[list[dict], dict]:
    """Rows ``{modality, dataset, task, score}`` for the caption set (CIDEr-D x100) and the QA set
    (accuracy in [0, 1]); plus ``{"predictions": [{id, task, prediction}], "items": [{modality, dataset,
    task, item, score}], "examples": ...}``: ``items`` holds every test item's own score (a caption's
    CIDEr-D x100 against the same corpus IDF, a QA item's judgement, 1 or 0, an unparseable one 0), whose
    mean over a set is that set's score (mera.eval.bootstrap resamples them).

    Every process of a multi-process run must call it (generation is shared out); the metrics
    are computed by the main process and every process returns the same result."""
    t0 = time.perf_counter()
    caption_preds = generate_answers(model, tokenizer, caption_test, provider, batch_size, max_new_tokens,
                                     f"eval {modality} caption", progress)
    qa_preds = generate_answers(model, tokenizer, qa_test, provider, batch_size, max_new_tokens,
                                f"eval {modality} qa", progress)
    result = None
    if dist.is_main():
        result = _score(modality, caption_test, qa_test, caption_preds, qa_preds, judge, names)
        result[1]["seconds"] = round(time.perf_counter() - t0, 2)
    return dist.broadcast_object(result)


def _score(modality: str, caption_test: list[Sample], qa_test: list[Sample], caption_preds: list[str],
           qa_preds: list[str], judge: Judge, names: tuple[str, str]) -> tuple[list[dict], dict]:
    rows, examples, predictions, items = [], {}, [], []
    if caption_test:
        preds = caption_preds
        score, per_item = cider_d_scores({s.id: p for s, p in zip(caption_test, preds)},
                                         {s.id: s.references for s in caption_test})
        rows.append({"modality": modality, "dataset": names[0], "task": "caption", "score": round(score, 4)})
        items += [{"modality": modality, "dataset": names[0], "task": "caption", "item": s.id, "score": per_item[s.id]}
                  for s in caption_test]
        examples["caption"] = [(s.references[0], p) for s, p in zip(caption_test[:3], preds[:3])]
        predictions += [{"id": s.id, "task": "caption", "prediction": p} for s, p in zip(caption_test, preds)]
    if qa_test:
        preds = qa_preds
        questions = [s.prompt for s in qa_test]
        judged = judge_qa(judge, questions, [s.references for s in qa_test], preds)
        # accuracy over every item: an unparseable judgement counts as wrong (and is counted)
        rows.append({"modality": modality, "dataset": names[1], "task": "qa", "score": round(judged.accuracy, 4)})
        examples["qa"] = [(s.answer, p) for s, p in zip(qa_test[:3], preds[:3])]
        examples["qa_unparseable"] = judged.num_unparseable
        predictions += [{"id": s.id, "task": "qa", "prediction": p, "judgement": j}
                        for s, p, j in zip(qa_test, preds, judged.scores)]
        items += [{"modality": modality, "dataset": names[1], "task": "qa", "item": s.id,
                   "score": 0.0 if j is None else float(j)} for s, j in zip(qa_test, judged.scores)]
    examples["predictions"] = predictions
    examples["items"] = items
    return rows, examples
