"""Video files (``.mp4``, ``.avi``, ``.mkv``, ...) through PyAV: a few uniformly sampled frames.

:func:`read_video_frames` returns ``num_frames`` frames as ``uint8 [F, H, W, 3]`` (RGB), the frames
at indices :func:`sample_indices` ``(total, num_frames)`` = ``round(linspace(0, total - 1, num_frames))``
(first and last frame included; with fewer frames than ``num_frames``, frames repeat), the same
rule the video encoders apply to an already decoded frame array.

How the frames are found, cheapest first:

* **seek** (when the stream has a frame rate, a frame count or duration, and timestamps): for each
  target index ``k`` the target time is ``start + k / fps``; the container seeks to the keyframe at
  or before it and decodes forward to the first frame whose timestamp is within half a frame
  period of the target (or past it). A target less than :data:`CONTINUE_FRAMES` frames ahead of
  the last decoded frame is reached by decoding on instead of seeking again. Only the frames
  between each target and its preceding keyframe are decoded.
* **scan** (no usable frame count, no timestamps, or a seek that lands past its target): the
  video packets are counted by demuxing (no decoding), then the clip is decoded from the start
  up to the last target, converting only the targets to RGB. A target past the last frame that
  actually decodes gets that last frame.

A seek-mode clip that ends well before the frame count its container promises (more than
``max(2, total // 50)`` frames short) is reported as truncated; a smaller shortfall (a frame count
rounded from the duration) gives the last frame.

Frames are converted with ``to_ndarray(format="rgb24")`` (FFmpeg's swscale, BT.601); a frame
whose size differs from the first one's is rescaled to it. Every problem (missing file, not a
container, no video stream, nothing decodable, a decoder error) is a
:class:`~mera.errors.DataError` naming the file.

:func:`write_video_file` writes frames to a video file (used by tests and demos).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from mera.data.limits import check_pixels
from mera.errors import DataError
from mera.io import atomic_path

CONTINUE_FRAMES = 16  # decode on (rather than seek) to a target at most this many frames ahead

_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".avi": "avi", ".mkv": "matroska",
            ".webm": "webm", ".mpg": "mpeg", ".mpeg": "mpeg"}


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """``round(linspace(0, total - 1, num_frames))`` as int64 (numpy rounds halves to even)."""
    if total < 1 or num_frames < 1:
        raise ValueError(f"sample_indices: total={total}, num_frames={num_frames}")
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def _rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    if size is not None and (frame.width, frame.height) != size:
        frame = frame.reformat(width=size[0], height=size[1])
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)


def _stream_geometry(container, stream) -> tuple[int | None, Fraction | None]:
    """(frame count, frame rate) from the container's metadata; either may be unknown (None)."""
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = Fraction(fps) if fps else None
    if fps is not None and fps <= 0:
        fps = None
    total = int(stream.frames or 0) or None
    if total is None and fps is not None:
        seconds = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1_000_000
        if seconds and seconds > 0:
            total = max(1, round(seconds * fps))
    return total, fps


class _SeekUnreliable(Exception):
    """The container's seeking or timestamps cannot be trusted: scan instead."""


