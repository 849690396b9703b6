"""The replay memory: what a method may keep of a modality once the next one arrives.

The paper grants "access to a r% size subset of previous data": for each modality, r% of its
training samples (captions and QA mixed), **drawn once** when the modality is learned and kept
for every later stage; replay (step B) and realign use the same memory. The draw depends only
on the run's seed and the modality (never on the stage, the order or the method), and the
memories of different ratios are nested: the 1% memory is the first 1% of the same random
permutation whose first 10% is the 10% memory. ``k = max(1, round(r * n))`` samples.

Each memory a run uses is recorded once in ``<run>/replay_memory/<modality>_r<ratio>.json``
(its ratio, size and sample ids), so a reader can check what was replayed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mera.continual.assets import seed_for
from mera.io import write_text


class ReplayMemory:
    def __init__(self, sets: dict, seed: int, record_dir: Path | None = None):
        self.sets = sets  # modality -> ModalitySets
        self.seed = seed
        self.record_dir = record_dir  # None: not recorded (e.g. a non-main process)
        self._perm: dict[str, np.ndarray] = {}
        self._recorded: set = set()

    def permutation(self, modality: str) -> np.ndarray:
        if modality not in self._perm:
            rng = np.random.default_rng(seed_for(self.seed, "replay-memory", modality))
            self._perm[modality] = rng.permutation(len(self.sets[modality].train))
        return self._perm[modality]

    def samples(self, modality: str, ratio: float) -> list:
        """The r% memory of ``modality`` (in the training set's order)."""
        pool = self.sets[modality].train
        if not pool:
            return []
        k = min(len(pool), max(1, int(round(ratio * len(pool)))))
        idx = np.sort(self.permutation(modality)[:k])
        out = [pool[i] for i in idx]
        self._record(modality, ratio, out)
        return out

    def _record(self, modality: str, ratio: float, samples: list) -> None:
        if self.record_dir is None or (modality, ratio) in self._recorded:
            return
        self._recorded.add((modality, ratio))
        path = self.record_dir / f"{modality}_r{ratio:g}.json"
        text = json.dumps({"modality": modality, "ratio": ratio, "size": len(samples),
                           "of": len(self.sets[modality].train), "ids": [s.id for s in samples]}) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)  # the same content from every process that draws it
