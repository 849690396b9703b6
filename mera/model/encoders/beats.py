"""BEATs (Chen et al., 2022), the paper's audio encoder: family ``beats``.

Our own implementation of the network of microsoft/unilm ``beats/BEATs.py`` + ``backbone.py``,
inference only, with module names equal to the official state-dict keys, so the official
``BEATs_iter3_plus_AS2M.pt`` loads with ``strict=True``:

- input: 16 kHz mono, ``waveform * 2**15``, Kaldi fbank (128 mel bins, 25 ms / 10 ms, povey
  window; :mod:`mera.model.encoders.fbank`), normalised ``(fbank - 15.41663) / (2 * 6.55582)``;
- ``patch_embedding``: ``Conv2d(1, 512, 16, stride 16, bias=False)`` on ``[B, 1, T, 128]``, the
  ``[B, 512, T // 16, 8]`` map flattened time-major (token ``t * 8 + f``), ``layer_norm`` (512),
  ``post_extract_proj`` (512 -> 768);
- ``encoder.pos_conv``: a weight-normalised (``weight_g`` / ``weight_v``, dim 2) grouped
  ``Conv1d(768, 768, 128, padding 64, groups 16)``, its last frame dropped, GELU, added to the
  input; then ``encoder.layer_norm``;
- 12 post-LN layers, DeepNorm: ``x = LN(x * (2 * layers) ** 0.25 + f(x))`` for attention and
  FFN (3072, GELU); 12 heads of 64; a T5-style bidirectional relative position bias (320
  buckets, max distance 800) from ONE table, ``encoder.layers.0.self_attn.relative_attention_bias``
  (shared by all layers), scaled per query and head by the gate of ``grep_linear`` /
  ``grep_a``: ``a * (b * grep_a - 1) + 2`` with ``(a, b) = sigmoid(sum of grep_linear(q) in two
  groups of 4)``, ``q`` the query projection before scaling.

Upstream computes attention as ``((q / sqrt(d) / 32) k^T - max) * 32`` for fp16 range; that
is the same softmax as ``q k^T / sqrt(d)`` (a per-row constant shift), so we use
``scaled_dot_product_attention`` with the gated bias as an additive mask.

Output: the last layer's hidden states, ``[B, (T // 16) * (128 // 16), 768]``; 10 s of audio:
998 fbank frames -> 62 x 8 patches -> 496 tokens.

Checkpoints: the official ``.pt`` (``{"cfg": dict, "model": state dict}``), read with
``torch.load(weights_only=True)`` only; a file that needs unsafe unpickling is refused with
instructions to convert it. Or ``.safetensors`` with its cfg in ``<stem>.json`` or
``config.json`` beside it (:func:`save_beats` / :func:`convert_beats_checkpoint` write
``model.safetensors`` + ``config.json``). A checkpoint may hold copies of the shared table
under layers 1.. (upstream's module sharing repeats it in ``state_dict()``): equal copies are
dropped before the strict load, different ones are an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import CheckpointError, ConfigError
from mera.model.encoders.fbank import audio_waveform, fit_length, kaldi_fbank, num_frames

SAMPLE_RATE = 16000
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
DEFAULT_CHECKPOINT = "BEATs_iter3_plus_AS2M.pt"


@dataclasses.dataclass
class BEATsConfig:
    """BEATs sizes and switches. Defaults are the real iter3+ AS2M model's (not upstream's
    ``BEATsConfig`` defaults: the official cfg dict sets every field anyway)."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_class: int = 527
    num_mel_bins: int = 128  # not in upstream's cfg (fixed there)

    @classmethod
    def from_dict(cls, cfg: dict | None, where: str = "BEATs cfg") -> "BEATsConfig":
        """Known fields are taken (type-checked); training-only ones (dropouts, layerdrop,
        gradient decay, ...) and unknown keys are ignored."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{where}: expected a dict, got {type(cfg).__name__}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in cfg:
                continue
            v, default = cfg[f.name], f.default
            ok = (isinstance(v, bool) if isinstance(default, bool)
                  else isinstance(v, int) and not isinstance(v, bool) if isinstance(default, int)
                  else isinstance(v, str))
            if not ok:
                raise CheckpointError(f"{where}: {f.name} must be {type(default).__name__}, got {v!r}")
            kwargs[f.name] = v
        c = cls(**kwargs)
        c.validate(where)
        return c

    def validate(self, where: str = "BEATs cfg") -> None:
        problems = []
        if self.encoder_embed_dim % self.encoder_attention_heads:
            problems.append(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                            f"encoder_attention_heads {self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            problems.append(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                            f"conv_pos_groups {self.conv_pos_groups}")
        if self.activation_fn not in _ACTIVATIONS:
            problems.append(f"activation_fn {self.activation_fn!r} is not supported ({sorted(_ACTIVATIONS)})")
        if self.deep_norm and self.layer_norm_first:
            problems.append("deep_norm and layer_norm_first cannot both be set")
        if self.num_mel_bins < self.input_patch_size:
            problems.append(f"num_mel_bins {self.num_mel_bins} < input_patch_size {self.input_patch_size}")
        for name in ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                     "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.relative_position_embedding and (self.num_buckets < 4 or self.max_distance <= self.num_buckets // 4):
            problems.append(f"bad relative positions: num_buckets {self.num_buckets}, max_distance {self.max_distance}")
        if problems:
            raise CheckpointError(f"{where}: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x.float()).type_as(x),
    "gelu_accurate": lambda x: F.gelu(x.float(), approximate="tanh").type_as(x),
    "relu": F.relu,
}


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 320,
                             max_distance: int = 800) -> torch.Tensor:
    """T5's bidirectional bucketing of ``key - query`` offsets (as upstream, float32 log):
    half the buckets per sign (positive offsets get ``+ num_buckets // 2``); inside a half,
    offsets below ``max_exact = half // 2`` are exact, larger ones log-spaced up to ``max_distance``."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    n = relative_position.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


class WeightNormConv1d(nn.Module):
    """``nn.utils.weight_norm(Conv1d, dim=2)`` with the old parameter names ``weight_g`` / ``weight_v``:
    ``weight = weight_v * weight_g / ||weight_v||`` (the norm over all dims but dim 2)."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel_size * channels)))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight().to(x.dtype), self.bias.to(x.dtype), padding=self.padding, groups=self.groups)


class _DropLast(nn.Module):
    """fairseq's ``SamePad`` for an even kernel: drop the last frame."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :-self.remove] if self.remove else x


class BEATsAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_bias_table: bool):
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads, self.head_dim = h, d // h
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, h)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [B, L, D]; ``position_bias`` [H, L, L] (ungated) or None."""
        b, n, d = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, n, h, hd).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(x).view(b, n, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, h, hd).transpose(1, 2)
        mask = None
        if position_bias is not None:
            mask = position_bias.to(q.dtype)[None]  # [1, H, L, L]
            if self.gru_rel_pos:
                gates = torch.sigmoid(self.grep_linear(q).view(b, h, n, 2, 4).sum(-1))  # [B, H, L, 2]
                gate_a, gate_b = gates[..., :1], gates[..., 1:]
                gate = gate_a * (gate_b * self.grep_a.to(q.dtype) - 1.0) + 2.0  # [B, H, L, 1]
                mask = gate * mask  # [B, H, L, L]
            mask = mask.expand(b, h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class BEATsLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_bias_table: bool):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = BEATsAttention(cfg, has_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = math.pow(2.0 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(self.activation(self.fc1(x))))


class BEATsTransformer(nn.Module):
    """``encoder.*``: conv positional embedding, layer norm, layers (post-LN unless ``layer_norm_first``)."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.cfg = cfg
        self.pos_conv = nn.Sequential(WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups),
                                      _DropLast(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(
            [BEATsLayer(cfg, has_bias_table=cfg.relative_position_embedding and i == 0)
             for i in range(cfg.encoder_layers)])
        self.layer_norm = nn.LayerNorm(d)

    def position_bias(self, n: int, device) -> torch.Tensor | None:
        """The ungated bias ``[H, L, L]`` from layer 0's table (shared by every layer)."""
        if not self.cfg.relative_position_embedding:
            return None
        pos = torch.arange(n, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        bias = self.position_bias(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, bias)
        if self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATsEncoder(nn.Module):
    """Family ``beats``: decoded audio -> normalised fbank ``[T, 128]`` -> ``[B, N, 768]``.

    ``preprocess`` resamples to 16 kHz (band-limited; ``resample=False`` refuses other rates),
    crops to the first ``max_seconds`` or pads (``pad``: ``zeros`` = silence after the clip,
    ``repeat`` = the clip tiled), so every clip gives the same ``num_tokens``.
    """

    family = "beats"

    def __init__(self, cfg: BEATsConfig | None = None, max_seconds: float = 10.0, pad: str = "zeros",
                 resample: bool = True):
        super().__init__()
        cfg = cfg or BEATsConfig()
        cfg.validate()
        if pad not in ("zeros", "repeat"):
            raise ConfigError(f"beats: pad must be 'zeros' or 'repeat', got {pad!r}")
        self.cfg = cfg
        self.max_seconds, self.pad, self.allow_resample = float(max_seconds), pad, bool(resample)
        self.num_samples = int(round(self.max_seconds * SAMPLE_RATE))
        self.num_frames = num_frames(self.num_samples)
        p = cfg.input_patch_size
        if self.num_frames < p:
            raise ConfigError(f"beats: max_seconds {max_seconds} gives {self.num_frames} fbank frames, "
                              f"fewer than one patch ({p})")
        self.output_dim = cfg.encoder_embed_dim
        self.num_tokens = (self.num_frames // p) * (cfg.num_mel_bins // p)

        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.embed_dim != cfg.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
        else:
            self.post_extract_proj = None
        self.encoder = BEATsTransformer(cfg)
        if cfg.finetuned_model:  # the AudioSet classifier: loaded (strict) but not used for features
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)

    # -------------------------------------------------------------- input
    def fbank(self, waveform: torch.Tensor) -> torch.Tensor:
        """16 kHz waveform in [-1, 1] ``[..., n]`` -> normalised fbank ``[..., frames, num_mel_bins]``."""
        fb = kaldi_fbank(waveform * 2 ** 15, sample_rate=SAMPLE_RATE, num_mel_bins=self.cfg.num_mel_bins,
                         frame_length_ms=25.0, frame_shift_ms=10.0, window="povey", dither=0.0)
        return (fb - FBANK_MEAN) / (2 * FBANK_STD)

    @property
    def max_audio_seconds(self) -> float:
        """The window preprocess keeps (mera.data.media reads no more of a file)."""
        return self.max_seconds

    def preprocess(self, media) -> torch.Tensor:
        """AudioClip / (waveform, rate) / 16 kHz waveform -> float32 ``[num_frames, num_mel_bins]``."""
        x = audio_waveform(media, SAMPLE_RATE, self.allow_resample, who="beats")
        x = fit_length(x, self.num_samples, self.pad, who="beats")
        return self.fbank(x).float()

    # -------------------------------------------------------------- network
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, F] -> [B, N, D]
        x = x.to(self.patch_embedding.weight.dtype).unsqueeze(1)
        feats = self.patch_embedding(x)  # [B, C, T / p, F / p]
        feats = feats.flatten(2).transpose(1, 2)  # time-major tokens
        feats = self.layer_norm(feats)
        if self.post_extract_proj is not None:
            feats = self.post_extract_proj(feats)
        return self.encoder(feats)

    def config(self) -> dict:
        return self.cfg.to_dict()


# ------------------------------------------------------------------------------ checkpoints


def _unsafe_message(path: Path, err: Exception) -> str:
    return (f"{path}: this checkpoint cannot be read with torch.load(weights_only=True): it needs unsafe "
            f"unpickling ({str(err).strip().splitlines()[0][:300]}). mera never unpickles arbitrary objects. "
            "If you trust the file, convert it once to safetensors in a separate Python session: "
            "ck = torch.load(path, weights_only=False); safetensors.torch.save_file("
            "{k: v.contiguous() for k, v in ck['model'].items()}, 'model.safetensors'); "
            "json.dump(dict(ck['cfg']), open('config.json', 'w')) -- then point the beats encoder at that folder.")


def read_beats_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(cfg, state)`` from an official-format ``.pt`` (weights-only unpickling) or a
    ``.safetensors`` file (+ ``<stem>.json`` or ``config.json`` beside it; defaults otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: BEATs checkpoint file not found")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: cannot read safetensors weights ({e})") from None
        cfg: dict = {}
        for cand in (p.with_suffix(".json"), p.parent / "config.json"):
            if cand.is_file():
                try:
                    raw = json.loads(cand.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{cand}: unreadable BEATs config ({e})") from None
                if not isinstance(raw, dict):
                    raise CheckpointError(f"{cand}: a BEATs config must be a JSON object")
                if raw.get("family", "beats") != "beats":
                    raise CheckpointError(f"{cand}: family is {raw.get('family')!r}, expected 'beats'")
                if isinstance(raw.get("cfg"), dict):
                    cfg = raw["cfg"]
                else:
                    cfg = {k: v for k, v in raw.items() if k != "family"}
                break
        return cfg, state
    try:
        ck = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_unsafe_message(p, e)) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(_unsafe_message(p, e)) from None
        raise CheckpointError(f"{p}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or "model" not in ck:
        got = sorted(ck)[:8] if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"{p}: not a BEATs checkpoint: expected a dict with 'cfg' and 'model', got {got}")
    state, cfg = ck["model"], ck.get("cfg") or {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: 'model' is not a state dict of tensors")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: 'cfg' must be a plain dict, got {type(cfg).__name__}")
    return dict(cfg), dict(state)


def _drop_shared_copies(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Drop ``encoder.layers.{i>0}.self_attn.relative_attention_bias.weight`` when equal to layer 0's."""
    ref_key = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if (len(parts) == 6 and parts[:2] == ["encoder", "layers"] and parts[2] != "0"
                and parts[3:] == ["self_attn", "relative_attention_bias", "weight"] and ref_key in state):
            if v.shape != state[ref_key].shape or not torch.equal(v, state[ref_key]):
                raise CheckpointError(f"{where}: {k} differs from {ref_key}; BEATs shares one relative "
                                      "position table across layers")
            continue
        out[k] = v
    return out


def build_beats(cfg: dict | BEATsConfig | None = None, state: dict[str, torch.Tensor] | None = None,
                where: str = "BEATs", **options) -> BEATsEncoder:
    """A :class:`BEATsEncoder` from a cfg dict; with ``state``, loaded strictly (shared copies dropped)."""
    c = cfg if isinstance(cfg, BEATsConfig) else BEATsConfig.from_dict(cfg, where)
    enc = BEATsEncoder(c, **options)
    if state is not None:
        state = _drop_shared_copies(state, where)
        own = enc.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{where}: weights do not match the BEATs config: missing {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                  f"{' ...' if len(unexpected) > 5 else ''}")
        bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if tuple(state[k].shape) != tuple(v.shape)]
        if bad:
            raise CheckpointError(f"{where}: weight shapes do not match the config: {bad[:4]}")
        enc.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return enc


def _resolve_checkpoint(path: str | None, checkpoint: str | None) -> Path:
    if path is None and checkpoint is None:
        raise CheckpointError("beats: no checkpoint given: pass a path to BEATs_iter3_plus_AS2M.pt (or to a folder "
                              "holding it, or model.safetensors + config.json)")
    if path is None:
        return Path(checkpoint)
    p = Path(path)
    if p.is_file():
        if checkpoint is not None:
            raise ConfigError(f"beats: path {p} is a file; the checkpoint option ({checkpoint!r}) is for a folder")
        return p
    if not p.is_dir():
        raise CheckpointError(f"beats: {p} not found (expected a BEATs checkpoint file or a folder holding one)")
    if checkpoint is not None:
        c = Path(checkpoint)
        return c if c.is_absolute() else p / c
    for name in ("model.safetensors", DEFAULT_CHECKPOINT):
        if (p / name).is_file():
            return p / name
    cands = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.pt")))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise CheckpointError(f"beats: {p} holds no .pt or .safetensors checkpoint")
    raise CheckpointError(f"beats: {p} holds several checkpoints ({[c.name for c in cands]}); "
                          "choose one with the checkpoint option")


class BEATsParams(StrictModel):
    checkpoint: str | None = None  # the file inside a folder ``path`` (or the file itself, without a path)
    max_seconds: float = 10.0
    pad: Literal["zeros", "repeat"] = "zeros"  # after a short clip: silence, or the clip tiled
    resample: bool = True
    dtype: str | None = None
    random_init: bool = False  # tests only
    config: dict | None = None  # the BEATs cfg of a random_init encoder


@register("encoder", "beats", BEATsParams)
def load_beats(path: str | None = None, checkpoint: str | None = None, max_seconds: float = 10.0,
               pad: str = "zeros", resample: bool = True, dtype: str | None = None,
               random_init: bool = False, config: dict | None = None) -> BEATsEncoder:
    """``beats``: ``path`` is the checkpoint file (official ``.pt`` or ``.safetensors``) or a folder
    holding one (``model.safetensors``, ``BEATs_iter3_plus_AS2M.pt`` or a single ``*.pt`` /
    ``*.safetensors``; ``checkpoint`` names it). Options: ``max_seconds`` (10.0: 496 tokens),
    ``pad`` (``zeros`` | ``repeat``), ``resample`` (True: band-limited resampling to 16 kHz;
    False: other rates are a DataError), ``dtype`` (e.g. ``bfloat16``).
    ``random_init=True`` with no path builds random weights from ``config`` (tests only)."""
    opts = {"max_seconds": max_seconds, "pad": pad, "resample": resample}
    if random_init:
        if path is not None or checkpoint is not None:
            raise ConfigError("beats: random_init is for tests and takes no checkpoint")
        enc = build_beats(config, None, "beats config", **opts)
    else:
        if config is not None:
            raise ConfigError("beats: the config option is only for random_init; a checkpoint carries its cfg")
        file = _resolve_checkpoint(path, checkpoint)
        cfg, state = read_beats_checkpoint(file)
        enc = build_beats(cfg, state, str(file), **opts)
    if dtype:
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ConfigError(f"beats: unknown dtype {dtype!r}")
        enc = enc.to(getattr(torch, dtype))
    return enc


def save_beats(encoder: BEATsEncoder, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``{"family": "beats", "cfg": ...}``); returns the folder."""
    from safetensors.torch import save_file

    from mera.io import atomic_path, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"family": "beats"})
    write_json(folder / "config.json", {"family": "beats", "cfg": encoder.cfg.to_dict()})
    return folder


def convert_beats_checkpoint(src: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Official ``.pt`` (weights-only readable) -> ``folder/model.safetensors`` + ``config.json``."""
    cfg, state = read_beats_checkpoint(src)
    enc = build_beats(cfg, state, str(src))
    save_beats(enc, folder)
    # keep the official cfg's extra (training-only) fields for reference
    from mera.io import write_json

    write_json(Path(folder) / "config.json", {"family": "beats", "cfg": {**_jsonable(cfg), **enc.cfg.to_dict()}})
    return Path(folder)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (bool, int, float, str, type(None)))
            or (isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v))}


