"""Video: the PyAV reader (sampling by seeking, errors) and CLIP on 4 frames (family ``hf_clip_video``)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mera.data.video as video
from mera.config.registry import lookup
from mera.data.video import read_video_frames, sample_indices, write_video_file
from mera.errors import DataError
from mera.model.encoders.base import load_encoder


def _codec():
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _coded_frames(n, h=24, w=32):
    """Frame k is a solid colour that encodes k: R = 5 + 10 (k % 25), G = 5 + 10 (k // 25)."""
    fr = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        fr[k, ..., 0] = 5 + 10 * (k % 25)
        fr[k, ..., 1] = 5 + 10 * (k // 25)
        fr[k, ..., 2] = 128
    return fr


def _decode_index(frames):
    m = frames.reshape(frames.shape[0], -1, 3).astype(np.float64).mean(1)
    assert np.all(frames.reshape(frames.shape[0], -1, 3).std(1) < 4)  # still solid
    return (np.round((m[:, 0] - 5) / 10) + 25 * np.round((m[:, 1] - 5) / 10)).astype(int).tolist()


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video_file(path, _coded_frames(120), fps=25, codec=_codec(), gop_size=10, bit_rate=8_000_000)
    return path


# ------------------------------------------------------------------------------ reader


def test_sample_indices_formula():
    assert sample_indices(120, 4).tolist() == [0, 40, 79, 119]
    assert sample_indices(6, 4).tolist() == [0, 2, 3, 5]
    assert sample_indices(3, 4).tolist() == [0, 1, 1, 2]
    assert sample_indices(1, 4).tolist() == [0, 0, 0, 0]


def test_reads_sampled_frames_by_seeking(long_clip):
    frames, info = read_video_frames(long_clip, 4, return_info=True)
    assert frames.shape == (4, 24, 32, 3) and frames.dtype == np.uint8
    assert info["total"] == 120 and info["indices"] == [0, 40, 79, 119]
    assert _decode_index(frames) == [0, 40, 79, 119]
    assert info["method"] == "seek" and info["seeks"] >= 3
    assert info["decoded"] < 40  # only around the targets (keyframes every 10 frames), not 120


def test_scan_fallback_gives_the_same_frames(long_clip, monkeypatch):
    seek = read_video_frames(long_clip, 4)
    monkeypatch.setattr(video, "_stream_geometry", lambda container, stream: (None, None))
    frames, info = read_video_frames(long_clip, 4, return_info=True)
    assert info["method"] == "scan" and info["total"] == 120
    np.testing.assert_array_equal(frames, seek)


def test_avi_and_short_clips(tmp_path):
    p = tmp_path / "short.avi"
    write_video_file(p, _coded_frames(10), fps=10, codec="mpeg4", bit_rate=8_000_000)
    assert _decode_index(read_video_frames(p, 4)) == [0, 3, 6, 9]
    p3 = tmp_path / "three.avi"
    write_video_file(p3, _coded_frames(3), fps=10, codec="mpeg4", bit_rate=8_000_000)
    assert _decode_index(read_video_frames(p3, 4)) == [0, 1, 1, 2]


def test_bad_files_are_data_errors(tmp_path, long_clip):
    rnd = tmp_path / "noise.mp4"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"noise\.mp4: cannot open the video"):
        read_video_frames(rnd, 4)
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.avi: the video file is empty"):
        read_video_frames(empty, 4)
    with pytest.raises(DataError, match=r"absent\.mp4: video file not found"):
        read_video_frames(tmp_path / "absent.mp4", 4)
    cut = tmp_path / "cut.mp4"  # an mp4 cut in half loses its index (moov) at the end
    data = long_clip.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.mp4"):
        read_video_frames(cut, 4)
    import wave

    with wave.open(str(tmp_path / "sound.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    with pytest.raises(DataError, match=r"sound\.wav: holds no video stream"):
        read_video_frames(tmp_path / "sound.wav", 4)


def test_truncated_mkv_is_reported(tmp_path):
    p = tmp_path / "clip.mkv"
    write_video_file(p, _coded_frames(120), fps=25, codec=_codec(), gop_size=10, bit_rate=8_000_000)
    data = p.read_bytes()
    (tmp_path / "half.mkv").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"half\.mkv: .*(truncated|decode)"):
        read_video_frames(tmp_path / "half.mkv", 4)


# ------------------------------------------------------------------------------ encoder


def _tiny_clip(tmp_path, image_size=28, patch_size=7, hidden=32):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_video_tokens_are_pooled_penultimate_features(tmp_path):
    from transformers import CLIPVisionModel

    from mera.model.encoders.clip import ClipVisionEncoder

    path = _tiny_clip(tmp_path)
    enc = load_encoder("hf_clip_video", str(path))
    assert lookup("encoder", "hf_clip_video").obj.__module__ == "mera.model.encoders.clip_video"
    assert enc.num_tokens == 4 * 2 * 2 and enc.output_dim == 32
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, size=(6, 20, 30, 3), dtype=np.uint8)
    x = enc.preprocess(clip)
    assert x.shape == (4, 3, 28, 28)
    image = ClipVisionEncoder(CLIPVisionModel.from_pretrained(path))  # same image preprocessing as hf_clip
    torch.testing.assert_close(x, torch.stack([image.preprocess(clip[i]) for i in (0, 2, 3, 5)]))
    with torch.no_grad():
        out = enc(torch.stack([x, x.flip(0)]))
        ref_model = CLIPVisionModel.from_pretrained(path).eval()
        hs = ref_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # [4, 16, D]
    assert out.shape == (2, 16, 32)
    grid = hs.reshape(4, 4, 4, 32).permute(0, 3, 1, 2)  # row-major 4 x 4 patch grid
    ref = F.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[0], ref.reshape(16, 32), atol=1e-5, rtol=1e-5)
    # bilinear 2x down on an even grid = mean of each 2 x 2 patch block; frame 0's top-left token:
    torch.testing.assert_close(out[0, 0], hs[0, [0, 1, 4, 5]].mean(0), atol=1e-5, rtol=1e-5)
    # frame 1's bottom-right token
    torch.testing.assert_close(out[0, 7], hs[1, [10, 11, 14, 15]].mean(0), atol=1e-5, rtol=1e-5)
    # frames stay in time order: the second sample's frames are reversed
    torch.testing.assert_close(out[1], ref.flip(0).reshape(16, 32), atol=1e-5, rtol=1e-5)


def test_clip_video_real_geometry(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mera.model.encoders.clip import ClipVisionEncoder
    from mera.model.encoders.clip_video import ClipVideoEncoder

    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=336, patch_size=14)
    enc = ClipVideoEncoder(ClipVisionEncoder(CLIPVisionModel(cfg))).eval()
    assert enc.grid == 24 and enc.pooled == 12 and enc.num_tokens == 576
    x = enc.preprocess(np.random.default_rng(1).integers(0, 256, size=(9, 48, 64, 3), dtype=np.uint8))
    assert x.shape == (4, 3, 336, 336)
    with torch.no_grad():
        assert enc(x[None]).shape == (1, 576, 16)


def test_clip_video_preprocess_accepts_a_video_file(tmp_path, long_clip):
    enc = load_encoder("hf_clip_video", str(_tiny_clip(tmp_path)))
    from_path = enc.preprocess(str(long_clip))
    torch.testing.assert_close(from_path, enc.preprocess(read_video_frames(long_clip, 4)))
    with pytest.raises(DataError, match="uint8 frames"):
        enc.preprocess(np.zeros((4, 8, 8, 3), np.float32))
