"""BEATs (family ``beats``) and the HF AST encoder (family ``hf_ast``)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mera.model.encoders.ast  # noqa: F401  (registers hf_ast)
import mera.model.encoders.beats  # noqa: F401  (registers beats)
from mera.data.media import AudioClip
from mera.errors import CheckpointError, DataError
from mera.model.encoders.base import load_encoder
from mera.model.encoders.beats import (
    BEATsConfig,
    BEATsEncoder,
    build_beats,
    convert_beats_checkpoint,
    official_state_keys,
    relative_position_bucket,
    save_beats,
)
from mera.model.encoders.fbank import kaldi_fbank

TINY = {"embed_dim": 32, "encoder_embed_dim": 64, "encoder_layers": 2, "encoder_attention_heads": 4,
        "encoder_ffn_embed_dim": 128}


def _clip(seconds=10.0, rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    w = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return AudioClip(w.astype(np.float32), rate)


def _spec_shapes(L=12, D=768, E=512, H=12, FFN=3072, K=128, G=16, P=16, buckets=320):
    """The official key -> shape list, written from the spec (not from the code under test)."""
    s = {"patch_embedding.weight": (E, 1, P, P), "layer_norm.weight": (E,), "layer_norm.bias": (E,),
         "post_extract_proj.weight": (D, E), "post_extract_proj.bias": (D,),
         "encoder.pos_conv.0.bias": (D,), "encoder.pos_conv.0.weight_g": (1, 1, K),
         "encoder.pos_conv.0.weight_v": (D, D // G, K),
         "encoder.layer_norm.weight": (D,), "encoder.layer_norm.bias": (D,)}
    for i in range(L):
        p = f"encoder.layers.{i}."
        for proj in "qkvo":
            name = "out_proj" if proj == "o" else f"{proj}_proj"
            s[f"{p}self_attn.{name}.weight"], s[f"{p}self_attn.{name}.bias"] = (D, D), (D,)
        if i == 0:
            s[f"{p}self_attn.relative_attention_bias.weight"] = (buckets, H)
        s[f"{p}self_attn.grep_linear.weight"], s[f"{p}self_attn.grep_linear.bias"] = (8, D // H), (8,)
        s[f"{p}self_attn.grep_a"] = (1, H, 1, 1)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            s[f"{p}{n}.weight"], s[f"{p}{n}.bias"] = (D,), (D,)
        s[f"{p}fc1.weight"], s[f"{p}fc1.bias"] = (FFN, D), (FFN,)
        s[f"{p}fc2.weight"], s[f"{p}fc2.bias"] = (D, FFN), (D,)
    return s


def _official_like_state(enc, seed=0):
    """Random weights under the official names, with the shared table repeated under every layer
    as upstream's ``state_dict()`` writes it."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in enc.state_dict().items()}
    for k in state:
        if k.endswith("layer_norm.weight"):
            state[k] = 1.0 + state[k]
    table = state.get("encoder.layers.0.self_attn.relative_attention_bias.weight")
    if table is not None:
        for i in range(1, enc.cfg.encoder_layers):
            state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table.clone()
    return state