def official_state_keys(cfg: BEATsConfig | None = None) -> list[str]:
    """The state-dict keys of an official checkpoint for ``cfg`` (layer 0 holding the shared table)."""
    cfg = cfg or BEATsConfig()
    keys = ["patch_embedding.weight"] + (["patch_embedding.bias"] if cfg.conv_bias else [])
    keys += ["layer_norm.weight", "layer_norm.bias"]
    if cfg.embed_dim != cfg.encoder_embed_dim:
        keys += ["post_extract_proj.weight", "post_extract_proj.bias"]
    keys += [f"encoder.pos_conv.0.{n}" for n in ("bias", "weight_g", "weight_v")]
    keys += ["encoder.layer_norm.weight", "encoder.layer_norm.bias"]
    for i in range(cfg.encoder_layers):
        pre = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys += [f"{pre}self_attn.{proj}.weight", f"{pre}self_attn.{proj}.bias"]
        if cfg.relative_position_embedding and i == 0:
            keys.append(f"{pre}self_attn.relative_attention_bias.weight")
        if cfg.gru_rel_pos:
            keys += [f"{pre}self_attn.grep_linear.weight", f"{pre}self_attn.grep_linear.bias", f"{pre}self_attn.grep_a"]
        for n in ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            keys += [f"{pre}{n}.weight", f"{pre}{n}.bias"]
    if cfg.finetuned_model:
        keys += ["predictor.weight", "predictor.bias"]
    return keys


__all__ = ["BEATsConfig", "BEATsEncoder", "build_beats", "load_beats", "save_beats", "read_beats_checkpoint",
           "convert_beats_checkpoint", "official_state_keys", "relative_position_bucket"]
