"""Evaluate one modality of a model on its test sets: CIDEr-D on captions, a judge on QA.

Batched greedy generation (left padding, KV cache) through ``MultimodalLM.generate``.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mera.data.format import Sample
from mera.data.pipeline import FeatureProvider, ItemDataset
from mera.eval.cider import cider_d
from mera.eval.judges import Judge, qa_accuracy
from mera.faults import fault_point
from mera.model.collate import MultimodalCollator


@torch.no_grad()
def generate_answers(model, tokenizer, samples: list[Sample], provider: FeatureProvider, batch_size: int,
                     max_new_tokens: int, desc: str = "generate", progress: bool = True) -> list[str]:
    if not samples:
        return []
    model.eval()
    collate = MultimodalCollator(tokenizer, model, train=False)
    loader = DataLoader(ItemDataset(samples, provider, with_answer=False), batch_size=batch_size,
                        shuffle=False, collate_fn=collate)
    out: list[str] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out += model.generate(batch, max_new_tokens=max_new_tokens)
        fault_point("eval")
    return out


def evaluate_modality(model, tokenizer, modality: str, caption_test: list[Sample], qa_test: list[Sample],
                      provider: FeatureProvider, judge: Judge, batch_size: int, max_new_tokens: int,
                      names: tuple[str, str], progress: bool = True) -> tuple[list[dict], dict]:
    """Rows ``{modality, dataset, task, score}`` for the caption set (CIDEr-D x100) and the QA set
    (accuracy in [0, 1]); plus ``{"predictions": [{id, task, prediction}], "examples": ...}``."""
    t0 = time.perf_counter()
    rows, examples, predictions = [], {}, []
    if caption_test:
        preds = generate_answers(model, tokenizer, caption_test, provider, batch_size, max_new_tokens,
                                 f"eval {modality} caption", progress)
        score = cider_d({s.id: p for s, p in zip(caption_test, preds)}, {s.id: s.references for s in caption_test})
        rows.append({"modality": modality, "dataset": names[0], "task": "caption", "score": round(score, 4)})
        examples["caption"] = [(s.references[0], p) for s, p in zip(caption_test[:3], preds[:3])]
        predictions += [{"id": s.id, "task": "caption", "prediction": p} for s, p in zip(caption_test, preds)]
    if qa_test:
        preds = generate_answers(model, tokenizer, qa_test, provider, batch_size, max_new_tokens,
                                 f"eval {modality} qa", progress)
        questions = [s.prompt for s in qa_test]
        acc = qa_accuracy(judge, questions, [s.references for s in qa_test], preds)
        rows.append({"modality": modality, "dataset": names[1], "task": "qa", "score": round(acc, 4)})
        examples["qa"] = [(s.answer, p) for s, p in zip(qa_test[:3], preds[:3])]
        predictions += [{"id": s.id, "task": "qa", "prediction": p} for s, p in zip(qa_test, preds)]
    examples["seconds"] = round(time.perf_counter() - t0, 2)
    examples["predictions"] = predictions
    return rows, examples