def _upstream_style_forward(enc, fbank):
    """The network as upstream's BEATs.py / backbone.py compute it (T x B x C, bmm, the alpha = 32
    rescaled softmax, bias repeated over the batch, torch's weight_norm)."""
    cfg = enc.cfg
    x = F.conv2d(fbank.unsqueeze(1), enc.patch_embedding.weight, stride=cfg.input_patch_size)
    x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    x = F.layer_norm(x, (cfg.embed_dim,), enc.layer_norm.weight, enc.layer_norm.bias)
    x = F.linear(x, enc.post_extract_proj.weight, enc.post_extract_proj.bias)
    pc = enc.encoder.pos_conv[0]
    conv = torch.nn.Conv1d(cfg.encoder_embed_dim, cfg.encoder_embed_dim, cfg.conv_pos, padding=cfg.conv_pos // 2,
                           groups=cfg.conv_pos_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = torch.nn.utils.weight_norm(conv, name="weight", dim=2)
    conv.load_state_dict({"bias": pc.bias, "weight_g": pc.weight_g, "weight_v": pc.weight_v})
    xc = F.gelu(conv(x.transpose(1, 2))[:, :, :-1]).transpose(1, 2)
    x = enc.encoder.layer_norm(x + xc).transpose(0, 1)  # T x B x C
    T, B, C = x.shape
    H = cfg.encoder_attention_heads
    hd, scaling, alpha = C // H, (C // H) ** -0.5, 32
    rp = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    nb = cfg.num_buckets // 2
    buckets = (rp > 0).to(torch.long) * nb
    rp = torch.abs(rp)
    max_exact = nb // 2
    large = max_exact + (torch.log(rp.float() / max_exact) / math.log(cfg.max_distance / max_exact)
                         * (nb - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, nb - 1))
    buckets = buckets + torch.where(rp < max_exact, rp, large)
    table = enc.encoder.layers[0].self_attn.relative_attention_bias
    pos_bias = table(buckets).permute(2, 0, 1).unsqueeze(0).repeat(B, 1, 1, 1).view(B * H, T, T)
    deep = math.pow(2 * cfg.encoder_layers, 1 / 4)
    for layer in enc.encoder.layers:
        a = layer.self_attn
        residual = x
        q = a.q_proj(x) * scaling * (1 / alpha)
        k, v = a.k_proj(x), a.v_proj(x)
        q = q.contiguous().view(T, B * H, hd).transpose(0, 1)
        k = k.contiguous().view(-1, B * H, hd).transpose(0, 1)
        v = v.contiguous().view(-1, B * H, hd).transpose(0, 1)
        w = torch.bmm(q, k.transpose(1, 2))
        w = (w - w.max(dim=-1, keepdim=True)[0]) * alpha
        ql = q.view(B, H, T, hd) * alpha / scaling
        ga, gb = torch.sigmoid(a.grep_linear(ql).view(B, H, T, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate = ga * (gb * a.grep_a - 1.0) + 2.0
        w = w + (gate.view(B * H, T, 1) * pos_bias).view(w.size())
        attn = torch.bmm(F.softmax(w, dim=-1), v).transpose(0, 1).contiguous().view(T, B, C)
        x = layer.self_attn_layer_norm(residual * deep + a.out_proj(attn))
        residual = x
        x = layer.fc2(F.gelu(layer.fc1(x)))
        x = layer.final_layer_norm(residual * deep + x)
    return x.transpose(0, 1)


# ------------------------------------------------------------------------------ the architecture


def test_relative_position_buckets_by_hand():
    rp = torch.tensor([0, 1, -1, 79, -79, 80, 100, -100, 253, 799, 800, 5000, -5000])
    # positive offsets use the upper half (+160); |rp| < 80 exact; else 80 + floor(log(|rp| / 80) / log(10) * 80)
    def log_bucket(n):
        return 80 + int(math.log(n / 80) / math.log(10) * 80)

    expected = [0, 161, 1, 239, 79, 240, 160 + log_bucket(100), log_bucket(100), 160 + log_bucket(253),
                160 + 159, 160 + 159, 160 + 159, 159]
    assert log_bucket(100) == 87 and log_bucket(253) == 120
    assert relative_position_bucket(rp, 320, 800).tolist() == expected


def test_real_config_parameter_names_and_shapes_match_the_official_keys():
    with torch.device("meta"):
        enc = BEATsEncoder(BEATsConfig())
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    want = _spec_shapes()
    assert got == want
    assert len(got) == 239 and set(official_state_keys()) == set(want)
    assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in got
    assert not any(k.startswith("encoder.layers.1.self_attn.relative_attention_bias") for k in got)
    assert enc.num_tokens == 496 and enc.output_dim == 768


def test_real_size_model_loads_strictly_and_gives_496_tokens_for_10_seconds():
    with torch.device("meta"):
        enc = build_beats({"encoder_layers": 12, "dropout": 0.1, "layer_wise_gradient_decay_ratio": 0.6})
    state = _official_like_state(enc)  # real sizes
    assert len(state) == 239 + 11  # with the shared table repeated, as upstream's state_dict() has it
    loaded = build_beats({"deep_norm": True, "encoder_layerdrop": 0.05}, state, "in-memory").eval()
    assert torch.equal(loaded.encoder.layers[5].fc1.weight, state["encoder.layers.5.fc1.weight"])
    x = loaded.preprocess(_clip(10.0))
    assert x.shape == (998, 128)
    with torch.no_grad():
        y = loaded(x[None])
    assert y.shape == (1, 496, 768) and torch.isfinite(y).all()


def test_tiny_width_same_geometry_token_counts():
    enc = build_beats(TINY).eval()
    assert enc.num_tokens == 496 and enc.output_dim == 64
    with torch.no_grad():
        assert enc(enc.preprocess(_clip(10.0))[None]).shape == (1, 496, 64)
    short = build_beats(TINY, max_seconds=2.0)
    assert short.num_frames == 198 and short.num_tokens == (198 // 16) * 8 == 96
    with torch.no_grad():
        assert short(short.preprocess(_clip(10.0))[None]).shape == (1, 96, 64)


def test_matches_the_upstream_formulation():
    torch.manual_seed(1)
    enc = build_beats(TINY, max_seconds=3.0)
    state = {k: v for k, v in _official_like_state(enc, seed=3).items() if k in enc.state_dict()}
    g = torch.Generator().manual_seed(4)
    table = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    state[table] = torch.randn(state[table].shape, generator=g) * 3.0  # a bias that matters
    for i in range(2):
        state[f"encoder.layers.{i}.self_attn.grep_a"] = torch.randn(1, 4, 1, 1, generator=g)
        state[f"encoder.layers.{i}.self_attn.grep_linear.weight"] = torch.randn(8, 16, generator=g)
    enc.load_state_dict(state)
    enc.eval()
    x = torch.stack([enc.preprocess(_clip(3.0, seed=s)) for s in (0, 1)])
    x[1] = x[1].flip(0)  # two different items in the batch
    with torch.no_grad():
        ours, ref = enc(x), _upstream_style_forward(enc, x)
    assert ours.shape == (2, (298 // 16) * 8, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # the test can fail: a different gate parameter or no deep-norm factor changes the outputs
    with torch.no_grad():
        enc.encoder.layers[1].self_attn.grep_a.mul_(-1.0)
        assert (enc(x) - ref).abs().max() > 1e-2
        enc.encoder.layers[1].self_attn.grep_a.mul_(-1.0)
        for layer in enc.encoder.layers:
            layer.alpha = 1.0
        assert (enc(x) - ref).abs().max() > 1e-2


def test_preprocess_is_the_normalised_kaldi_fbank_of_the_scaled_waveform():
    enc = build_beats(TINY, max_seconds=2.0)
    clip = _clip(2.5)
    x = enc.preprocess(clip)
    fb = kaldi_fbank(torch.from_numpy(clip.waveform[:32000]) * 32768.0, num_mel_bins=128, window="povey")
    torch.testing.assert_close(x, (fb - 15.41663) / (2 * 6.55582))
    short = enc.preprocess(_clip(1.0))
    assert short.shape == (198, 128)
    assert torch.allclose(short[-1], torch.full((128,), (math.log(1.1920929e-07) - 15.41663) / 13.11164), atol=1e-4)
    rep = build_beats(TINY, max_seconds=2.0, pad="repeat").preprocess(_clip(1.0))
    assert rep.shape == (198, 128) and rep[-1].std() > 0.1


def test_sample_rate_handling():
    enc = build_beats(TINY, max_seconds=1.0)
    assert enc.preprocess(_clip(1.0, rate=8000)).shape == (98, 128)
    with pytest.raises(DataError, match="8000 Hz"):
        build_beats(TINY, max_seconds=1.0, resample=False).preprocess(_clip(1.0, rate=8000))


# ------------------------------------------------------------------------------ checkpoints


def test_official_format_round_trip_through_the_family(tmp_path):
    torch.manual_seed(2)
    enc = build_beats(TINY, max_seconds=2.0)
    state = _official_like_state(enc, seed=5)
    path = tmp_path / "BEATs_tiny.pt"
    torch.save({"cfg": {**TINY, "deep_norm": True, "dropout": 0.1, "encoder_layerdrop": 0.05,
                        "layer_wise_gradient_decay_ratio": 0.6}, "model": state}, path)
    a = load_encoder("beats", str(path), max_seconds=2.0)
    b = load_encoder("beats", str(tmp_path), max_seconds=2.0)  # the folder holding a single .pt
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    x = a.preprocess(_clip(2.0))[None]
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb) and ya.shape == (1, 96, 64)
    # safetensors + config.json, written by save_beats and by convert_beats_checkpoint
    out = save_beats(a, tmp_path / "st")
    c = load_encoder("beats", str(out), max_seconds=2.0)
    d = load_encoder("beats", str(convert_beats_checkpoint(path, tmp_path / "conv")), max_seconds=2.0)
    with torch.no_grad():
        assert torch.equal(c(x), ya) and torch.equal(d(x), ya)


def test_a_file_needing_unsafe_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"cfg": _NotAWeight(), "model": {}}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*safetensors"):
        load_encoder("beats", str(path))
    assert "evil.pt" in _error(lambda: load_encoder("beats", str(path)))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    enc = build_beats(TINY, max_seconds=1.0)
    state = _official_like_state(enc)
    bad = dict(state)
    bad["encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.zeros_like(
        state["encoder.layers.0.self_attn.relative_attention_bias.weight"])
    torch.save({"cfg": TINY, "model": bad}, tmp_path / "a.pt")
    assert "shares one relative" in _error(lambda: load_encoder("beats", str(tmp_path / "a.pt")))
    torch.save({"cfg": {**TINY, "encoder_layers": 3}, "model": state}, tmp_path / "b.pt")
    assert "missing" in _error(lambda: load_encoder("beats", str(tmp_path / "b.pt")))
    torch.save({"cfg": {**TINY, "encoder_ffn_embed_dim": 96}, "model": state}, tmp_path / "c.pt")
    assert "shapes" in _error(lambda: load_encoder("beats", str(tmp_path / "c.pt")))
    assert "not found" in _error(lambda: load_encoder("beats", str(tmp_path / "nope.pt")))
    assert "several" in _error(lambda: load_encoder("beats", str(tmp_path)))
    assert "no checkpoint" in _error(lambda: load_encoder("beats", None))


class _NotAWeight:
    pass


def _error(fn) -> str:
    with pytest.raises((CheckpointError, DataError)) as e:
        fn()
    return str(e.value)


# ------------------------------------------------------------------------------ AST


def test_hf_ast_family_from_a_saved_tiny_model(tmp_path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    max_length=100, num_mel_bins=128)
    ASTModel(cfg).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "a mel filter has all zero values" (Kaldi's too)
        fe = ASTFeatureExtractor(max_length=100, mean=-3.0, std=4.0)
    fe.save_pretrained(tmp_path)
    enc = load_encoder("hf_ast", str(tmp_path))
    assert enc.mean == -3.0 and enc.std == 4.0
    t_out, f_out = (100 - 16) // 10 + 1, (128 - 16) // 10 + 1
    assert enc.num_tokens == f_out * t_out == 108 and enc.output_dim == 32
    clip = _clip(0.8)  # 78 frames: zero-padded fbank to 100
    x = enc.preprocess(clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fe(clip.waveform, sampling_rate=16000, return_tensors="pt")["input_values"][0]
    assert x.shape == ref.shape == (100, 128)
    torch.testing.assert_close(x, ref.float(), atol=2e-4, rtol=0)
    with torch.no_grad():
        y = enc(x[None])
        full = enc.model(input_values=x[None]).last_hidden_state
    assert y.shape == (1, 108, 32)
    assert torch.equal(y, full[:, 2:])
    keep = load_encoder("hf_ast", str(tmp_path), keep_special_tokens=True)
    assert keep.num_tokens == 110
    with torch.no_grad():
        assert keep(x[None]).shape == (1, 110, 32)
    long = enc.preprocess(_clip(1.5))
    assert long.shape == (100, 128)
    with pytest.raises(CheckpointError):
        load_encoder("hf_ast", str(tmp_path / "missing"))
