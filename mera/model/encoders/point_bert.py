"""Point-BERT v1.2 as PointLLM uses it (family ``point_bert``): a point cloud -> 513 tokens of width 384.

The architecture follows PointLLM's ``PointTransformer`` (``pointllm/model/pointbert``) with the
``PointTransformer_8192point_2layer`` config, colour on (``point_dims = 6``) and
``use_max_pool = False``; the module names equal upstream's, so the checkpoint's
``module.point_encoder.*`` weights load with strict semantics. 21,859,200 parameters.

Pipeline, for one cloud ``(N, 6)`` = xyz + rgb (rgb in [0, 1]):

1. :meth:`PointBertEncoder.preprocess` (numpy, per sample):
   * resampling when ``N != num_points`` (8192), deterministic: the points at indices
     ``round(linspace(0, N - 1, num_points))`` are kept, i.e. an evenly strided subsample
     (first and last point included) when ``N > num_points`` and each point repeated about
     ``num_points / N`` times, in order, when ``N < num_points`` (the same rule as ``toy_point``);
   * xyz normalised into the unit sphere, as PointLLM's ``pc_norm``: subtract the centroid
     (mean of the kept points), divide by the largest norm (a cloud that is one point
     repeated stays at the origin); rgb unchanged.
2. :meth:`PointBertEncoder.forward` (batched torch):
   * farthest point sampling of ``num_group`` (512) centres on xyz. It reproduces the
     ``pointnet2_ops`` CUDA kernel that upstream calls: the first centre is always index 0,
     the running distance starts at 1e10, ties go to the lowest index, and points with
     ``|xyz|^2 <= 1e-3`` (a ball of radius 0.032 round the centroid of a normalised cloud)
     are never picked after the first (``fps_skip_origin=False`` turns that quirk off);
   * the ``group_size`` (32) nearest points of each centre (exact Euclidean distances,
     ``torch.cdist`` without the matmul shortcut, then ``topk``); their xyz relative to the
     centre, concatenated with their rgb -> ``(B, G, k, 6)``;
   * the mini-PointNet ``encoder`` per group -> ``(B, G, encoder_dims)``, ``reduce_dim`` to
     ``trans_dim``, a CLS token in front, the position ``pos_embed(centre)`` (``cls_pos`` for CLS)
     added at the input of every one of the ``depth`` pre-LN blocks, the final ``norm``
     -> ``(B, 1 + num_group, trans_dim)``.

The checkpoint (``point_bert_v1.2.pt`` from PointLLM, or a ``.safetensors`` file) is read with
``torch.load(weights_only=True)`` (``argparse.Namespace`` is the only class allowed beyond
tensors and containers); a file that needs any other pickled object is refused with a
:class:`~mera.errors.CheckpointError` that shows how to convert it once, never unpickled.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import CheckpointError, ConfigError, DataError

DEFAULT_CHECKPOINT_NAMES = ("point_bert_v1.2.pt", "point_bert_v1.2.safetensors", "model.safetensors")
# key prefixes tried, in order, when picking the point encoder's weights out of a file
KEY_PREFIXES = ("module.point_encoder.", "point_encoder.", "module.", "")
_OPTIONAL_KEY_SUFFIX = ".num_batches_tracked"  # BatchNorm counters: unused in eval, may be absent


@dataclass(frozen=True)
class PointBertConfig:
    """Sizes of the network; the defaults are PointLLM v1.2's (``PointTransformer_8192point_2layer``)."""

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_group: int = 512
    group_size: int = 32
    encoder_dims: int = 256
    point_dims: int = 6
    fps_skip_origin: bool = True

    def __post_init__(self):
        for name in ("trans_dim", "depth", "num_heads", "num_group", "group_size", "encoder_dims"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"point_bert: {name} must be a positive integer, got {v!r}")
        if self.trans_dim % self.num_heads:
            raise ConfigError(f"point_bert: trans_dim {self.trans_dim} is not divisible by num_heads {self.num_heads}")
        if self.point_dims not in (3, 6):
            raise ConfigError(f"point_bert: point_dims must be 3 (xyz) or 6 (xyz + rgb), got {self.point_dims!r}")


