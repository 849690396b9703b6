"""Media readers and writers: the decoded arrays that every encoder's ``preprocess`` receives.

| modality | on disk                                              | decoded by :func:`read_media`                  |
|----------|------------------------------------------------------|------------------------------------------------|
| image    | one PNG / JPEG file                                  | ``uint8 [H, W, 3]``                            |
| video    | a video file (mp4, avi, ...: 4 frames sampled by     | ``uint8 [F, H, W, 3]``                         |
|          | PyAV) or a list of frame image files, all one size   |                                                |
| audio    | WAV, integer PCM (8/16/24/32-bit), mono or more      | :class:`AudioClip` ``(waveform, sample_rate)``: |
|          | channels (averaged down to mono)                     | ``float32 [n]`` in [-1, 1] and an ``int``      |
| point    | ``.npy`` float ``(N, 6)``: xyz + rgb, rgb in [0, 1]  | ``float32 [N, 6]``                             |
|          | (also ``.npz`` holding ``arr_0``)                    |                                                |

A video file is decoded by :mod:`mera.data.video` (seeking to the sampled frames where the
container allows). Every problem with a file (missing, unreadable,
corrupt, truncated, wrong shape or dtype) is a :class:`~mera.errors.DataError` naming the file.

The writers are atomic (temporary name, then rename). 16-bit WAV stores ``round(x * 32768)``
and is read back as ``int / 32768``, so a waveform already on that grid (the toy world's are)
round-trips exactly; PNG and ``.npy`` round-trip exactly.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from mera.data.limits import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from mera.data.limits import check_pixels
from mera.errors import DataError
from mera.io import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".gif")


class AudioClip(NamedTuple):
    """A decoded audio file: mono ``float32`` waveform in [-1, 1] and its sample rate (Hz)."""

    waveform: np.ndarray
    sample_rate: int


def _exists(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {what} file not found")
    return p


# ----------------------------------------------------------------------------------- readers


def read_image(path: str | os.PathLike) -> np.ndarray:
    """PNG / JPEG (any Pillow-readable image) -> ``uint8 [H, W, 3]`` (grey / RGBA / palette converted to RGB);
    an image of more than :data:`MAX_IMAGE_PIXELS` is refused from its header, before it is decoded."""
    from PIL import Image

    p = _exists(path, "image")
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # mera's own limit, checked just below
    try:
        with Image.open(p) as im:
            check_pixels(p, *im.size)  # from the header, before anything is decoded
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{p}: decoded image has shape {arr.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(arr)


VIDEO_FRAMES = 4  # frames sampled uniformly from a video file (the paper's setting)


def read_video(paths: str | os.PathLike | Sequence[str | os.PathLike], num_frames: int = VIDEO_FRAMES) -> np.ndarray:
    """A video file (decoded with PyAV: ``num_frames`` frames sampled uniformly, seeking where
    the container allows) or a list of frame image files -> ``uint8 [F, H, W, 3]``."""
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        if p.suffix.lower() in VIDEO_FILE_SUFFIXES:
            from mera.data.video import read_video_frames

            return read_video_frames(p, num_frames)
        if p.suffix.lower() in IMAGE_SUFFIXES:
            paths = [p]
        else:
            raise DataError(f"{p}: not a video file ({', '.join(VIDEO_FILE_SUFFIXES)}) nor a frame image")
    paths = list(paths)
    if not paths:
        raise DataError("video: empty list of frame files")
    frames = [read_image(p) for p in paths]
    shape = frames[0].shape
    for p, f in zip(paths, frames):
        if f.shape != shape:
            raise DataError(f"{p}: frame has shape {f.shape}, but the video's first frame {paths[0]} has {shape}")
    return np.stack(frames)


AUDIO_MARGIN_SECONDS = 0.5  # read beyond an encoder's window, so that resampling its edge sees real samples


def read_audio(path: str | os.PathLike, max_seconds: float | None = None) -> AudioClip:
    """WAV (integer PCM) -> :class:`AudioClip`; several channels are averaged to mono. ``max_seconds``:
    read only the first that many seconds (plus a short margin): what an encoder that crops to its
    window uses, not an hour-long file."""
    p = _exists(path, "audio")
    try:
        with wave.open(str(p), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if max_seconds is not None and rate > 0:
                n = min(n, int(np.ceil((float(max_seconds) + AUDIO_MARGIN_SECONDS) * rate)))
            data = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise DataError(f"{p}: cannot read WAV ({type(e).__name__}: {e}); only integer PCM WAV is supported") from None
    if width not in (1, 2, 3, 4):
        raise DataError(f"{p}: unsupported WAV sample width {width} bytes")
    if channels < 1 or rate <= 0:
        raise DataError(f"{p}: bad WAV header ({channels} channels, {rate} Hz)")
    expected = n * width * channels
    if len(data) != expected:
        got = len(data) // (width * channels)
        raise DataError(f"{p}: truncated WAV: header says {n} frames, the file holds {got}")
    if n == 0:
        raise DataError(f"{p}: WAV holds no samples")
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    else:
        x = (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return AudioClip(np.ascontiguousarray(x, dtype=np.float32), int(rate))


def read_points(path: str | os.PathLike) -> np.ndarray:
    """``.npy`` (or ``.npz`` with ``arr_0``) float ``(N, 6)`` -> ``float32 [N, 6]``; rgb in [0, 1]."""
    p = _exists(path, "point cloud")
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and magic[:4] != b"PK\x03\x04":  # numpy would guess "pickled data"
        raise DataError(f"{p}: not a NumPy .npy/.npz file (expected a float array of shape (N, 6))")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "arr_0" not in loaded.files:
                    raise DataError(f"{p}: .npz holds {loaded.files}, expected 'arr_0'")
                arr = loaded["arr_0"]
        else:
            arr = loaded
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{p}: cannot read point cloud ({type(e).__name__}: {e})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{p}: point cloud has dtype {arr.dtype}, expected float32")
    if arr.ndim != 2 or arr.shape[1] != 6 or arr.shape[0] == 0:
        raise DataError(f"{p}: point cloud has shape {arr.shape}, expected (N, 6) (xyz + rgb)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(f"{p}: point cloud holds NaN or infinite values")
    rgb = arr[:, 3:]
    if rgb.min() < -1e-3 or rgb.max() > 1.0 + 1e-3:
        raise DataError(f"{p}: point colours span [{rgb.min():.3g}, {rgb.max():.3g}], expected rgb in [0, 1]")
    return np.ascontiguousarray(arr)


def read_media(modality: str, path_or_paths, max_seconds: float | None = None) -> np.ndarray | AudioClip:
    """Decode one sample's media for ``modality`` (see the module table for the returned forms);
    ``max_seconds``: the audio window the encoder uses (the rest of a longer file is not read)."""
    if modality == "video":
        return read_video(path_or_paths)
    if not isinstance(path_or_paths, (str, os.PathLike)):
        raise DataError(f"{modality}: expected one media file path, got {type(path_or_paths).__name__}")
    if modality == "image":
        return read_image(path_or_paths)
    if modality == "audio":
        return read_audio(path_or_paths, max_seconds)
    if modality == "point":
        return read_points(path_or_paths)
    raise DataError(f"{path_or_paths}: unknown modality {modality!r}")


# ----------------------------------------------------------------------------------- writers


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write ``uint8 [H, W, 3]`` as PNG or JPEG (by the suffix), atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    suffix = Path(path).suffix.lower()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix)
    if fmt is None:
        raise ValueError(f"write_image: {path}: unsupported suffix {suffix!r} (use .png or .jpg)")
    with atomic_path(path) as tmp:
        Image.fromarray(image, mode="RGB").save(tmp, format=fmt)


def write_video(paths: Sequence[str | os.PathLike], frames: np.ndarray) -> None:
    """Write ``uint8 [F, H, W, 3]`` as one image file per frame (``len(paths) == F``)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(paths) != frames.shape[0]:
        raise ValueError(f"write_video: {len(paths)} paths for frames of shape {frames.shape}")
    for p, f in zip(paths, frames):
        write_image(p, f)


def write_audio(path: str | os.PathLike, clip: AudioClip | tuple) -> None:
    """Write a mono waveform in [-1, 1] as 16-bit PCM WAV (``round(x * 32768)``, clipped), atomically."""
    waveform, rate = clip
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"write_audio: expected a mono waveform [n], got shape {x.shape}")
    q = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    with atomic_path(path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(rate))
            w.writeframes(q.tobytes())


def write_points(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write ``float32 (N, 6)`` as ``.npy``, atomically."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 6:
        raise ValueError(f"write_points: expected (N, 6), got {points.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, points.astype(np.float32, copy=False), allow_pickle=False)


def write_media(modality: str, path_or_paths, media) -> None:
    """Write one sample's media in the form :func:`read_media` returns."""
    if modality == "image":
        write_image(path_or_paths, media)
    elif modality == "video":
        write_video(path_or_paths, media)
    elif modality == "audio":
        write_audio(path_or_paths, media)
    elif modality == "point":
        write_points(path_or_paths, media)
    else:
        raise ValueError(f"write_media: unknown modality {modality!r}")
