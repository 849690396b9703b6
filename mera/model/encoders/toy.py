"""The toy world's encoders (the roles of CLIP, BEATs and Point-BERT), and their pre-training.

Every encoder gives 16 tokens of width 64:

- ``toy_image``: a small CNN (with two coordinate channels) on a 32x32 image -> a 4x4 grid.
- ``toy_video``: the image encoder on each of 4 frames (uniformly sampled when there are more),
  each frame's 4x4 map pooled 2x (bilinear) to 2x2, as the paper does with CLIP -> 4 x 4 tokens.
- ``toy_audio``: log-magnitude ``torch.stft`` spectrogram, then 1-D convolutions over time,
  pooled to 16 time steps.
- ``toy_point``: a tiny PointNet over 16 groups: farthest-point sampling (fixed start index 0)
  of 16 centres, 16 nearest neighbours each, a shared MLP max-pooled per group, then a
  global feature mixed back into every token.

:func:`pretrain_toy_encoders` trains the image, audio and point encoders on freshly generated
scenes with linear attribute-classification heads (the auxiliary objective), reports held-out
accuracy per attribute, and saves ``<modality>/model.safetensors`` + ``config.json``.
Video needs no training: it reuses the image encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera.errors import CheckpointError, ConfigError, DataError
from mera.io import atomic_path, write_json
from mera.model.encoders.base import register_encoder

# ------------------------------------------------------------------------------ encoders


class ToyImageEncoder(nn.Module):
    """uint8 [H, W, 3] -> 16 tokens (a 4x4 grid, row-major) of width ``dim``."""

    family = "toy_image"

    def __init__(self, image_size: int = 32, dim: int = 64, width: int = 24, grid: int = 4):
        super().__init__()
        self.image_size, self.dim, self.width, self.grid = image_size, dim, width, grid
        self.output_dim = dim
        self.num_tokens = grid * grid
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.GELU()]

        self.net = nn.Sequential(
            *block(5, w, 1), *block(w, w, 2),  # 16 x 16
            *block(w, 2 * w, 1), *block(2 * w, 2 * w, 2),  # 8 x 8
            *block(2 * w, dim, 2),  # 4 x 4
        )
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        t = torch.linspace(-1.0, 1.0, image_size)
        coords = torch.stack([t[None, :].expand(image_size, -1), t[:, None].expand(-1, image_size)])
        self.register_buffer("coords", coords, persistent=False)

    def config(self) -> dict:
        return {"image_size": self.image_size, "dim": self.dim, "width": self.width, "grid": self.grid}

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> float [3, S, S] (resized when not S x S), centred and scaled."""
        img = np.asarray(media)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise DataError(f"toy_image: expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()
        if x.shape[1:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        return (x / 255.0 - 0.5) / 0.25

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, D, grid, grid] (after the projection and norm)."""
        b = x.shape[0]
        h = self.net(torch.cat([x, self.coords.to(x.dtype).expand(b, -1, -1, -1)], 1))
        h = F.adaptive_avg_pool2d(h, self.grid)
        tok = self.norm(self.proj(h.flatten(2).transpose(1, 2)))  # [B, T, D]
        return tok.transpose(1, 2).reshape(b, self.dim, self.grid, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).flatten(2).transpose(1, 2)


class ToyVideoEncoder(nn.Module):
    """uint8 [F, H, W, 3] -> ``frames`` x (grid/2)^2 tokens: the image encoder per frame, pooled 2x."""

    family = "toy_video"

    def __init__(self, image_encoder: ToyImageEncoder, frames: int = 4):
        super().__init__()
        self.image = image_encoder
        self.frames = frames
        self.pooled = max(1, image_encoder.grid // 2)
        self.output_dim = image_encoder.output_dim
        self.num_tokens = frames * self.pooled * self.pooled

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> float [frames, 3, S, S]; ``frames`` uniformly sampled frames."""
        v = np.asarray(media)
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[3] != 3 or v.shape[0] < 1:
            raise DataError(f"toy_video: expected uint8 frames (F, H, W, 3), got {v.dtype} {v.shape}")
        idx = np.linspace(0, v.shape[0] - 1, self.frames).round().astype(int)
        return torch.stack([self.image.preprocess(v[i]) for i in idx])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[:2]
        fm = self.image.feature_map(x.flatten(0, 1))  # [B*F, D, g, g]
        fm = F.interpolate(fm, size=(self.pooled, self.pooled), mode="bilinear", align_corners=False)
        tok = fm.flatten(2).transpose(1, 2)  # [B*F, p*p, D]
        return tok.reshape(b, f * self.pooled * self.pooled, self.output_dim)


class ToyAudioEncoder(nn.Module):
    """AudioClip (or a waveform at ``sample_rate``) -> ``num_tokens`` time tokens of width ``dim``."""

    family = "toy_audio"

    def __init__(self, sample_rate: int = 8000, seconds: float = 1.0, n_fft: int = 256, hop: int = 64,
                 dim: int = 64, width: int = 64, num_tokens: int = 16):
        super().__init__()
        self.sample_rate, self.seconds, self.n_fft, self.hop = sample_rate, seconds, n_fft, hop
        self.dim, self.width = dim, width
        self.output_dim, self.num_tokens = dim, num_tokens
        self.length = int(round(sample_rate * seconds))
        bins = n_fft // 2 + 1

        def block(cin, cout, stride):
            return [nn.Conv1d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.GELU()]

        self.net = nn.Sequential(*block(bins, width, 1), *block(width, width, 2), *block(width, width, 1),
                                 *block(width, dim, 2))
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def config(self) -> dict:
        return {"sample_rate": self.sample_rate, "seconds": self.seconds, "n_fft": self.n_fft, "hop": self.hop,
                "dim": self.dim, "width": self.width, "num_tokens": self.num_tokens}

    def preprocess(self, media) -> torch.Tensor:
        """AudioClip -> float [n] at ``sample_rate`` (linear resampling), cropped / zero-padded to ``seconds``."""
        if isinstance(media, tuple) and len(media) == 2:
            wav, rate = media
        else:
            wav, rate = media, self.sample_rate
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1 or wav.size == 0:
            raise DataError(f"toy_audio: expected a mono waveform [n], got shape {wav.shape}")
        if int(rate) != self.sample_rate:
            n_out = max(1, int(round(wav.size * self.sample_rate / int(rate))))
            t_out = np.arange(n_out) * (int(rate) / self.sample_rate)
            wav = np.interp(t_out, np.arange(wav.size), wav).astype(np.float32)
        out = np.zeros(self.length, dtype=np.float32)
        k = min(self.length, wav.size)
        out[:k] = wav[:k]
        return torch.from_numpy(out)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window.to(x.dtype), center=True, return_complex=True)
        return torch.log1p(spec.abs() * 4.0)  # [B, bins, frames]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(self.spectrogram(x))
        h = F.adaptive_avg_pool1d(h, self.num_tokens)
        return self.norm(self.proj(h.transpose(1, 2)))


