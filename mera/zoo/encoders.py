"""The toy encoders' auxiliary pre-training: the zoo builds them here; the model layer
(:mod:`mera.model.encoders.toy`) only defines, saves and loads them.

:func:`pretrain_toy_encoders` trains the image, audio and point encoders on freshly generated
scenes with linear attribute-classification heads (the auxiliary objective), reports held-out
accuracy per attribute, and saves ``<modality>/model.safetensors`` + ``config.json``.
Video needs no training: it reuses the image encoder.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera.model.encoders.toy import build_toy_encoder, save_toy_encoder

# modality -> (training scenes, epochs, batch size, learning rate)
_RECIPE = {
    "image": (3000, 8, 64, 2e-3),
    "audio": (3000, 8, 64, 3e-3),
    "point": (4000, 8, 64, 3e-3),
}
_N_HELDOUT = 600


class _AuxHeads(nn.Module):
    """Linear attribute-classification heads on an encoder's tokens.

    Audio and point: linear heads on the pooled tokens (mean and max), one per attribute.
    Image: dense heads on each token of the grid (is a shape centred in this cell? its colour,
    shape, size and fine x / y bin), which makes every token describe what lies under it, as
    a vision encoder's patch features do; plus ``count`` on the pooled tokens.
    """

    def __init__(self, modality: str, encoder: nn.Module):
        super().__init__()
        from mera.data.toy_world import _XY_BINS, attribute_heads

        self.modality, self.bins = modality, _XY_BINS
        self.attr_names = list(attribute_heads(modality))
        d = encoder.output_dim
        if modality == "image":
            self.grid = encoder.grid
            heads = attribute_heads(modality)
            self.dense = {"presence": 2, "colour": heads["colour_1"], "shape": heads["shape_1"],
                          "size": heads["size_1"], "x": self.bins, "y": self.bins}
            self.pooled = {"count": 2}
        else:
            self.dense = {}
            self.pooled = attribute_heads(modality)
        self.cell = nn.Linear(d, sum(self.dense.values())) if self.dense else None
        self.pool = nn.Linear(2 * d, sum(self.pooled.values()))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(zip(self.pooled, self.pool(torch.cat([tokens.mean(1), tokens.amax(1)], -1))
                       .split(list(self.pooled.values()), -1)))
        if self.cell is not None:
            out |= dict(zip(self.dense, self.cell(tokens).split(list(self.dense.values()), -1)))
        return out

    def targets(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute rows ``y`` [B, A] (the order of ``attribute_heads``) -> a target per head (-1: ignore)."""
        col = {n: y[:, i] for i, n in enumerate(self.attr_names)}
        t = {n: col[n] for n in self.pooled}
        if self.dense:
            b, cells = y.shape[0], self.grid * self.grid
            dense = {n: torch.full((b, cells), -1, dtype=torch.long) for n in self.dense}
            dense["presence"].zero_()
            rows = torch.arange(b)
            for k in (1, 2):
                on = col[f"x_{k}"] >= 0
                xk, yk = col[f"x_{k}"].clamp(min=0), col[f"y_{k}"].clamp(min=0)
                cell = (yk * self.grid // self.bins) * self.grid + xk * self.grid // self.bins
                r, c = rows[on], cell[on]
                dense["presence"][r, c] = 1
                for n, src in (("colour", f"colour_{k}"), ("shape", f"shape_{k}"), ("size", f"size_{k}"),
                               ("x", f"x_{k}"), ("y", f"y_{k}")):
                    dense[n][r, c] = col[src][on]
            t |= dense
        return t


_LOSS_WEIGHT = {"shape": 4.0}  # the slowest attribute to learn: pull it up front


def _loss(logits: dict, targets: dict) -> torch.Tensor:
    total, norm = 0.0, 0.0
    for n, lg in logits.items():
        w = _LOSS_WEIGHT.get(n, 1.0)
        total = total + w * F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[n].reshape(-1), ignore_index=-1)
        norm += w
    return total / norm