# ----------------------------------------------------------------------------- grouping


def farthest_point_sample(xyz: torch.Tensor, m: int, start: int = 0, skip_origin: bool = True) -> torch.Tensor:
    """``[B, N, 3]`` -> ``[B, m]`` indices by farthest point sampling (``pointnet2_ops`` rules).

    The first index is ``start`` (upstream: 0). Each next one maximises the squared distance to the
    nearest already chosen point (running minimum initialised to 1e10); ties go to the lowest
    index. With ``skip_origin``, points with ``|p|^2 <= 1e-3`` are never chosen after the first,
    as in the CUDA kernel (when no point is eligible, index 0 is chosen, as there).
    """
    b, n, _ = xyz.shape
    if m > n:
        raise ValueError(f"farthest_point_sample: {m} centres from {n} points")
    device = xyz.device
    xyz = xyz.float()
    idx = torch.empty(b, m, dtype=torch.long, device=device)
    dist = torch.full((b, n), 1e10, dtype=torch.float32, device=device)
    if skip_origin:
        eligible = (xyz * xyz).sum(-1) > 1e-3
    else:
        eligible = torch.ones(b, n, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    far = torch.full((b,), int(start), dtype=torch.long, device=device)
    neg = torch.tensor(-1.0, device=device)
    for i in range(m):
        idx[:, i] = far
        if i == m - 1:
            break
        c = xyz[rows, far][:, None, :]
        d = xyz - c
        dist = torch.minimum(dist, d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2])
        far = torch.where(eligible, dist, neg).argmax(-1)
    return idx