def _read_by_seeking(path: Path, container, stream, indices: np.ndarray, total: int, fps: Fraction,
                     info: dict) -> list[np.ndarray]:
    tb = stream.time_base
    if not tb:
        raise _SeekUnreliable("no time base")
    start = stream.start_time or 0
    period = 1 / (fps * tb)  # one frame, in time_base units
    out: dict[int, np.ndarray] = {}
    size = None
    gen = None
    last_pts = None
    last_frame = None
    for k in indices.tolist():
        if k in out:
            continue
        target = start + k * period
        if gen is None or last_pts is None or target < last_pts or target - last_pts > CONTINUE_FRAMES * period:
            container.seek(max(int(target), int(start)), stream=stream, backward=True, any_frame=False)
            info["seeks"] += 1
            gen = container.decode(stream)
            first_after_seek = True
        else:
            first_after_seek = False
        got = None
        for frame in gen:
            info["decoded"] += 1
            if frame.pts is None:
                raise _SeekUnreliable("a frame without a timestamp")
            if first_after_seek and k > 0 and frame.pts > target + period / 2:
                raise _SeekUnreliable(f"seek to {target} landed at {frame.pts}")
            first_after_seek = False
            last_pts, last_frame = frame.pts, frame
            if frame.pts >= target - period / 2:
                got = frame
                break
        if got is None:  # the stream ended before the target
            if last_frame is None:
                raise _SeekUnreliable("nothing decoded after the seek")
            last_index = round((last_pts - start) / period)
            if k - last_index > max(2, total // 50):
                raise DataError(f"{path}: truncated video: the container promises {total} frames, "
                                f"but decoding ends at frame {last_index}")
            got = last_frame  # a frame count a little off (metadata rounding): the last frame there is
            gen = None
        if size is None:
            size = (got.width, got.height)
        out[k] = _rgb(got, size)
    return [out[k] for k in indices.tolist()]


def _read_by_scanning(path: Path, num_frames: int, info: dict) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = sum(1 for pkt in container.demux(stream) if pkt.size)
    if total == 0:
        raise DataError(f"{path}: the video stream holds no frames")
    indices = sample_indices(total, num_frames)
    info["total"], info["indices"] = total, indices.tolist()
    wanted = set(indices.tolist())
    out: dict[int, np.ndarray] = {}
    size = None
    last = None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            info["decoded"] += 1
            last = frame
            if i in wanted:
                if size is None:
                    size = (frame.width, frame.height)
                out[i] = _rgb(frame, size)
            if i >= indices[-1]:
                break
    if last is None:
        raise DataError(f"{path}: no decodable video frames")
    for k in indices.tolist():
        if k not in out:  # fewer frames decode than packets were counted
            out[k] = _rgb(last, size)
    return [out[k] for k in indices.tolist()]


def read_video_frames(path: str | os.PathLike, num_frames: int = 4, *, return_info: bool = False):
    """``num_frames`` uniformly sampled RGB frames of the video file ``path`` -> ``uint8 [F, H, W, 3]``.

    With ``return_info``, also a dict: ``total`` (frame count used), ``indices`` (the sampled
    frame indices), ``method`` (``"seek"`` or ``"scan"``), ``seeks``, ``decoded`` (frames decoded).
    """
    import av

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: video file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the video file is empty")
    if num_frames < 1:
        raise ValueError(f"read_video_frames: num_frames must be >= 1, got {num_frames}")
    info = {"total": None, "indices": None, "method": "seek", "seeks": 0, "decoded": 0}
    frames = None
    try:
        try:
            container = av.open(str(p))
        except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{p}: cannot open the video ({type(e).__name__}: {e})") from None
        with container:
            if not container.streams.video:
                raise DataError(f"{p}: holds no video stream")
            stream = container.streams.video[0]
            if stream.codec_context.width and stream.codec_context.height:  # from the header: before decoding
                check_pixels(p, stream.codec_context.width, stream.codec_context.height, "video frame")
            total, fps = _stream_geometry(container, stream)
            if total and fps:
                indices = sample_indices(total, num_frames)
                info["total"], info["indices"] = total, indices.tolist()
                try:
                    frames = _read_by_seeking(p, container, stream, indices, total, fps, info)
                except (_SeekUnreliable, av.FFmpegError, PermissionError):
                    frames = None
        if frames is None:
            info["method"] = "scan"
            frames = _read_by_scanning(p, num_frames, info)
    except DataError:
        raise
    except av.FFmpegError as e:
        raise DataError(f"{p}: cannot decode the video ({type(e).__name__}: {e})") from None
    arr = np.stack(frames)
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{p}: decoded frames have shape {arr.shape[1:]}")
    return (arr, info) if return_info else arr


def write_video_file(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4",
                     gop_size: int | None = None, bit_rate: int | None = None, options: dict | None = None) -> None:
    """Write ``uint8 [F, H, W, 3]`` (even H and W for yuv420p codecs) as a video file, atomically.

    The container follows the suffix (:data:`_FORMATS`); ``gop_size`` sets the keyframe interval,
    ``bit_rate`` (bits/s) the quality of codecs such as ``mpeg4`` whose default (200 kb/s) is coarse.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_video_file: expected uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    suffix = Path(path).suffix.lower()
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        raise ValueError(f"write_video_file: {path}: unsupported suffix {suffix!r}; known: {sorted(_FORMATS)}")
    h, w = frames.shape[1:3]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format=fmt) as out:
            stream = out.add_stream(codec, rate=fps, options=options or {})
            stream.width, stream.height = w, h
            stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
            if gop_size is not None:
                stream.codec_context.gop_size = gop_size
            if bit_rate is not None:
                stream.bit_rate = bit_rate
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