def farthest_point_sample(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N, 3] -> [B, k] indices; starts at index 0, so the result is deterministic."""
    b, n, _ = xyz.shape
    idx = torch.zeros(b, k, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), device=xyz.device, dtype=xyz.dtype)
    far = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(k):
        idx[:, i] = far
        c = xyz[rows, far][:, None, :]
        dist = torch.minimum(dist, ((xyz - c) ** 2).sum(-1))
        far = dist.argmax(-1)
    return idx


class ToyPointEncoder(nn.Module):
    """float [N, 6] (xyz + rgb) -> ``num_groups`` tokens of width ``dim`` (a tiny PointNet over groups)."""

    family = "toy_point"

    def __init__(self, n_points: int = 256, num_groups: int = 16, group_size: int = 16, dim: int = 64,
                 width: int = 64):
        super().__init__()
        self.n_points, self.num_groups, self.group_size = n_points, num_groups, group_size
        self.dim, self.width = dim, width
        self.output_dim, self.num_tokens = dim, num_groups
        self.local = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, width))
        self.group = nn.Sequential(nn.Linear(width + 3, width), nn.GELU(), nn.Linear(width, width))
        self.mix = nn.Sequential(nn.Linear(2 * width, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def config(self) -> dict:
        return {"n_points": self.n_points, "num_groups": self.num_groups, "group_size": self.group_size,
                "dim": self.dim, "width": self.width}

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """(N, 6) -> float [n_points, 6]: evenly strided subsample (or repeats), xyz into the unit sphere."""
        p = np.asarray(media, dtype=np.float32)
        if p.ndim != 2 or p.shape[1] != 6 or p.shape[0] == 0:
            raise DataError(f"toy_point: expected a point cloud (N, 6), got shape {p.shape}")
        if p.shape[0] != self.n_points:
            p = p[np.linspace(0, p.shape[0] - 1, self.n_points).round().astype(int)]
        xyz = p[:, :3] - p[:, :3].mean(0)
        xyz = xyz / max(float(np.linalg.norm(xyz, axis=1).max()), 1e-6)
        return torch.from_numpy(np.concatenate([xyz, np.clip(p[:, 3:], 0.0, 1.0)], 1).astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xyz = x[..., :3]
        centres_idx = farthest_point_sample(xyz, self.num_groups)  # [B, G]
        rows = torch.arange(b, device=x.device)[:, None]
        centres = xyz[rows, centres_idx]  # [B, G, 3]
        knn = torch.cdist(centres, xyz).topk(self.group_size, dim=-1, largest=False).indices  # [B, G, k]
        grouped = x[rows[:, :, None], knn]  # [B, G, k, 6]
        rel = (grouped[..., :3] - centres[:, :, None, :]) * 4.0
        local = self.local(torch.cat([rel, grouped[..., 3:] - 0.5], -1)).amax(2)  # [B, G, W]
        feat = self.group(torch.cat([local, centres], -1))
        glob = feat.amax(1, keepdim=True).expand(-1, self.num_groups, -1)
        return self.norm(self.mix(torch.cat([feat, glob], -1)))


_CLASSES = {"toy_image": ToyImageEncoder, "toy_audio": ToyAudioEncoder, "toy_point": ToyPointEncoder}
FAMILY_OF = {"image": "toy_image", "video": "toy_video", "audio": "toy_audio", "point": "toy_point"}


def build_toy_encoder(modality: str, **kwargs) -> nn.Module:
    """A freshly initialised toy encoder for ``modality`` (video: around a fresh image encoder)."""
    if modality == "video":
        frames = kwargs.pop("frames", 4)
        return ToyVideoEncoder(ToyImageEncoder(**kwargs), frames=frames)
    return _CLASSES[FAMILY_OF[modality]](**kwargs)


# ------------------------------------------------------------------------------ save / load


def save_toy_encoder(encoder: nn.Module, folder: str | os.PathLike, extra: dict | None = None) -> str:
    """Write ``model.safetensors`` and ``config.json`` (atomically); returns the weights' sha256."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"family": encoder.family})
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    write_json(folder / "config.json", {"family": encoder.family, **encoder.config(), **(extra or {})})
    return digest


