"""The HF CLIP vision encoder, LLaVA-1.5 style (family ``hf_clip``).

Features are the penultimate layer's hidden states with the CLS token dropped:
(image_size / patch_size)^2 tokens of width hidden_size (576 x 1024 for ViT-L/14-336).
Preprocessing pads the image to a square with the CLIP mean colour (x255), as LLaVA-1.5's
``expand2square``, then resizes and normalises with the CLIP mean / std: through the folder's
``CLIPImageProcessor`` when it has a ``preprocessor_config.json``, else in torch with the CLIP
constants (bicubic, antialiased).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import CheckpointError, DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """Centre ``image`` (H, W, 3 uint8) on a square canvas of colour ``fill`` (LLaVA's expand2square)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    s = max(h, w)
    canvas = np.empty((s, s, 3), dtype=np.uint8)
    canvas[...] = np.asarray(fill, dtype=np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top:top + h, left:left + w] = image
    return canvas


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"an image must be uint8 (H, W, 3); got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise DataError(f"an image must be (H, W, 3); got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image[:, :, :3]


class ClipVisionEncoder(nn.Module):
    def __init__(self, model: nn.Module, image_processor=None, feature_layer: int = -2):
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.feature_layer = feature_layer
        cfg = model.config
        self.image_size = int(cfg.image_size)
        self.output_dim = int(cfg.hidden_size)
        self.num_tokens = (self.image_size // int(cfg.patch_size)) ** 2
        mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
        self.image_mean, self.image_std = mean, std
        self.register_buffer("_mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str, feature_layer: int = -2, dtype: torch.dtype | None = None):
        from transformers import CLIPVisionModel

        if not path or not os.path.isdir(path):
            raise CheckpointError(f"hf_clip: {path!r} is not a folder with a CLIP checkpoint")
        try:
            model = CLIPVisionModel.from_pretrained(path, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"hf_clip: cannot load a CLIPVisionModel from {path!r}: {e}") from e
        processor = None
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, feature_layer)

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, S, S), padded to square, resized, CLIP-normalised."""
        image = _as_rgb_uint8(media)
        fill = tuple(int(m * 255) for m in self.image_mean)
        image = pad_to_square(image, fill)
        if self.image_processor is not None:
            pixel = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            return pixel.float()
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().unsqueeze(0)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True)
        x = (x[0].clamp(0, 255) / 255.0 - self._mean.cpu()) / self._std.cpu()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, N, D]
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]


class HFClipParams(StrictModel):
    feature_layer: int = -2  # hidden state taken as the features (-2: the penultimate layer)
    dtype: str | None = None  # e.g. "bfloat16"; None: the checkpoint's


@register("encoder", "hf_clip", HFClipParams)
def load_hf_clip(path: str | None, feature_layer: int = -2, dtype: str | None = None) -> ClipVisionEncoder:
    """``hf_clip``: a local folder saved by ``CLIPVisionModel.save_pretrained`` (or a full CLIP
    checkpoint such as openai/clip-vit-large-patch14-336, whose vision tower is taken)."""
    torch_dtype = getattr(torch, dtype) if dtype else None
    return ClipVisionEncoder.from_pretrained(path, feature_layer=feature_layer, dtype=torch_dtype)
