"""The toy encoders: the encoder contract, save / load, auxiliary pre-training, determinism."""

import hashlib
import json

import numpy as np
import pytest
import torch

from mera.data import toy_world as tw
from mera.data.media import AudioClip
from mera.errors import CheckpointError, ConfigError
from mera.model.encoders import toy
from mera.model.encoders.base import load_encoder
from mera.zoo import encoders as zoo_encoders

torch.set_num_threads(2)

# small recipes for the tests: (scenes, epochs, batch, lr); the defaults train ~10x longer
TEST_RECIPES = {"image": (384, 8, 32, 3e-3), "audio": (448, 10, 32, 3e-3), "point": (384, 8, 32, 3e-3)}


def _media(modality, n=3, seed=0):
    return [s.media for s in tw.generate(modality, "caption", "train", n, seed=seed)]


@pytest.mark.parametrize("modality, shape", [
    ("image", (3, 32, 32)), ("video", (4, 3, 32, 32)), ("audio", (8000,)), ("point", (256, 6))])
def test_encoder_contract(modality, shape):
    torch.manual_seed(0)
    enc = load_encoder(toy.FAMILY_OF[modality])  # no path: a fresh random encoder, frozen, eval mode
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    assert (enc.output_dim, enc.num_tokens) == (64, 16)
    x = torch.stack([enc.preprocess(m) for m in _media(modality)])
    assert x.shape == (3, *shape) and x.dtype == torch.float32
    with torch.no_grad():
        y = enc(x)
    assert y.shape == (3, 16, 64) and torch.isfinite(y).all()
    # samples are encoded independently of the batch they are in
    with torch.no_grad():
        torch.testing.assert_close(enc(x[1:2]), y[1:2], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(y[0], y[1])


def test_preprocess_adapts_other_media():
    img_enc, vid_enc = toy.ToyImageEncoder(), toy.ToyVideoEncoder(toy.ToyImageEncoder())
    assert img_enc.preprocess(np.zeros((48, 40, 3), np.uint8)).shape == (3, 32, 32)
    frames = np.stack([np.full((32, 32, 3), k * 20, np.uint8) for k in range(7)])
    v = vid_enc.preprocess(frames)
    assert v.shape == (4, 3, 32, 32)
    # frames 0, 2, 4, 6 sampled uniformly
    np.testing.assert_allclose(v[:, 0, 0, 0].numpy(), [(k * 20 / 255 - 0.5) / 0.25 for k in (0, 2, 4, 6)], atol=1e-6)
    aud = toy.ToyAudioEncoder()
    t = np.arange(16000) / 16000
    wav = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    x = aud.preprocess(AudioClip(wav, 16000))  # resampled to 8 kHz, 1 s
    assert x.shape == (8000,)
    np.testing.assert_allclose(x[:100].numpy(), np.sin(2 * np.pi * 440 * np.arange(100) / 8000), atol=1e-3)
    short = aud.preprocess(AudioClip(wav[:2000], 16000))  # 1000 samples at 8 kHz, then zeros
    assert short[1000:].abs().max() == 0 and short[900:1000].abs().max() > 0.5
    pts = np.concatenate([np.random.default_rng(0).normal(size=(1000, 3)) * 5 + 3, np.full((1000, 3), 0.5)], 1)
    p = toy.ToyPointEncoder().preprocess(pts)
    assert p.shape == (256, 6)
    assert abs(float(p[:, :3].norm(dim=1).max()) - 1.0) < 1e-5 and float(p[:, :3].mean(0).abs().max()) < 0.1


def test_farthest_point_sampling_spreads_out():
    xyz = torch.tensor(np.random.default_rng(0).random((2, 200, 3)), dtype=torch.float32)
    idx = toy.farthest_point_sample(xyz, 16)
    assert idx.shape == (2, 16) and (idx[:, 0] == 0).all()
    assert all(len(set(row.tolist())) == 16 for row in idx)
    c = xyz[0, idx[0]]
    d = torch.cdist(c, c) + torch.eye(16) * 9
    r = xyz[0, torch.randperm(200, generator=torch.Generator().manual_seed(0))[:16]]
    dr = torch.cdist(r, r) + torch.eye(16) * 9
    assert d.min() > dr.min()  # FPS centres are farther apart than random ones


@pytest.mark.slow
def test_pretraining_learns_saves_and_loads(tmp_path):
    summary = zoo_encoders.pretrain_toy_encoders(tmp_path, tw.ToyWorldConfig(), seed=0, progress=False, recipes=TEST_RECIPES)
    assert set(summary) == {"image", "audio", "point"}
    acc = {m: summary[m]["aux_accuracy"] for m in summary}
    chance = {m: summary[m]["chance"] for m in summary}
    # the fast-learning attributes are far above chance even after this short training
    assert acc["image"]["colour"] >= 0.7 and chance["image"]["colour"] < 0.25
    assert acc["image"]["x"] >= 0.7 and acc["image"]["count"] >= 0.65
    assert acc["audio"]["pitch"] >= 0.8 and chance["audio"]["pitch"] < 0.4
    assert acc["point"]["colour"] >= 0.75 and acc["point"]["proportion"] >= 0.6
    for m in summary:
        gain = np.mean([acc[m][k] - chance[m][k] for k in acc[m]])
        assert gain >= 0.15, (m, acc[m], chance[m])
    for m, fam in (("image", "toy_image"), ("audio", "toy_audio"), ("point", "toy_point")):
        folder = tmp_path / m
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["family"] == fam and cfg["aux_accuracy"] == acc[m] and cfg["dim"] == 64
        assert summary[m]["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        enc = load_encoder(fam, str(folder))
        assert not enc.training
        x = torch.stack([enc.preprocess(md) for md in _media(m, 2, seed=9)])
        fresh = load_encoder(fam)
        with torch.no_grad():
            assert not torch.allclose(enc(x), fresh(x))
            torch.testing.assert_close(load_encoder(fam, str(folder))(x), enc(x))
    vid = load_encoder("toy_video", str(tmp_path / "image"))
    image = load_encoder("toy_image", str(tmp_path / "image"))
    torch.testing.assert_close(vid.image.net[0].weight, image.net[0].weight)
    with pytest.raises(ConfigError):
        load_encoder("toy_image", str(tmp_path / "image"), width=8)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    rec = (96, 2, 32, 3e-3)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, acc_a, _ = zoo_encoders.train_toy_encoder("point", seed=0, recipe=rec)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, acc_b, _ = zoo_encoders.train_toy_encoder("point", seed=0, recipe=rec)
    c, _, _ = zoo_encoders.train_toy_encoder("point", seed=1, recipe=rec)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and acc_a == acc_b
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_loader_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_encoder("toy_audio", str(tmp_path))
    enc = toy.ToyAudioEncoder()
    toy.save_toy_encoder(enc, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"family is 'toy_audio', expected 'toy_point'"):
        load_encoder("toy_point", str(tmp_path / "a"))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"a/model\.safetensors: cannot read weights"):
        load_encoder("toy_audio", str(tmp_path / "a"))
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing encoder weights"):
        load_encoder("toy_audio", str(tmp_path / "a"))
    # weights of another shape than the config says
    toy.save_toy_encoder(toy.ToyAudioEncoder(width=32), tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["width"] = 64
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"b/model\.safetensors: weights do not match"):
        load_encoder("toy_audio", str(tmp_path / "b"))
    (tmp_path / "b" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"b/config\.json: unreadable"):
        load_encoder("toy_audio", str(tmp_path / "b"))


def test_every_family_registers_its_options_with_the_loaders_defaults():
    """Each family's parameter model declares exactly the options its loader takes, same defaults."""
    import dataclasses
    import inspect

    from mera.config.registry import lookup, names
    from mera.model.encoders.point_bert import PointBertConfig

    assert names("encoder") == ["beats", "hf_ast", "hf_clip", "hf_clip_video", "point_bert",
                                "toy_audio", "toy_image", "toy_point", "toy_video"]
    for family in names("encoder"):
        entry = lookup("encoder", family)
        sig = dict(inspect.signature(entry.obj).parameters)
        assert list(sig)[0] == "path"
        declared = {k: p.default for k, p in list(sig.items())[1:] if p.kind is not p.VAR_KEYWORD}
        if family.startswith("toy_"):  # **options: the constructor's (the image encoder's for video)
            cls = toy.ToyImageEncoder if family == "toy_video" else toy._CLASSES[family]
            declared |= {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        if family == "point_bert":  # **overrides: the sizes of PointBertConfig
            declared |= {f.name: f.default for f in dataclasses.fields(PointBertConfig)}
        model = {k: f.default for k, f in entry.params.model_fields.items()}
        assert model == declared, family


def test_check_encoder_options():
    from mera.model.encoders.base import check_encoder_options

    check_encoder_options("toy_video", {"frames": 2})
    check_encoder_options("point_bert", {"num_points": 1024, "trans_dim": 384})
    check_encoder_options("beats", {"max_seconds": 5, "pad": "repeat"})
    for family, opts, match in [
        ("toy_imgae", {}, "unknown encoder family 'toy_imgae'; did you mean 'toy_image'"),
        ("hf_clip", {"featur_layer": 1}, r"encoder 'hf_clip' options: featur_layer: unknown key \(did you mean "
                                        r"'feature_layer'"),
        ("hf_clip_video", {"frames": "four"}, r"encoder 'hf_clip_video' options: frames: .*valid integer"),
        ("beats", {"pad": "edge"}, r"encoder 'beats' options: pad: "),
    ]:
        with pytest.raises(ValueError, match=match):
            check_encoder_options(family, opts)
    with pytest.raises(ConfigError, match="unknown encoder family 'nope'; known: beats, hf_ast"):
        load_encoder("nope")
    with pytest.raises(ConfigError, match=r"encoder 'toy_image' options: widht: unknown key"):
        load_encoder("toy_image", widht=8)
