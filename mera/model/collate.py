"""Turn samples into a model batch: chat template, media sentinels, label mask, padding.

A sample is ``{"modality", "prompt", "answer", "media" | "features"}`` (other keys, such as
``id``, are ignored except to name the sample in errors). The prompt is the human turn and holds
exactly one placeholder (``mera.PLACEHOLDERS[modality]``). The prompt goes through the tokenizer's
chat template (with the generation prompt), the text is split at the placeholder, each piece is
tokenised without special tokens (the template already wrote BOS and the role markers), and
``num_media_tokens(modality)`` copies of the modality's negative sentinel id go in between.
For training the answer tokens and eos follow; only they are labelled.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from mera import MODALITIES, PLACEHOLDERS

IGNORE_INDEX = -100

# token ids of prompts (after the chat template, with their media tokens) and of answers, per
# tokenizer: a phase tokenises each text once, not once per epoch, and the phases of a run share
# them (a few prompt templates recur over thousands of samples). Only the ids are cached; the
# batch is built anew every time, so batches are exactly what tokenising again would give.
_TOKEN_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
CACHE_ENTRIES = 200_000  # beyond this (a real-scale data set), new texts are tokenised on every use


def _sample_name(sample: dict, index: int) -> str:
    sid = sample.get("id")
    return f"sample {index}" + (f" (id {sid!r})" if sid is not None else "")


def batch_to(batch: dict, device) -> dict:
    """A copy of ``batch`` with every tensor (also inside the media / features dicts) on ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif isinstance(v, dict):
            out[k] = {m: t.to(device) if isinstance(t, torch.Tensor) else t for m, t in v.items()}
        else:
            out[k] = v
    return out


class MultimodalCollator:
    """``collator(samples) -> batch`` with ``input_ids``, ``attention_mask``, ``labels`` (train only),
    ``media`` / ``features`` (per-modality stacks in sample order) and ``modalities`` (per sample).

    Training batches are right-padded; generation batches (``train=False``) are left-padded and
    end with the generation prompt. ``max_length`` (train) truncates the answer from the right;
    a prompt (with its media tokens) longer than ``max_length`` is an error.
    """

    def __init__(self, tokenizer, model, train: bool, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.train = train
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)
        self.eos_id = tokenizer.eos_token_id
        try:
            self._cache = _TOKEN_CACHE.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer that cannot be weakly referenced: a cache of this collator's own
            self._cache = {}

    def _tokens(self, text: str) -> list[int]:
        if not text:
            return []
        key = ("text", text)
        ids = self._cache.get(key)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._cache) < CACHE_ENTRIES:
                self._cache[key] = ids
        return list(ids)

    def encode_sample(self, sample: dict, index: int = 0) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one sample, unpadded."""
        name = _sample_name(sample, index)
        modality = sample.get("modality")
        if modality not in MODALITIES:
            raise ValueError(f"{name}: unknown modality {modality!r}; known: {list(MODALITIES)}")
        prompt = sample.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{name}: the prompt must be a string, got {type(prompt).__name__}")
        media_ids = [self.model.media_token_id(modality)] * self.model.num_media_tokens(modality)
        key = ("prompt", modality, prompt, media_ids[0] if media_ids else None, len(media_ids))
        cached = self._cache.get(key)
        if cached is None:
            cached = tuple(self._prompt_ids(name, modality, prompt, media_ids))
            if len(self._cache) < CACHE_ENTRIES:
                self._cache[key] = cached
        prompt_ids = list(cached)
        if self.max_length is not None and len(prompt_ids) > self.max_length:
            raise ValueError(
                f"{name}: the prompt is {len(prompt_ids)} tokens with its media, more than max_length {self.max_length}"
            )
        labels = [IGNORE_INDEX] * len(prompt_ids)
        if not self.train:
            return prompt_ids, labels
        answer = sample.get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"{name}: a training sample needs a string answer, got {answer!r}")
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token, needed to end training answers")
        answer_ids = self._tokens(answer) + [int(self.eos_id)]
        if self.max_length is not None:
            answer_ids = answer_ids[: self.max_length - len(prompt_ids)]
        return prompt_ids + answer_ids, labels + answer_ids

    def _prompt_ids(self, name: str, modality: str, prompt: str, media_ids: list[int]) -> list[int]:
        """The chat-templated prompt's ids with the media tokens in place of the placeholder."""
        placeholder = PLACEHOLDERS[modality]
        count = prompt.count(placeholder)
        others = [p for m, p in PLACEHOLDERS.items() if m != modality and p in prompt]
        if count != 1 or others:
            found = f"{count} {placeholder}" + (f" and {others}" if others else "")
            raise ValueError(
                f"{name}: a {modality} prompt must hold exactly one {placeholder} and no other placeholder; "
                f"found {found} in {prompt!r}"
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        pieces = text.split(placeholder)
        if len(pieces) != 2:
            raise ValueError(f"{name}: the chat template changed the placeholder {placeholder}: {text!r}")
        return self._tokens(pieces[0]) + media_ids + self._tokens(pieces[1])

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        seqs, labs = [], []
        media: dict[str, list[torch.Tensor]] = {}
        features: dict[str, list[torch.Tensor]] = {}
        for i, s in enumerate(samples):
            ids, lab = self.encode_sample(s, i)
            seqs.append(ids)
            labs.append(lab)
            has_media, has_feat = s.get("media") is not None, s.get("features") is not None
            if has_media == has_feat:
                raise ValueError(f"{_sample_name(s, i)}: give exactly one of 'media' and 'features'")
            key, store = ("media", media) if has_media else ("features", features)
            x = s[key]
            store.setdefault(s["modality"], []).append(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)))
        both = set(media) & set(features)
        if both:
            raise ValueError(f"a batch mixes media and precomputed features for {sorted(both)}")

        width = max(len(s) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, width), dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(seqs, labs)):
            n = len(ids)
            sl = slice(0, n) if self.train else slice(width - n, width)
            input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, sl] = 1
            labels[i, sl] = torch.tensor(lab, dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "modalities": [s["modality"] for s in samples],
        }
        if self.train:
            batch["labels"] = labels
        for key, store in (("media", media), ("features", features)):
            if store:
                try:
                    batch[key] = {m: torch.stack(xs) for m, xs in store.items()}
                except RuntimeError as e:
                    raise ValueError(f"{key} of one modality have different shapes in a batch: {e}") from e
        return batch
