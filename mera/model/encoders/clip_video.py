"""The HF CLIP vision encoder on a few video frames (family ``hf_clip_video``).

Per sample, ``frames`` (4) frames are taken at indices ``round(linspace(0, F - 1, frames))`` of the
decoded clip (:func:`mera.data.video.sample_indices`: first and last frame included; a clip with
fewer frames repeats some). Each frame is preprocessed exactly as an image by ``hf_clip``
(pad to square with the CLIP mean colour, resize, normalise) and encoded by the CLIP vision model;
its features are the penultimate layer's hidden states without CLS, a ``g x g`` grid
(``g = image_size / patch_size``, 24 for ViT-L/14-336), which is reshaped row-major to
``[D, g, g]`` and downsampled ``pool``-fold (2) with bilinear interpolation
(``F.interpolate(..., size=(g // pool, g // pool), mode="bilinear", align_corners=False)``;
for an even ``g`` and ``pool = 2`` that is the mean of each 2 x 2 patch) to ``(g // pool)^2`` tokens
(144). The frames' tokens are concatenated in time order: ``frames * (g // pool)^2`` tokens
(576 x 1024 for ViT-L/14-336), before the connector.

``preprocess`` takes the decoded clip ``uint8 [F, H, W, 3]`` (what ``read_media("video", ...)``
returns for a list of frame files, or :func:`mera.data.video.read_video_frames` for a video file),
or a path to a video file, which it decodes with ``read_video_frames`` (seeking, only the sampled
frames).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import ConfigError, DataError
from mera.model.encoders.clip import ClipVisionEncoder


class ClipVideoEncoder(nn.Module):
    """uint8 ``[F, H, W, 3]`` -> ``frames * (g // pool)^2`` tokens of the CLIP width."""

    family = "hf_clip_video"

    def __init__(self, image_encoder: ClipVisionEncoder, frames: int = 4, pool: int = 2):
        super().__init__()
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ConfigError(f"hf_clip_video: frames must be a positive integer, got {frames!r}")
        if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
            raise ConfigError(f"hf_clip_video: pool must be a positive integer, got {pool!r}")
        self.image = image_encoder
        self.frames = frames
        self.pool = pool
        self.grid = image_encoder.image_size // int(image_encoder.model.config.patch_size)
        if self.grid * self.grid != image_encoder.num_tokens:
            raise ConfigError(f"hf_clip_video: a {self.grid} x {self.grid} grid does not hold "
                              f"{image_encoder.num_tokens} tokens")
        self.pooled = max(1, self.grid // pool)
        self.output_dim = image_encoder.output_dim
        self.num_tokens = frames * self.pooled * self.pooled

    def sample(self, total: int) -> np.ndarray:
        from mera.data.video import sample_indices

        return sample_indices(total, self.frames)

    def preprocess(self, media) -> torch.Tensor:
        """uint8 ``[F, H, W, 3]`` (or a video file path) -> float ``[frames, 3, S, S]``."""
        if isinstance(media, (str, os.PathLike)):
            from mera.data.video import read_video_frames

            media = read_video_frames(media, self.frames)
        v = np.asarray(media)
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[3] != 3 or v.shape[0] < 1:
            raise DataError(f"hf_clip_video: expected uint8 frames (F, H, W, 3), got {v.dtype} {v.shape}")
        return torch.stack([self.image.preprocess(v[i]) for i in self.sample(v.shape[0])])

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, D, g, g]``: CLIP's penultimate-layer patch tokens as a grid."""
        tok = self.image(x)  # [N, g*g, D]
        n, t, d = tok.shape
        return tok.transpose(1, 2).reshape(n, d, self.grid, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, F, 3, S, S] -> [B, F * p * p, D]
        if x.ndim != 5:
            raise DataError(f"hf_clip_video: expected frames [B, F, 3, S, S], got {tuple(x.shape)}")
        b, f = x.shape[:2]
        fm = self.frame_features(x.flatten(0, 1))
        if self.pooled != self.grid:
            fm = F.interpolate(fm, size=(self.pooled, self.pooled), mode="bilinear", align_corners=False)
        tok = fm.flatten(2).transpose(1, 2)  # [B*F, p*p, D]
        return tok.reshape(b, f * self.pooled * self.pooled, self.output_dim)


class HFClipVideoParams(StrictModel):
    frames: int = 4  # frames sampled per clip
    pool: int = 2  # each frame's g x g grid is downsampled to (g // pool)^2 tokens
    feature_layer: int = -2
    dtype: str | None = None


@register("encoder", "hf_clip_video", HFClipVideoParams)
def load_hf_clip_video(path: str | None, frames: int = 4, pool: int = 2, feature_layer: int = -2,
                       dtype: str | None = None) -> ClipVideoEncoder:
    """``hf_clip_video``: the same folder as ``hf_clip`` (a ``CLIPVisionModel`` or full CLIP checkpoint).
    Options: ``frames`` (4), ``pool`` (2), ``feature_layer`` (-2), ``dtype``."""
    torch_dtype = getattr(torch, str(dtype), None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"hf_clip_video: unknown dtype {dtype!r}")
    image = ClipVisionEncoder.from_pretrained(path, feature_layer=feature_layer, dtype=torch_dtype)
    return ClipVideoEncoder(image, frames=frames, pool=pool)
