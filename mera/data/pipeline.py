"""From dataset files to training/evaluation items: loading the sets, frozen-encoder features, replay samples.

An *item* is what the collator takes: ``{"modality", "prompt", "answer", "features" | "media"}``.
Encoders are frozen and deterministic, so with ``cache=True`` each sample's features are
computed once per run and reused by every expert, method, order and stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mera.data.format import Sample, load_dataset
from mera.data.media import read_media
from mera.errors import DataError
from mera.faults import fault_point
from mera.io import atomic_path

SET_KEYS = ("caption_train", "caption_test", "qa_train", "qa_test", "caption_val", "qa_val")


@dataclass
class ModalitySets:
    caption_train: list[Sample]
    caption_test: list[Sample]
    qa_train: list[Sample]
    qa_test: list[Sample]
    # the validation sets (for choosing hyper-parameters, ``eval.split: val``); empty when absent
    caption_val: list[Sample] = field(default_factory=list)
    qa_val: list[Sample] = field(default_factory=list)

    @property
    def train(self) -> list[Sample]:
        """Step B's data: captions and QA together."""
        return self.caption_train + self.qa_train

    def evaluation(self, split: str = "test") -> tuple[list[Sample], list[Sample]]:
        """The (caption, QA) sets a model is evaluated on: ``split`` is ``test`` or ``val``."""
        if split not in ("test", "val"):
            raise ValueError(f"evaluation split must be 'test' or 'val', got {split!r}")
        return getattr(self, f"caption_{split}"), getattr(self, f"qa_{split}")


def load_sets(paths: dict[str, dict[str, str]], max_test: int | None = None) -> dict[str, ModalitySets]:
    """``paths[modality]`` = {caption_train, caption_test, qa_train, qa_test[, caption_val, qa_val]} ->
    loaded, validated samples. A key that is absent gives an empty list (a run evaluating on the
    validation sets leaves the test sets out: they are never read). ``max_test`` caps every
    evaluation set (test and val)."""
    out = {}
    for modality, p in paths.items():
        unknown = [k for k in p if k not in SET_KEYS]
        if unknown:
            raise DataError(f"the {modality} sets: unknown set {', '.join(unknown)} (known: {', '.join(SET_KEYS)})")
        sets = {k: load_dataset(v) for k, v in p.items() if v is not None}
        for key, samples in sets.items():
            if not samples:
                raise DataError(f"{p[key]}: the {modality} {key.replace('_', ' ')} set is empty "
                                f"(a JSON list of at least one sample is expected)")
            for s in samples:
                if s.modality != modality:
                    raise DataError(f"{p[key]}: sample {s.id!r} has modality {s.modality!r}, expected {modality!r}")
        if max_test is not None:
            for key in ("caption_test", "qa_test", "caption_val", "qa_val"):
                if key in sets:
                    sets[key] = sets[key][:max_test]
        out[modality] = ModalitySets(**{k: sets.get(k, []) for k in SET_KEYS})
    return out


def sample_fraction(samples: list[Sample], ratio: float, rng: np.random.Generator) -> list[Sample]:
    """A seeded random ``ratio`` share of ``samples`` (at least one sample when ``samples`` is not empty)."""
    if not samples:
        return []
    k = max(1, int(round(ratio * len(samples))))
    idx = np.sort(rng.choice(len(samples), size=min(k, len(samples)), replace=False))
    return [samples[i] for i in idx]


def _key(s: Sample) -> tuple:
    return (s.modality, s.id, tuple(s.media) if isinstance(s.media, list) else s.media)


