"""The gallery of report.html: a few fixed test items per modality, their media as small
thumbnails, the reference answer and every method's prediction at every stage.

The items and predictions are collected from a run directory by
:func:`mera.runner.gallery.collect_gallery` (the layer that knows run directories and data
sets); this module holds what they are collected into (:class:`Gallery`) and draws each item's
media as one small image (:func:`thumbnail`):

| modality | thumbnail |
|---|---|
| image | the image, downscaled to at most ``THUMB_PX`` a side |
| video | its frames side by side (a strip), each downscaled to ``THUMB_PX`` high |
| audio | a log-magnitude spectrogram (``torch.stft``) of its first ``AUDIO_SECONDS`` seconds |
| point | a matplotlib 3D scatter of the points, coloured by their rgb |

A thumbnail that needed downscaling is a JPEG (a photo's bytes), others are PNG.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

THUMB_PX = 160  # the longest side of an image thumbnail (the height of a video strip's frames)
AUDIO_SECONDS = 10.0  # the spectrogram shows at most this much of a clip
SPEC_SIZE = (256, 96)  # width, height of a spectrogram thumbnail
POINT_PX = 220  # the side of a point cloud's rendered view (cropped to the points, then fitted to THUMB_PX)
MAX_POINTS = 4096  # a denser cloud is drawn from an evenly spaced subset


@dataclass
class Prediction:
    """One model's output on one item: ``judgement`` is the judge's verdict on a QA answer (1.0
    right, 0.0 wrong; a graded judge may give a value between), None for captions."""

    text: str
    judgement: float | None = None


@dataclass
class GalleryRow:
    """One (method, order) chain's predictions on an item: ``cells[stage]`` (1-based) for every
    stage that evaluated the item's modality and wrote a prediction for it; ``first_stage`` is the
    stage at which the chain met the modality (earlier stages have not seen it)."""

    method: str
    order: str
    first_stage: int
    cells: dict[int, Prediction] = field(default_factory=dict)


@dataclass
class GalleryItem:
    modality: str
    task: str  # caption | qa
    id: str
    prompt: str  # the human turn, placeholder removed
    references: list[str]
    media: str | list[str]  # absolute path(s), as in mera.data.format.Sample
    expert: Prediction | None = None  # the modality's expert
    rows: list[GalleryRow] = field(default_factory=list)


@dataclass
class Gallery:
    """What the report's gallery shows: ``items`` (grouped by modality in the page), the number of
    stages of the longest order (the table's columns), ``stage_labels`` (column headings) and a
    ``note`` (e.g. which seed the predictions come from). ``missing``: why there is no gallery (then
    ``items`` is empty)."""

    items: list[GalleryItem] = field(default_factory=list)
    n_stages: int = 0
    stage_labels: list[str] = field(default_factory=list)
    note: str = ""
    missing: str | None = None


# ----------------------------------------------------------------------------- thumbnails


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    mime: str  # image/png | image/jpeg
    width: int
    height: int


def _encode(rgb: np.ndarray, downscaled: bool) -> Thumbnail:
    """``uint8 [H, W, 3]`` -> a JPEG when the picture was downscaled (a photo, or a rendering), else a
    PNG (small, sharp toy pictures compress best losslessly)."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if downscaled:
        image.save(buf, format="JPEG", quality=82, optimize=True)
        mime = "image/jpeg"
    else:
        image.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return Thumbnail(buf.getvalue(), mime, image.width, image.height)


def _fit(rgb: np.ndarray, max_w: int, max_h: int) -> tuple[np.ndarray, bool]:
    """``rgb`` downscaled (aspect kept, Lanczos) to fit ``max_w x max_h``; unchanged if it fits."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = min(max_w / w, max_h / h)
    if scale >= 1.0:
        return rgb, False
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.LANCZOS)), True


def image_thumbnail(image: np.ndarray) -> Thumbnail:
    small, down = _fit(image, THUMB_PX, THUMB_PX)
    return _encode(small, down)


def video_thumbnail(frames: np.ndarray, gap: int = 2) -> Thumbnail:
    """The frames side by side, ``gap`` mid-grey pixels apart (seen on light and dark pages), each at most
    ``THUMB_PX`` high."""
    fitted = [_fit(f, 4 * THUMB_PX, THUMB_PX) for f in frames]
    down = any(d for _, d in fitted)
    h = max(f.shape[0] for f, _ in fitted)
    w = sum(f.shape[1] for f, _ in fitted) + gap * (len(fitted) - 1)
    strip = np.full((h, w, 3), 128, dtype=np.uint8)
    x = 0
    for f, _ in fitted:
        strip[: f.shape[0], x : x + f.shape[1]] = f
        x += f.shape[1] + gap
    return _encode(strip, down)


def spectrogram(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-magnitude spectrogram in dB (``[freq, time]``, low frequencies first), from ``torch.stft``
    with a Hann window of ~32 ms and a hop of a quarter of it."""
    import torch

    x = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    n_fft = 1 << max(6, int(round(math.log2(max(64, 0.032 * sample_rate)))))
    if x.numel() < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.numel()))
    spec = torch.stft(x, n_fft=n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft),
                      center=True, return_complex=True).abs()
    return (20.0 * torch.log10(spec.clamp_min(1e-8))).numpy()


