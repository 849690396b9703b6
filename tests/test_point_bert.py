"""Point-BERT v1.2 (family ``point_bert``): grouping, the official module names and size, checkpoint
loading (strict, safe), preprocessing and determinism."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mera.config.registry import lookup
from mera.errors import CheckpointError, ConfigError, DataError
from mera.model.encoders.base import load_encoder
from mera.model.encoders.point_bert import (
    PointBertConfig,
    PointBertEncoder,
    farthest_point_sample,
    group_points,
    knn_indices,
    load_point_bert,
)

TINY = dict(trans_dim=24, depth=2, num_heads=4, num_group=16, group_size=8, encoder_dims=32)
TINY_POINTS = 256


def _cloud(n, seed=0, shift=(0.0, 0.0, 0.0), scale=1.0):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * scale + np.asarray(shift)
    return np.concatenate([xyz, rng.uniform(size=(n, 3))], 1).astype(np.float32)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _tiny(seed=0):
    return _randomise(PointBertEncoder(PointBertConfig(**TINY), num_points=TINY_POINTS), seed)


@pytest.fixture(scope="module")
def real_model():
    return PointBertEncoder().eval()


# ------------------------------------------------------------------------------ grouping


def _naive_fps(xyz, m):
    chosen, dist = [0], np.full(len(xyz), 1e10)
    for _ in range(m - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(dist)))
    return chosen


def test_fps_hand_made_points():
    pts = torch.tensor([[0.2, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0.25, 0.05, 0], [0, 0, 0.02],
                        [0, -0.9, 0]], dtype=torch.float32)[None]
    # start 0; farthest from it is 2 (d^2 1.44); then 3 (1.04 vs 0.85 / 0.64); then 6; then 1; then the
    # near-origin point 5 (0.0404) before 4 (0.005) -- unless 5 is skipped as the CUDA kernel does
    assert farthest_point_sample(pts, 7, skip_origin=False)[0].tolist() == [0, 2, 3, 6, 1, 5, 4]
    assert farthest_point_sample(pts, 6, skip_origin=True)[0].tolist() == [0, 2, 3, 6, 1, 4]


def test_fps_distinct_and_matches_naive_per_sample():
    clouds = np.stack([_cloud(600, seed=s)[:, :3] for s in (1, 2)])
    idx = farthest_point_sample(torch.from_numpy(clouds), 64, skip_origin=False)
    assert idx.shape == (2, 64)
    for b in range(2):
        assert len(set(idx[b].tolist())) == 64
        assert idx[b].tolist() == _naive_fps(clouds[b].astype(np.float64), 64)


def test_knn_holds_the_true_nearest_neighbours():
    rng = np.random.default_rng(3)
    pts = rng.uniform(-1, 1, size=(2, 500, 3)).astype(np.float32)
    q = pts[:, rng.choice(500, 20, replace=False)]
    idx = knn_indices(torch.from_numpy(q), torch.from_numpy(pts), 12).numpy()
    for b in range(2):
        d = ((q[b, :, None, :].astype(np.float64) - pts[b, None].astype(np.float64)) ** 2).sum(-1)
        brute = np.argsort(d, axis=1)[:, :12]
        np.testing.assert_array_equal(idx[b], brute)  # nearest first, same points


def test_group_points_relative_xyz_and_raw_rgb():
    pts = torch.from_numpy(_cloud(300, seed=4))[None]
    nb, center = group_points(pts, 10, 6)
    assert nb.shape == (1, 10, 6, 6) and center.shape == (1, 10, 3)
    ci = farthest_point_sample(pts[..., :3], 10)[0]
    torch.testing.assert_close(center[0], pts[0, ci, :3])
    nn_idx = knn_indices(center, pts[..., :3], 6)[0]
    torch.testing.assert_close(nb[0, ..., :3], pts[0, nn_idx, :3] - center[0, :, None])
    torch.testing.assert_close(nb[0, ..., 3:], pts[0, nn_idx, 3:])
    assert torch.all(nb[0, :, 0, :3].norm(dim=-1) < 1e-6)  # a centre is its own nearest point


# ------------------------------------------------------------------------------ architecture


def _official_keys(depth=12):
    keys = ["cls_token", "cls_pos", "reduce_dim.weight", "reduce_dim.bias", "pos_embed.0.weight", "pos_embed.0.bias",
            "pos_embed.2.weight", "pos_embed.2.bias", "norm.weight", "norm.bias"]
    for seq in ("first_conv", "second_conv"):
        for i in (0, 3):
            keys += [f"encoder.{seq}.{i}.weight", f"encoder.{seq}.{i}.bias"]
        keys += [f"encoder.{seq}.1.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked")]
    for i in range(depth):
        b = f"blocks.blocks.{i}"
        keys += [f"{b}.norm1.weight", f"{b}.norm1.bias", f"{b}.attn.qkv.weight", f"{b}.attn.proj.weight",
                 f"{b}.attn.proj.bias", f"{b}.norm2.weight", f"{b}.norm2.bias", f"{b}.mlp.fc1.weight",
                 f"{b}.mlp.fc1.bias", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.bias"]
    return keys


def test_real_config_size_and_official_names(real_model):
    n = sum(p.numel() for p in real_model.parameters())
    assert n == 21_859_200  # 21.9M, as PointLLM's Point-BERT v1.2
    sd = real_model.state_dict()
    assert set(sd) == set(_official_keys())
    assert sd["cls_token"].shape == sd["cls_pos"].shape == (1, 1, 384)
    assert sd["encoder.first_conv.0.weight"].shape == (128, 6, 1)
    assert sd["encoder.second_conv.3.weight"].shape == (256, 512, 1)
    assert sd["reduce_dim.weight"].shape == (384, 256)
    assert sd["blocks.blocks.11.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    assert real_model.num_tokens == 513 and real_model.output_dim == 384


def test_real_config_output_shape_and_determinism(real_model):
    x = real_model.preprocess(_cloud(8192, seed=5))[None]
    assert x.shape == (1, 8192, 6)
    with torch.no_grad():
        y1, y2 = real_model(x), real_model(x.clone())
    assert y1.shape == (1, 513, 384)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2)


def test_forward_matches_a_plain_reference():
    m = _tiny(seed=1)
    x = m.preprocess(_cloud(TINY_POINTS, seed=6))[None]
    cfg = m.config
    with torch.no_grad():
        nb, center = group_points(x, cfg.num_group, cfg.group_size)
        bs, g, k, c = nb.shape
        f = m.encoder.first_conv(nb.reshape(bs * g, k, c).transpose(1, 2))
        f = torch.cat([f.max(2, keepdim=True)[0].expand(-1, -1, k), f], 1)
        f = m.encoder.second_conv(f).max(2)[0].reshape(bs, g, -1)
        h = torch.cat([m.cls_token, m.reduce_dim(f)], 1)
        pos = torch.cat([m.cls_pos, m.pos_embed(center)], 1)
        heads, d = cfg.num_heads, cfg.trans_dim
        for blk in m.blocks.blocks:
            h = h + pos  # the position joins at every block
            y = blk.norm1(h)
            q, kk, v = blk.attn.qkv(y).reshape(1, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = ((q @ kk.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
            h = h + blk.attn.proj((a @ v).transpose(1, 2).reshape(1, -1, d))
            h = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
        ref = m.norm(h)
        out = m(x)
    assert out.shape == (1, cfg.num_group + 1, cfg.trans_dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ preprocessing


def test_preprocess_unit_sphere_rgb_unchanged_and_invariance():
    m = _tiny()
    raw = _cloud(TINY_POINTS, seed=7, shift=(5.0, -3.0, 2.0), scale=7.0)
    x = m.preprocess(raw).numpy()
    assert x.shape == (TINY_POINTS, 6) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, :3].mean(0), 0, atol=1e-5)
    assert abs(np.linalg.norm(x[:, :3], axis=1).max() - 1.0) < 1e-5
    np.testing.assert_array_equal(x[:, 3:], raw[:, 3:])
    moved = raw.copy()
    moved[:, :3] = moved[:, :3] * 0.25 + 10.0
    np.testing.assert_allclose(m.preprocess(moved).numpy(), x, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(m.preprocess(moved)[None]), m(torch.from_numpy(x)[None]), atol=1e-4, rtol=1e-4)


def test_preprocess_resamples_deterministically():
    m = _tiny()
    for n in (1000, 100):
        raw = _cloud(n, seed=n)
        x = m.preprocess(raw).numpy()
        assert x.shape == (TINY_POINTS, 6)
        keep = np.linspace(0, n - 1, TINY_POINTS).round().astype(int)
        np.testing.assert_array_equal(x[:, 3:], raw[keep, 3:])
        np.testing.assert_array_equal(x, m.preprocess(raw).numpy())
    with pytest.raises(DataError, match=r"\(N, 6\)"):
        m.preprocess(np.zeros((10, 3), np.float32))
    with pytest.raises(DataError, match="NaN"):
        m.preprocess(np.full((10, 6), np.nan, np.float32))


# ------------------------------------------------------------------------------ checkpoints


def _file_state(model, prefix="module.point_encoder."):
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_loads_strictly_through_the_family(tmp_path):
    src = _tiny(seed=2)
    state = _file_state(src)
    state["module.pc_projection"] = torch.zeros(3, 3)  # other parts of the ULIP model: ignored
    state["module.logit_scale"] = torch.ones(())
    path = tmp_path / "point_bert_v1.2.pt"
    torch.save({"epoch": 3, "state_dict": state, "args": argparse.Namespace(lr=1e-3, model="ULIP2")}, path)
    enc = load_encoder("point_bert", str(path), num_points=TINY_POINTS, **TINY)
    assert lookup("encoder", "point_bert").obj is load_point_bert and isinstance(enc, PointBertEncoder)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    for k, v in src.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    x = src.preprocess(_cloud(TINY_POINTS, seed=8))[None]
    with torch.no_grad():
        torch.testing.assert_close(enc(x), src(x), atol=0, rtol=0)
    # the folder form finds point_bert_v1.2.pt; "base_model" / "model" holders are accepted too
    enc2 = load_encoder("point_bert", str(tmp_path), num_points=TINY_POINTS, **TINY)
    assert torch.equal(enc2.state_dict()["cls_pos"], src.state_dict()["cls_pos"])
    torch.save({"base_model": _file_state(src)}, tmp_path / "b.pt")
    enc3 = load_encoder("point_bert", str(tmp_path), checkpoint="b.pt", num_points=TINY_POINTS, **TINY)
    assert torch.equal(enc3.state_dict()["norm.weight"], src.state_dict()["norm.weight"])


def test_checkpoint_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _tiny(seed=3)
    save_file({k: v.contiguous() for k, v in _file_state(src).items()}, str(tmp_path / "pb.safetensors"))
    enc = load_encoder("point_bert", str(tmp_path / "pb.safetensors"), num_points=TINY_POINTS, **TINY)
    assert torch.equal(enc.state_dict()["blocks.blocks.1.attn.qkv.weight"],
                       src.state_dict()["blocks.blocks.1.attn.qkv.weight"])
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    load_encoder("point_bert", str(tmp_path / "plain.safetensors"), num_points=TINY_POINTS, **TINY)


def test_checkpoint_errors(tmp_path):
    src = _tiny()
    state = _file_state(src)
    del state["module.point_encoder.blocks.blocks.1.mlp.fc2.bias"]
    torch.save({"state_dict": state}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt.*blocks\.blocks\.1\.mlp\.fc2\.bias"):
        load_encoder("point_bert", str(tmp_path / "missing.pt"), num_points=TINY_POINTS, **TINY)

    torch.save({"state_dict": _file_state(src)}, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_encoder("point_bert", str(tmp_path / "small.pt"), num_points=TINY_POINTS, **{**TINY, "trans_dim": 32})

    torch.save({"state_dict": {"module.other.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no Point-BERT weights"):
        load_encoder("point_bert", str(tmp_path / "other.pt"), num_points=TINY_POINTS, **TINY)

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read"):
        load_encoder("point_bert", str(tmp_path / "junk.pt"), num_points=TINY_POINTS, **TINY)

    with pytest.raises(CheckpointError, match="not found"):
        load_encoder("point_bert", str(tmp_path / "absent.pt"), num_points=TINY_POINTS, **TINY)
    with pytest.raises(ConfigError, match=r"encoder 'point_bert' options: heads: unknown key.*num_heads"):
        load_encoder("point_bert", str(tmp_path / "small.pt"), num_points=TINY_POINTS, heads=4)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "ran"


def test_unsafe_pickle_is_refused_not_run(tmp_path):
    torch.save({"state_dict": _file_state(_tiny()), "payload": _Payload()}, tmp_path / "unsafe.pt")
    _Payload.ran = False
    with pytest.raises(CheckpointError, match=r"unsafe.pt: .*_mark_ran.*weights_only=True"):
        load_encoder("point_bert", str(tmp_path / "unsafe.pt"), num_points=TINY_POINTS, **TINY)
    assert not _Payload.ran