class FeatureProvider:
    """Gives an item's encoder input: cached features or preprocessed media.

    ``cache=True`` keeps every sample's features in memory (the toy world); ``cache="disk"``
    writes them once to ``cache_dir`` (one safetensors file per sample, in ``cache_dtype``)
    and reads them back when needed, for data sets too large for memory; ``cache=False``
    runs the frozen encoder on every use.
    """

    def __init__(self, encoders: dict[str, torch.nn.Module], cache: bool | str = True, batch_size: int = 64,
                 progress: bool = True, cache_dir: str | Path | None = None, cache_dtype: str = "float32"):
        if cache == "disk" and cache_dir is None:
            raise ValueError("a disk feature cache needs a cache_dir")
        self.encoders = encoders
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_dtype = getattr(torch, cache_dtype)
        self._features: dict[tuple, torch.Tensor] = {}

    def _file(self, s: Sample) -> Path:
        # the sample's identity (modality, id, media path) and the encoder, hashed into a file name
        enc = self.encoders[s.modality]
        tag = json.dumps([list(map(str, _key(s))), type(enc).__name__, int(enc.num_tokens), int(enc.output_dim)])
        return self.cache_dir / s.modality / f"{hashlib.sha256(tag.encode()).hexdigest()[:32]}.safetensors"

    def _cached(self, s: Sample) -> bool:
        if self.cache == "disk":
            return self._file(s).is_file()
        return _key(s) in self._features

    def _store(self, s: Sample, f: torch.Tensor) -> None:
        if self.cache == "disk":
            # a cache: recomputed if lost; a full disk is a WriteError naming the file (mera.io)
            with atomic_path(self._file(s), durable=False) as tmp:
                save_file({"features": f.to(self.cache_dtype).contiguous()}, str(tmp))
                fault_point("write_features")
        else:
            self._features[_key(s)] = f.clone()

    def _load(self, s: Sample) -> torch.Tensor:
        if self.cache == "disk":
            try:
                return load_file(str(self._file(s)))["features"].float()
            except (SafetensorError, OSError, KeyError) as e:
                raise DataError(f"{self._file(s)}: unreadable cached features of sample {s.id!r} ({e}); "
                                "delete the file to recompute them") from None
        return self._features[_key(s)]

    def media(self, s: Sample) -> torch.Tensor:
        enc = self.encoders[s.modality]
        # an audio encoder crops to its window: the rest of a long file is never read
        return enc.preprocess(read_media(s.modality, s.media, getattr(enc, "max_audio_seconds", None)))

    @torch.no_grad()
    def warm(self, samples: list[Sample], desc: str = "features") -> None:
        """Compute and cache the features of every sample not cached yet."""
        if not self.cache:
            return
        todo = [s for s in samples if not self._cached(s)]
        if not todo:
            return
        todo = list({_key(s): s for s in todo}.values())
        bar = tqdm(total=len(todo), desc=desc, disable=not self.progress, leave=False)
        for modality in sorted({s.modality for s in todo}):
            enc = self.encoders[modality]
            group = [s for s in todo if s.modality == modality]
            for i in range(0, len(group), self.batch_size):
                chunk = group[i : i + self.batch_size]
                x = torch.stack([self.media(s) for s in chunk])
                ref = next(iter(enc.parameters()), None)  # the encoder's device and dtype (GPU, half)
                if ref is not None:
                    x = x.to(ref.device, ref.dtype if x.is_floating_point() else x.dtype)
                feats = enc(x).float().cpu()
                for s, f in zip(chunk, feats):
                    self._store(s, f)
                bar.update(len(chunk))
        bar.close()

    def item(self, s: Sample, with_answer: bool = True) -> dict:
        it = {"modality": s.modality, "prompt": s.prompt, "answer": s.answer if with_answer else None}
        if self.cache:
            if not self._cached(s):
                self.warm([s])
            it["features"] = self._load(s)
        else:
            it["media"] = self.media(s)
        return it


class ItemDataset(Dataset):
    def __init__(self, samples: list[Sample], provider: FeatureProvider, with_answer: bool = True):
        self.samples = samples
        self.provider = provider
        self.with_answer = with_answer
        provider.warm(samples)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.provider.item(self.samples[i], self.with_answer)