def audio_thumbnail(waveform: np.ndarray, sample_rate: int) -> Thumbnail:
    """The spectrogram of the first ``AUDIO_SECONDS`` seconds as a picture through matplotlib's magma
    colour map, low frequencies at the bottom; black is the median level (the background, mostly)
    or 80 dB below the peak, whichever is higher, so that the sounds stand out."""
    from matplotlib import colormaps
    from PIL import Image

    db = spectrogram(np.asarray(waveform)[: int(AUDIO_SECONDS * sample_rate)], sample_rate)
    top = float(db.max())
    floor = max(top - 80.0, float(np.median(db)))
    level = np.clip((db - floor) / max(top - floor, 1e-6), 0.0, 1.0)[::-1]  # high frequencies on top
    rgb = (colormaps["magma"](level)[..., :3] * 255).round().astype(np.uint8)
    w, h = SPEC_SIZE
    rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((w, h), Image.Resampling.BILINEAR))
    return _encode(rgb, True)


def point_thumbnail(points: np.ndarray) -> Thumbnail:
    """A matplotlib 3D scatter of ``points`` (``[N, 6]``: xyz + rgb), axes hidden, on white."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(points) > MAX_POINTS:
        points = points[np.linspace(0, len(points) - 1, MAX_POINTS).round().astype(int)]
    dpi = 100
    fig = Figure(figsize=(POINT_PX / dpi, POINT_PX / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1), projection="3d")
    xyz = points[:, :3]
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=np.clip(points[:, 3:6], 0, 1), s=4, depthshade=False, linewidths=0)
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1))
    ax.set_axis_off()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    ink = np.argwhere((rgb < 245).any(axis=2))  # the drawn points: crop the white around them
    if len(ink):
        (y0, x0), (y1, x1) = ink.min(axis=0), ink.max(axis=0)
        m = 6
        rgb = rgb[max(0, y0 - m): y1 + m + 1, max(0, x0 - m): x1 + m + 1]
    small, _ = _fit(np.ascontiguousarray(rgb), THUMB_PX, THUMB_PX)
    return _encode(small, True)


def thumbnail(modality: str, media) -> Thumbnail:
    """The thumbnail of one item's media (``media``: the path or frame paths
    of a sample); a missing or corrupt file raises :class:`~mera.errors.DataError` naming it."""
    from mera.data.media import read_media

    decoded = read_media(modality, media, AUDIO_SECONDS if modality == "audio" else None)
    if modality == "image":
        return image_thumbnail(decoded)
    if modality == "video":
        return video_thumbnail(decoded)
    if modality == "audio":
        return audio_thumbnail(decoded.waveform, decoded.sample_rate)
    return point_thumbnail(decoded)
