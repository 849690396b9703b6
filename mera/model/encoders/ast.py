"""The HF Audio Spectrogram Transformer (``ASTModel``) as an audio encoder: family ``hf_ast``.

An HF-native alternative to BEATs, loaded from a local folder (``ASTModel.save_pretrained``, or
an ``ASTForAudioClassification`` checkpoint such as MIT/ast-finetuned-audioset-10-10-0.4593,
whose backbone is taken).

Preprocessing follows ``ASTFeatureExtractor`` exactly, but in torch (:func:`kaldi_fbank`): the
waveform in [-1, 1] (NOT scaled by 2**15), 16 kHz, Kaldi fbank with a ``hanning`` window,
``num_mel_bins`` (128) bins, 25 ms / 10 ms; the fbank is cropped or zero-padded (in the fbank
domain, before normalisation, as the extractor does) to ``config.max_length`` frames (1024),
then ``(fbank - mean) / (2 * std)`` with the AudioSet mean -4.2677393 and std 4.5689974, or the
values in the folder's ``preprocessor_config.json``. Audio at other rates is resampled
(band-limited) unless ``resample=False``.

Features: ``last_hidden_state`` (after the final LayerNorm) WITHOUT the CLS and distillation
tokens (the first two), as the CLIP encoder drops CLS: ``f * t`` patch tokens with
``f = (mel_bins - 16) // frequency_stride + 1`` and ``t = (max_length - 16) // time_stride + 1``
(12 x 101 = 1212 tokens of width 768 for the AudioSet models). ``keep_special_tokens=True``
keeps them (``f * t + 2`` tokens).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import CheckpointError, ConfigError
from mera.model.encoders.fbank import audio_waveform, kaldi_fbank

AST_MEAN = -4.2677393
AST_STD = 4.5689974


class ASTAudioEncoder(nn.Module):
    family = "hf_ast"

    def __init__(self, model: nn.Module, mean: float = AST_MEAN, std: float = AST_STD, sample_rate: int = 16000,
                 do_normalize: bool = True, keep_special_tokens: bool = False, resample: bool = True):
        super().__init__()
        self.model = model
        cfg = model.config
        self.num_mel_bins, self.max_length = int(cfg.num_mel_bins), int(cfg.max_length)
        self.mean, self.std, self.sample_rate = float(mean), float(std), int(sample_rate)
        self.do_normalize, self.keep_special_tokens, self.allow_resample = do_normalize, keep_special_tokens, resample
        f = (self.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
        t = (self.max_length - cfg.patch_size) // cfg.time_stride + 1
        self.num_patches = f * t
        self.num_tokens = self.num_patches + (2 if keep_special_tokens else 0)
        self.output_dim = int(cfg.hidden_size)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, **options) -> "ASTAudioEncoder":
        from transformers import ASTModel

        if not path or not os.path.isdir(path):
            raise CheckpointError(f"hf_ast: {path!r} is not a folder with an AST checkpoint")
        try:
            model = ASTModel.from_pretrained(path, local_files_only=True, **({"dtype": dtype} if dtype else {}))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"hf_ast: cannot load an ASTModel from {path!r}: {e}") from e
        pp = os.path.join(path, "preprocessor_config.json")
        extra = {}
        if os.path.isfile(pp):
            try:
                with open(pp, encoding="utf-8") as fh:
                    pc = json.load(fh)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{pp}: unreadable preprocessor config ({e})") from None
            for key in ("mean", "std", "do_normalize"):
                if key in pc:
                    extra[key] = pc[key]
            if "sampling_rate" in pc:
                extra["sample_rate"] = int(pc["sampling_rate"])
            for key, mine in (("num_mel_bins", model.config.num_mel_bins), ("max_length", model.config.max_length)):
                if key in pc and int(pc[key]) != int(mine):
                    raise CheckpointError(f"{pp}: {key} {pc[key]} differs from the model config's {mine}")
        return cls(model, **extra, **options)

    @property
    def max_audio_seconds(self) -> float:
        """The window preprocess keeps: ``max_length`` frames of 10 ms and the last frame's 25 ms."""
        return self.max_length * 0.010 + 0.025

    def preprocess(self, media) -> torch.Tensor:
        """AudioClip / (waveform, rate) / waveform -> float32 ``[max_length, num_mel_bins]``."""
        x = audio_waveform(media, self.sample_rate, self.allow_resample, who="hf_ast")
        fb = kaldi_fbank(x, sample_rate=self.sample_rate, num_mel_bins=self.num_mel_bins, window="hanning")
        n = fb.shape[0]
        if n < self.max_length:
            fb = torch.nn.functional.pad(fb, (0, 0, 0, self.max_length - n))
        else:
            fb = fb[: self.max_length]
        if self.do_normalize:
            fb = (fb - self.mean) / (2 * self.std)
        return fb.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, max_length, mel] -> [B, N, D]
        x = x.to(self.model.dtype)
        h = self.model(input_values=x).last_hidden_state
        return h if self.keep_special_tokens else h[:, 2:]


class HFASTParams(StrictModel):
    dtype: str | None = None
    keep_special_tokens: bool = False  # False: drop the CLS and distillation tokens
    resample: bool = True  # False: audio at another rate is a DataError


@register("encoder", "hf_ast", HFASTParams)
def load_hf_ast(path: str | None, dtype: str | None = None, keep_special_tokens: bool = False,
                resample: bool = True) -> ASTAudioEncoder:
    """``hf_ast``: a local folder with an AST checkpoint (+ optional ``preprocessor_config.json``).
    Options: ``dtype``, ``keep_special_tokens`` (False: drop CLS + distillation), ``resample``."""
    torch_dtype = None
    if dtype:
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ConfigError(f"hf_ast: unknown dtype {dtype!r}")
    return ASTAudioEncoder.from_pretrained(path, dtype=torch_dtype, keep_special_tokens=keep_special_tokens,
                                           resample=resample)