def knn_indices(query: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """``query [B, G, 3]``, ``points [B, N, 3]`` -> ``[B, G, k]`` indices of the k nearest points, nearest first."""
    d = torch.cdist(query.float(), points.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: torch.Tensor, num_group: int, group_size: int,
                 skip_origin: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, C]`` (xyz first) -> ``neighborhood [B, G, k, C]`` (xyz relative to its centre, other
    channels as they are) and ``center [B, G, 3]`` (upstream ``Group``)."""
    b = points.shape[0]
    xyz = points[..., :3]
    rows = torch.arange(b, device=points.device)
    center = xyz[rows[:, None], farthest_point_sample(xyz, num_group, skip_origin=skip_origin)]  # [B, G, 3]
    nn_idx = knn_indices(center, xyz, group_size)  # [B, G, k]
    neighborhood = points[rows[:, None, None], nn_idx]  # [B, G, k, C]
    rel = neighborhood[..., :3] - center[:, :, None, :]
    return torch.cat([rel, neighborhood[..., 3:]], dim=-1), center


# ----------------------------------------------------------------------------- modules


class PointGroupEncoder(nn.Module):
    """Mini-PointNet over each group (upstream ``dvae.Encoder``): ``[B, G, k, C]`` -> ``[B, G, encoder_dims]``."""

    def __init__(self, encoder_channel: int, point_input_dims: int = 6):
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(point_input_dims, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_channel, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, n, c = groups.shape
        x = groups.reshape(b * g, n, c).transpose(1, 2)  # [BG, C, n]
        feat = self.first_conv(x)  # [BG, 256, n]
        glob = feat.amax(dim=2, keepdim=True)
        feat = torch.cat([glob.expand(-1, -1, n), feat], dim=1)  # [BG, 512, n]
        feat = self.second_conv(feat)
        return feat.amax(dim=2).reshape(b, g, self.encoder_channel)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale head_dim ** -0.5, as upstream
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """The blocks, the position added at every block's input (upstream ``TransformerEncoder``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x, pos):
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBertEncoder(nn.Module):
    """float ``(N, 6)`` point cloud -> ``1 + num_group`` tokens (CLS first) of width ``trans_dim``."""

    family = "point_bert"

    def __init__(self, config: PointBertConfig | None = None, num_points: int = 8192):
        super().__init__()
        cfg = self.config = config or PointBertConfig()
        if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < cfg.num_group:
            raise ConfigError(f"point_bert: num_points must be an integer >= num_group ({cfg.num_group}), "
                              f"got {num_points!r}")
        if cfg.group_size > num_points:
            raise ConfigError(f"point_bert: group_size {cfg.group_size} exceeds num_points {num_points}")
        self.num_points = num_points
        self.output_dim = cfg.trans_dim
        self.num_tokens = cfg.num_group + 1

        self.encoder = PointGroupEncoder(cfg.encoder_dims, cfg.point_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, cfg.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, cfg.trans_dim))
        self.blocks = TransformerEncoder(cfg.trans_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.trans_dim)

    def preprocess(self, media: np.ndarray) -> torch.Tensor:
        """``(N, 6)`` float -> float32 ``[num_points, point_dims]``: resampled and normalised (module doc)."""
        p = np.asarray(media)
        if p.ndim != 2 or p.shape[1] != 6 or p.shape[0] == 0 or not np.issubdtype(p.dtype, np.floating):
            raise DataError(f"point_bert: expected a float point cloud (N, 6) (xyz + rgb), got {p.dtype} {p.shape}")
        p = p.astype(np.float32, copy=False)
        if not np.isfinite(p).all():
            raise DataError("point_bert: the point cloud holds NaN or infinite values")
        n = p.shape[0]
        if n != self.num_points:
            p = p[np.linspace(0, n - 1, self.num_points).round().astype(np.int64)]
        xyz = p[:, :3] - p[:, :3].mean(axis=0)
        m = float(np.sqrt((xyz * xyz).sum(axis=1)).max())
        if m > 0:
            xyz = xyz / m
        out = np.concatenate([xyz, p[:, 3:]], axis=1) if self.config.point_dims == 6 else xyz
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def forward(self, pts: torch.Tensor) -> torch.Tensor:  # [B, N, point_dims] -> [B, 1 + G, trans_dim]
        cfg = self.config
        if pts.ndim != 3 or pts.shape[-1] != cfg.point_dims:
            raise DataError(f"point_bert: expected points [B, N, {cfg.point_dims}], got {tuple(pts.shape)}")
        dtype = self.reduce_dim.weight.dtype
        neighborhood, center = group_points(pts.float(), cfg.num_group, cfg.group_size, cfg.fps_skip_origin)
        tokens = self.reduce_dim(self.encoder(neighborhood.to(dtype)))  # [B, G, D]
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center.to(dtype))], dim=1)
        return self.norm(self.blocks(x, pos))


# ----------------------------------------------------------------------------- checkpoints


def _read_state(path: Path) -> dict:
    """The flat ``{name: tensor}`` dict stored in ``path`` (``.safetensors`` or a ``torch.save`` file)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found is None:  # not a pickle torch.save wrote (random bytes, another format, a damaged file)
            why = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", msg)
            raise CheckpointError(f"{path}: cannot read the checkpoint: not a torch.save file, or a damaged one "
                                  f"({(why.group(1) if why else msg.splitlines()[0]).strip()[:200]})") from None
        raise CheckpointError(
            f"{path}: the checkpoint holds pickled Python objects ({found.group(1)}) that a safe load "
            "(weights_only=True) refuses; mera never unpickles code. If you trust the file, convert it once "
            "to safetensors: python -c \"import torch, safetensors.torch as st; "
            "c = torch.load('IN.pt', weights_only=False); sd = c.get('state_dict', c); "
            "st.save_file({k: v.contiguous() for k, v in sd.items() "
            "if k.startswith('module.point_encoder.')}, 'point_bert_v1.2.safetensors')\""
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "base_model", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors, or one under "
                          f"'state_dict' / 'base_model' / 'model'); top-level keys: "
                          f"{sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__}")


def extract_point_encoder_state(state: dict, expected: list[str], path) -> dict[str, torch.Tensor]:
    """The point encoder's weights from a file's state dict: the first prefix of :data:`KEY_PREFIXES`
    under which ``cls_token`` is found is stripped; other keys are ignored. Missing keys (other than
    BatchNorm's ``num_batches_tracked``) are a :class:`CheckpointError` naming them."""
    prefix = next((p for p in KEY_PREFIXES if f"{p}cls_token" in state), None)
    if prefix is None:
        sample = sorted(state)[:8]
        raise CheckpointError(f"{path}: no Point-BERT weights found (no key 'cls_token' under any of the prefixes "
                              f"{list(KEY_PREFIXES)}); first keys: {sample}")
    wanted = set(expected)
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in wanted}
    missing = [k for k in expected if k not in out and not k.endswith(_OPTIONAL_KEY_SUFFIX)]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} Point-BERT weights missing under prefix {prefix!r}: "
                              f"{missing[:12]}{' ...' if len(missing) > 12 else ''}")
    return out