def _scenes(modality: str, n: int, rng: np.random.Generator, world_cfg, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    from mera.data.toy_world import attribute_heads, draw

    heads = list(attribute_heads(modality))
    xs, ys = [], []
    for _ in range(n):
        media, a = draw(modality, rng, world_cfg)
        xs.append(encoder.preprocess(media))
        ys.append([a[h] for h in heads])
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _accuracy(encoder, heads, x, y, batch: int = 256) -> dict[str, float]:
    correct: dict[str, float] = {}
    total: dict[str, float] = {}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = heads(encoder(x[i:i + batch]))
            tg = heads.targets(y[i:i + batch])
            for n, lg in logits.items():
                m = tg[n] >= 0
                correct[n] = correct.get(n, 0.0) + float((lg.argmax(-1)[m] == tg[n][m]).sum())
                total[n] = total.get(n, 0.0) + float(m.sum())
    return {n: round(correct[n] / total[n], 4) for n in correct if total[n] > 0}


def train_toy_encoder(modality: str, world_cfg=None, seed: int = 0, scale: float = 1.0, progress: bool = False,
                      recipe: tuple | None = None) -> tuple[nn.Module, dict[str, float], dict[str, float]]:
    """Train one encoder with linear attribute heads; returns ``(encoder, held-out accuracy, chance)``.

    ``chance`` is the majority-class rate of each head on the held-out scenes. ``scale``
    multiplies the number of training scenes (tests use a fraction); ``recipe`` overrides
    ``(scenes, epochs, batch, lr)``. Deterministic: scenes from ``default_rng``, weights and
    shuffling from seeded torch RNGs (the global torch RNG state is restored afterwards).
    """
    from tqdm.auto import tqdm

    from mera.data.toy_world import ToyWorldConfig

    world_cfg = world_cfg or ToyWorldConfig()
    n_train, epochs, bs, lr = recipe or _RECIPE[modality]
    n_train = max(bs, int(n_train * scale))
    kwargs = {"image": {"image_size": world_cfg.image_size},
              "audio": {"sample_rate": world_cfg.audio_rate, "seconds": world_cfg.audio_seconds},
              "point": {"n_points": world_cfg.n_points}}[modality]
    mi = ("image", "video", "audio", "point").index(modality)
    # Why this loop does not use mera.train.loop.train_phase: train_phase batches, shuffles and
    # schedules its own way, so switching would change the cached zoo's encoder weights and with them
    # every toy score, which the project keeps byte-identical. Nor does this loop need what
    # train_phase carries (the multimodal collator, gradient accumulation, Accelerate, resumable
    # step checkpoints): it trains a whole small encoder and its heads on plain tensors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + mi)
        enc = build_toy_encoder(modality, **kwargs)
        heads = _AuxHeads(modality, enc)
        x, y = _scenes(modality, n_train, np.random.default_rng([seed, mi, 4242]), world_cfg, enc)
        xv, yv = _scenes(modality, _N_HELDOUT, np.random.default_rng([seed, mi, 4343]), world_cfg, enc)
        gen = torch.Generator().manual_seed(seed * 1000 + mi + 7)
        opt = torch.optim.AdamW(list(enc.parameters()) + list(heads.parameters()), lr=lr, weight_decay=1e-4)
        steps = epochs * math.ceil(n_train / bs)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        bar = tqdm(total=steps, desc=f"toy {modality} encoder", disable=not progress, leave=False)
        enc.train()
        for _ in range(epochs):
            perm = torch.randperm(n_train, generator=gen)
            for i in range(0, n_train, bs):
                idx = perm[i:i + bs]
                loss = _loss(heads(enc(x[idx])), heads.targets(y[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        enc.eval()
        acc = _accuracy(enc, heads, xv, yv)
    enc.requires_grad_(False)
    chance = {}
    for n, t in heads.targets(yv).items():
        t = t[t >= 0]
        chance[n] = round(float(torch.bincount(t).max()) / len(t), 4)
    return enc, acc, chance


def pretrain_toy_encoders(out_dir: str | os.PathLike, world_cfg=None, seed: int = 0, progress: bool = True,
                          scale: float = 1.0, recipes: dict[str, tuple] | None = None) -> dict:
    """Pre-train the image, audio and point encoders; save each under ``out_dir/<modality>/``.

    Returns ``{modality: {"path", "family", "aux_accuracy", "chance", "seconds", "sha256"}}``
    (``sha256`` of ``model.safetensors``). The video encoder is
    ``load_encoder("toy_video", out_dir/"image")``. ``scale`` / ``recipes`` (modality ->
    ``(scenes, epochs, batch, lr)``) shrink the training for tests.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    summary = {}
    for modality in ("image", "audio", "point"):
        t0 = time.perf_counter()
        enc, acc, chance = train_toy_encoder(modality, world_cfg, seed=seed, scale=scale, progress=progress,
                                             recipe=(recipes or {}).get(modality))
        seconds = time.perf_counter() - t0
        digest = save_toy_encoder(enc, out / modality, {"aux_accuracy": acc, "chance": chance, "seed": seed})
        summary[modality] = {"path": str(out / modality), "family": enc.family, "aux_accuracy": acc,
                             "chance": chance, "seconds": round(seconds, 2), "sha256": digest}
        if progress:
            tqdm.write(f"toy {modality} encoder: {seconds:.1f} s, held-out accuracy "
                       + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    return summary
