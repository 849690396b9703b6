"""The dataset format (mera.data.format) and the media readers / writers (mera.data.media)."""

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from mera.data.format import Sample, load_dataset, write_dataset
from mera.data.media import (
    AudioClip,
    read_audio,
    read_image,
    read_media,
    read_points,
    write_audio,
    write_image,
    write_points,
    write_video,
)
from mera.errors import DataError


def _media(tmp_path: Path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    vid = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    wav = AudioClip((rng.integers(-32768, 32768, 400) / 32768.0).astype(np.float32), 8000)
    pts = np.concatenate([rng.normal(size=(50, 3)), rng.random((50, 3))], 1).astype(np.float32)
    d = tmp_path / "set" / "media"
    write_image(d / "a.png", img)
    frames = [str(d / f"v_{k}.png") for k in range(3)]
    write_video(frames, vid)
    write_audio(d / "s.wav", wav)
    write_points(d / "p.npy", pts)
    return img, vid, wav, pts, d, frames


def test_media_round_trip_is_exact(tmp_path):
    img, vid, wav, pts, d, frames = _media(tmp_path)
    np.testing.assert_array_equal(read_media("image", d / "a.png"), img)
    got = read_media("video", frames)
    assert got.dtype == np.uint8 and got.shape == (3, 5, 6, 3)
    np.testing.assert_array_equal(got, vid)
    clip = read_media("audio", str(d / "s.wav"))
    assert isinstance(clip, AudioClip) and clip.sample_rate == 8000 and clip.waveform.dtype == np.float32
    np.testing.assert_array_equal(clip.waveform, wav.waveform)
    p = read_media("point", str(d / "p.npy"))
    assert p.dtype == np.float32
    np.testing.assert_array_equal(p, pts)
    # writers are atomic: no temporary files left behind
    assert not [f for f in d.iterdir() if f.name.startswith(".")]


def test_audio_reader_handles_8bit_stereo_and_jpeg(tmp_path):
    path = tmp_path / "st.wav"
    left = np.array([128, 255, 0, 128], dtype=np.uint8)
    right = np.array([128, 255, 128, 0], dtype=np.uint8)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(1)
        w.setframerate(4000)
        w.writeframes(np.stack([left, right], 1).tobytes())
    clip = read_audio(path)
    assert clip.sample_rate == 4000
    np.testing.assert_allclose(clip.waveform, [0.0, 127 / 128, -0.5, -0.5], atol=1e-6)
    img = np.full((8, 8, 3), 200, dtype=np.uint8)
    write_image(tmp_path / "x.jpg", img)
    got = read_image(tmp_path / "x.jpg")
    assert got.shape == (8, 8, 3) and np.abs(got.astype(int) - 200).max() <= 3


def test_points_npz_and_float64(tmp_path):
    arr = np.zeros((4, 6), dtype=np.float64)
    arr[:, 3:] = 0.5
    np.savez(tmp_path / "c.npz", arr_0=arr)
    got = read_points(tmp_path / "c.npz")
    assert got.dtype == np.float32 and got.shape == (4, 6)


def _samples(d: Path, frames):
    return [
        Sample("i0", "image", "caption", str(d / "a.png"), "<image>\ndescribe the image .", "a red circle .",
               ["a red circle .", "there is a red circle ."]),
        Sample("v0", "video", "qa", frames, "<video>\nwhat shape is moving ?", "square"),
        Sample("s0", "audio", "qa", str(d / "s.wav"), "how many beeps ? <audio>", "two", meta={"source": "toy"}),
        Sample("p0", "point", "caption", str(d / "p.npy"), "<point>\ndescribe the object .", "a cube ."),
    ]


def test_dataset_round_trip_with_relative_media(tmp_path):
    img, vid, wav, pts, d, frames = _media(tmp_path)
    samples = _samples(d, frames)
    path = tmp_path / "set" / "data.json"
    write_dataset(path, samples)
    raw = json.loads(path.read_text())
    assert raw[0]["media"] == "media/a.png"  # relative to the JSON file
    assert raw[1]["media"] == [f"media/v_{k}.png" for k in range(3)]
    assert raw[0]["conversations"][0] == {"from": "human", "value": "<image>\ndescribe the image ."}
    back = load_dataset(path)
    assert back == samples
    assert back[1].references == ["square"]  # default: [answer]
    assert back[2].meta == {"source": "toy"}
    np.testing.assert_array_equal(read_media("video", back[1].media), vid)
    # the set still loads after the whole folder moves: media are relative
    moved = tmp_path / "moved"
    (tmp_path / "set").rename(moved)
    again = load_dataset(moved / "data.json")
    assert again[0].media == str(moved / "media" / "a.png")
    np.testing.assert_array_equal(read_media("image", again[0].media), img)


def _write_raw(tmp_path, obj) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(obj))
    return p