def _load(path, family: str) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (expected a {family} encoder folder)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable encoder config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("family") != family:
        got = cfg.get("family") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{cfg_path}: family is {got!r}, expected {family!r}")
    cls = _CLASSES[family]
    import inspect

    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    try:
        enc = cls(**{k: v for k, v in cfg.items() if k in params})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: bad {family} config ({e})") from None
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing encoder weights")
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{w_path}: cannot read weights ({e})") from None
    missing, unexpected = set(enc.state_dict()) - set(state), set(state) - set(enc.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{w_path}: weights do not match {family} (missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]})")
    try:
        enc.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{w_path}: weights do not match the config ({e})") from None
    return enc


def _load_or_build(path, family: str, options: dict) -> nn.Module:
    """A saved encoder (``path`` given: no options allowed) or a fresh random one built from ``options``."""
    if path is None:
        try:
            return _CLASSES[family](**options)
        except TypeError as e:
            raise ConfigError(f"{family}: bad options {options} ({e})") from None
    if options:
        raise ConfigError(f"{family}: options {sorted(options)} are not accepted with a saved encoder ({path})")
    return _load(path, family)


@register_encoder("toy_image")
def load_toy_image(path: str | None = None, **options) -> ToyImageEncoder:
    """``path``: a folder written by :func:`save_toy_encoder`; None gives a fresh random encoder (tests)."""
    return _load_or_build(path, "toy_image", options)


@register_encoder("toy_audio")
def load_toy_audio(path: str | None = None, **options) -> ToyAudioEncoder:
    return _load_or_build(path, "toy_audio", options)


@register_encoder("toy_point")
def load_toy_point(path: str | None = None, **options) -> ToyPointEncoder:
    return _load_or_build(path, "toy_point", options)


@register_encoder("toy_video")
def load_toy_video(path: str | None = None, frames: int = 4, **options) -> ToyVideoEncoder:
    """``path`` is the IMAGE encoder's folder: video reuses it on each frame."""
    return ToyVideoEncoder(_load_or_build(path, "toy_image", options), frames=frames)


# ------------------------------------------------------------------------------ auxiliary pre-training

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
