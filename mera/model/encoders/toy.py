"""The toy world's encoders (the roles of CLIP, BEATs and Point-BERT).

Every encoder gives 16 tokens of width 64:

- ``toy_image``: a small CNN (with two coordinate channels) on a 32x32 image -> a 4x4 grid.
- ``toy_video``: the image encoder on each of 4 frames (uniformly sampled when there are more),
  each frame's 4x4 map pooled 2x (bilinear) to 2x2, as the paper does with CLIP -> 4 x 4 tokens.
- ``toy_audio``: log-magnitude ``torch.stft`` spectrogram, then 1-D convolutions over time,
  pooled to 16 time steps.
- ``toy_point``: a tiny PointNet over 16 groups: farthest-point sampling (fixed start index 0)
  of 16 centres, 16 nearest neighbours each, a shared MLP max-pooled per group, then a
  global feature mixed back into every token.

Their auxiliary pre-training lives with the zoo that runs it (:mod:`mera.zoo.encoders`); this
module defines, saves and loads them. Video needs no training: it reuses the image encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import CheckpointError, ConfigError, DataError
from mera.io import atomic_path, write_json

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

    @property
    def max_audio_seconds(self) -> float:
        """The window preprocess keeps (mera.data.media reads no more of a file)."""
        return float(self.seconds)

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


# The options of a fresh (random, path None) encoder: its constructor's; a saved encoder takes none.


class ToyImageParams(StrictModel):
    image_size: int = 32
    dim: int = 64
    width: int = 24
    grid: int = 4


class ToyAudioParams(StrictModel):
    sample_rate: int = 8000
    seconds: float = 1.0
    n_fft: int = 256
    hop: int = 64
    dim: int = 64
    width: int = 64
    num_tokens: int = 16


class ToyPointParams(StrictModel):
    n_points: int = 256
    num_groups: int = 16
    group_size: int = 16
    dim: int = 64
    width: int = 64


class ToyVideoParams(ToyImageParams):
    """``frames`` (4), and the image encoder's options (for a fresh one)."""

    frames: int = 4


@register("encoder", "toy_image", ToyImageParams)
def load_toy_image(path: str | None = None, **options) -> ToyImageEncoder:
    """``path``: a folder written by :func:`save_toy_encoder`; None gives a fresh random encoder (tests)."""
    return _load_or_build(path, "toy_image", options)


@register("encoder", "toy_audio", ToyAudioParams)
def load_toy_audio(path: str | None = None, **options) -> ToyAudioEncoder:
    return _load_or_build(path, "toy_audio", options)


@register("encoder", "toy_point", ToyPointParams)
def load_toy_point(path: str | None = None, **options) -> ToyPointEncoder:
    return _load_or_build(path, "toy_point", options)


@register("encoder", "toy_video", ToyVideoParams)
def load_toy_video(path: str | None = None, frames: int = 4, **options) -> ToyVideoEncoder:
    """``path`` is the IMAGE encoder's folder: video reuses it on each frame."""
    return ToyVideoEncoder(_load_or_build(path, "toy_image", options), frames=frames)