def _good(**over):
    s = {"id": "x1", "modality": "image", "task": "qa", "media": "m.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]}
    s.update(over)
    return s


@pytest.mark.parametrize("sample, needle", [
    (_good(modality="smell"), "'modality' must be one of"),
    (_good(task="chat"), "'task' must be one of"),
    (_good(conversations=[{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}]),
     "exactly one '<image>'"),
    (_good(conversations=[{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "red"}]),
     "exactly one '<image>'"),
    (_good(conversations=[{"from": "human", "value": "<image> <audio>"}, {"from": "gpt", "value": "red"}]),
     "must not contain ['<audio>']"),
    (_good(conversations=[{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "red"}]),
     "'from'] must be 'human'"),
    (_good(conversations=[{"from": "human", "value": "<image>"}]), "'conversations' must be a list of two turns"),
    (_good(media=["a.png", "b.png"]), "'media' must be a path string"),
    (_good(references=[]), "'references' must be a non-empty list"),
    (_good(extra=1), "unknown field(s) ['extra']"),
    ({"id": "x1", "modality": "image"}, "missing field(s)"),
])
def test_invalid_samples_name_file_sample_and_problem(tmp_path, sample, needle):
    (tmp_path / "m.png").write_bytes(b"")
    p = _write_raw(tmp_path, [_good(id="ok"), sample])
    with pytest.raises(DataError) as e:
        load_dataset(p)
    msg = str(e.value)
    assert str(p) in msg and "sample 1" in msg and needle in msg


def test_dataset_file_errors(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"id": "a",')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        load_dataset(p)
    p.write_text('{"id": "a"}')
    with pytest.raises(DataError, match=r"broken\.json: expected a JSON list"):
        load_dataset(p)
    with pytest.raises(DataError, match=r"nope\.json: dataset file not found"):
        load_dataset(tmp_path / "nope.json")
    (tmp_path / "m.png").write_bytes(b"")
    p = _write_raw(tmp_path, [_good(), _good()])
    with pytest.raises(DataError, match=r"sample 1 \(id 'x1'\): duplicate id"):
        load_dataset(p)


def test_missing_media_file_is_named(tmp_path):
    p = _write_raw(tmp_path, [_good(media="gone.png")])
    with pytest.raises(DataError) as e:
        load_dataset(p)
    assert "gone.png" in str(e.value) and str(p) in str(e.value)
    assert load_dataset(p, check_media=False)[0].media == str(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"gone\.png: image file not found"):
        read_media("image", str(tmp_path / "gone.png"))


def test_corrupt_media_files_are_named(tmp_path):
    img, vid, wav, pts, d, frames = _media(tmp_path)
    # corrupt PNG: a valid header followed by garbage
    good = (d / "a.png").read_bytes()
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(good[:30] + b"\x00garbage" * 5)
    with pytest.raises(DataError, match=r"bad\.png: cannot decode image"):
        read_media("image", str(bad_png))
    with pytest.raises(DataError, match=r"bad\.png"):
        read_media("video", [frames[0], str(bad_png)])
    # truncated WAV: the header promises more frames than the file holds
    data = (d / "s.wav").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.wav: truncated WAV"):
        read_media("audio", str(cut))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(DataError, match=r"junk\.wav"):
        read_media("audio", str(junk))
    # wrong shape / dtype / pickled npy
    np.save(tmp_path / "shape.npy", np.zeros((10, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"shape\.npy: point cloud has shape \(10, 3\)"):
        read_media("point", str(tmp_path / "shape.npy"))
    np.save(tmp_path / "ints.npy", np.zeros((10, 6), dtype=np.int64))
    with pytest.raises(DataError, match=r"ints\.npy: point cloud has dtype int64"):
        read_media("point", str(tmp_path / "ints.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy: cannot read point cloud"):
        read_media("point", str(tmp_path / "obj.npy"))
    colours = np.ones((5, 6), dtype=np.float32) * 255.0
    np.save(tmp_path / "rgb255.npy", colours)
    with pytest.raises(DataError, match=r"rgb255\.npy: point colours span"):
        read_media("point", str(tmp_path / "rgb255.npy"))
    # frames of different sizes; a single video file
    write_image(tmp_path / "big.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"big\.png: frame has shape"):
        read_media("video", [frames[0], str(tmp_path / "big.png")])
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all")
    with pytest.raises(DataError, match=r"clip\.mp4"):
        read_media("video", str(tmp_path / "clip.mp4"))
    with pytest.raises(DataError, match=r"clip\.txt: not a video file"):
        read_media("video", str(tmp_path / "clip.txt"))