def load_point_bert_weights(model: PointBertEncoder, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"point_bert: checkpoint {path} not found")
    own = model.state_dict()
    sd = extract_point_encoder_state(_read_state(path), list(own), path)
    for k, v in own.items():
        if k.endswith(_OPTIONAL_KEY_SUFFIX) and k not in sd:
            sd[k] = v
    bad = [f"{k}: file {tuple(sd[k].shape)}, model {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: Point-BERT weights of the wrong shape (check trans_dim / depth / "
                              f"encoder_dims / point_dims): {bad[:6]}")
    model.load_state_dict(sd, strict=True)


def _resolve_checkpoint(path: str | None, checkpoint: str | None) -> Path:
    if checkpoint:
        c = Path(checkpoint).expanduser()
        if not c.is_absolute() and path and Path(path).is_dir():
            c = Path(path) / c
        return c
    if path is None:
        raise CheckpointError("point_bert: no checkpoint given (set the encoder path to the checkpoint file or a "
                              "folder holding point_bert_v1.2.pt, or the option 'checkpoint')")
    p = Path(path).expanduser()
    if p.is_dir():
        for name in DEFAULT_CHECKPOINT_NAMES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"point_bert: {p} holds none of {list(DEFAULT_CHECKPOINT_NAMES)}")
    return p


class PointBertParams(StrictModel):
    """The loader's options, then the network sizes of :class:`PointBertConfig` (same defaults)."""

    checkpoint: str | None = None
    num_points: int = 8192
    dtype: str | None = None
    random_init: bool = False  # no weights: smoke tests only
    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_group: int = 512
    group_size: int = 32
    encoder_dims: int = 256
    point_dims: int = 6
    fps_skip_origin: bool = True


@register("encoder", "point_bert", PointBertParams)
def load_point_bert(path: str | None = None, checkpoint: str | None = None, num_points: int = 8192,
                    dtype: str | None = None, random_init: bool = False, **overrides) -> PointBertEncoder:
    """``point_bert``: ``path`` is the checkpoint file or a folder holding one
    (:data:`DEFAULT_CHECKPOINT_NAMES`); ``checkpoint`` names the file instead (relative to ``path``
    when that is a folder). Options: ``num_points`` (8192), ``dtype`` (e.g. ``"bfloat16"``),
    ``random_init`` (no weights; for smoke tests only) and the sizes of :class:`PointBertConfig`
    (``trans_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``num_group``, ``group_size``,
    ``encoder_dims``, ``point_dims``, ``fps_skip_origin``)."""
    known = {f.name for f in fields(PointBertConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"point_bert: unknown options {unknown}; known: "
                          f"{sorted(known | {'checkpoint', 'num_points', 'dtype', 'random_init'})}")
    cfg = PointBertConfig(**{**asdict(PointBertConfig()), **overrides})
    model = PointBertEncoder(cfg, num_points=num_points)
    if not random_init:
        load_point_bert_weights(model, _resolve_checkpoint(path, checkpoint))
    if dtype:
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ConfigError(f"point_bert: unknown dtype {dtype!r}")
        model.to(getattr(torch, dtype))
    return model
