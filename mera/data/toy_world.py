"""The toy world: four procedural modalities, each with a caption set and a QA set.

Everything is generated from a seed with numpy ``default_rng`` (no global state), so the
same config gives byte-identical files on every run. What each modality holds:

| modality | media                                  | attributes (classes)                                    |
|----------|----------------------------------------|---------------------------------------------------------|
| image    | 32x32 RGB, noisy background, 1-2 shapes | count (one/two); per shape: colour (6), shape (4),      |
|          |                                        | size (small/big), position (4 quadrants)                |
| video    | 4 frames 32x32 of one moving shape     | colour (6), shape (4), direction (4), speed (slow/fast) |
| audio    | 1 s at 8 kHz of 1-4 beeps + noise      | count (4), pitch (low/medium/high), timbre (4)          |
| point    | 256 points xyz+rgb on a 3D surface     | shape (5), colour (6), proportion (tall/regular/flat)   |

Continuous quantities (size, position, speed, pitch, proportions) are drawn from ranges
that touch at the class boundaries, and every medium is noisy: a good model is good,
not perfect. Colours are shared by image, video and point; numbers by image and audio;
question words by all (the interference the continual-learning setting needs).

Text is lowercase words with punctuation as separate tokens. Captions come from four
templates per modality; a train sample uses one at random, a test or validation sample's
``references`` hold all four renderings.

Three splits: ``train``, ``test`` and ``val`` (the validation split, for choosing
hyper-parameters without looking at the test split). Each (modality, task, split) set is
drawn from its own random stream, so adding the validation split left the train and test
sets byte-identical to the world of before, and the three splits share no sample.

:func:`text_instructions` gives text-only pairs that teach a tiny LM the toy language
("describe the image : big red circle , top left" -> a caption) and colour / shape
questions about objects given in words; it never asks the modality-specific questions
(position, size, count, direction, speed, pitch, timbre, proportions): the LLM must learn
those at each modality's stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, model_serializer, model_validator

from mera import MODALITIES, PLACEHOLDERS
from mera.config.base import StrictModel
from mera.data.format import TASKS, Sample, write_dataset
from mera.data.media import AudioClip, write_media
from mera.errors import ConfigError, DataError
from mera.io import write_json

WORLD_VERSION = "toy-world-1"  # the world of ``ToyWorldConfig(version=1)`` (the default)
WORLD_VERSIONS = {1: "toy-world-1", 2: "toy-world-2"}  # ToyWorldConfig.version -> its name
SPLITS = ("train", "test", "val")  # val: for choosing hyper-parameters (mera sweep)
EVAL_SPLITS = ("test", "val")  # splits whose captions carry every template as references

# ------------------------------------------------------------------------------ the language

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
_COLOUR_RGB = np.array(
    [
        [0.86, 0.16, 0.14],  # red
        [0.95, 0.55, 0.12],  # orange
        [0.90, 0.85, 0.18],  # yellow
        [0.20, 0.68, 0.24],  # green
        [0.18, 0.34, 0.88],  # blue
        [0.58, 0.24, 0.78],  # purple
    ]
)
SHAPES_2D = ("circle", "square", "triangle", "cross")
SIZES = ("small", "big")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant index = 2 * row + col
NUMBERS = ("one", "two", "three", "four")
TIMES = ("once", "twice", "three times", "four times")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "fast")
SPEED_ADVERBS = ("slowly", "quickly")
PITCHES = ("low", "medium", "high")
TIMBRES = ("whistle", "buzz", "bell", "horn")
SHAPES_3D = ("sphere", "cube", "cylinder", "cone", "pyramid")
PROPORTIONS = ("tall", "regular", "flat")
NOUNS = {"image": "image", "video": "video", "audio": "sound", "point": "object"}

# The human turn of a caption sample, per modality.
CAPTION_PROMPTS = {m: f"{PLACEHOLDERS[m]}\ndescribe the {NOUNS[m]} ." for m in MODALITIES}

# QA questions per modality and question type; the human turn is f"{placeholder}\n{question}".
QUESTIONS = {
    "image": {
        "colour": "what colour is the {shape} ?",
        "shape": "what shape is the {colour} object ?",
        "size": "is the {colour} {shape} big or small ?",
        "position": "where is the {colour} {shape} ?",
        "count": "how many shapes are there ?",
    },
    "video": {
        "colour": "what colour is the moving shape ?",
        "shape": "what shape is moving ?",
        "direction": "which way is the {shape} moving ?",
        "speed": "is the {shape} moving fast or slow ?",
    },
    "audio": {
        "count": "how many beeps are there ?",
        "pitch": "what is the pitch of the beeps ?",
        "timbre": "what kind of sound is it ?",
    },
    "point": {
        "shape": "what shape is the object ?",
        "colour": "what colour is the object ?",
        "proportion": "what are the proportions of the object ?",
    },
}
# The only question types that text_instructions asks (about objects given in words).
TEXT_QUESTION_TYPES = ("colour", "shape")

# --- toy-world-2 (``ToyWorldConfig(version=2)``, docs/calibration.md): the paper's regime. The
# media, attributes and caption templates are those of toy-world-1; what changes is what the shared
# LLM has to learn. One caption instruction for every modality (only the connector's tokens say
# which modality it is) and one question format per kind of attribute across modalities ("how many
# are there ?" for image shapes and audio beeps, "what colour is it ?", "how <adjective> is it ?" for
# every graded attribute), none of which the text pre-training (toy-world-1's instructions) ever
# uses: each stage must teach them to the LLM, and the next stage teaches the same prompts other
# answers, which is where sequential fine-tuning forgets.
CAPTION_PROMPTS_V2 = {m: f"{PLACEHOLDERS[m]}\ndescribe it ." for m in MODALITIES}
QUESTIONS_V2 = {
    "image": {
        "colour": "what colour is the {shape} ?",
        "shape": "what shape is the {colour} one ?",
        "size": "how big is the {colour} {shape} ?",
        "position": "where is the {colour} {shape} ?",
        "count": "how many are there ?",
    },
    "video": {
        "colour": "what colour is it ?",
        "shape": "what shape is it ?",
        "direction": "where is it going ?",
        "speed": "how fast is it ?",
    },
    "audio": {
        "count": "how many are there ?",
        "pitch": "how high is it ?",
        "timbre": "what kind is it ?",
    },
    "point": {
        "shape": "what shape is it ?",
        "colour": "what colour is it ?",
        "proportion": "how tall is it ?",
    },
}
_LANGUAGE = {1: (CAPTION_PROMPTS, QUESTIONS), 2: (CAPTION_PROMPTS_V2, QUESTIONS_V2)}


def caption_prompts(version: int = 1) -> dict[str, str]:
    """The human turn of a caption sample, per modality, in world ``version``."""
    return _LANGUAGE[version][0]


def questions(version: int = 1) -> dict[str, dict[str, str]]:
    """QA questions per modality and question type, in world ``version``."""
    return _LANGUAGE[version][1]


# Caption templates. Image: (sentence, per-object phrase, joiner), objects in quadrant order.
IMAGE_TEMPLATES = (
    ("{objects} .", "a {size} {colour} {shape} at the {position}", " and "),
    ("there is {objects} .", "a {size} {colour} {shape} in the {position}", " and "),
    ("the image shows {objects} .", "a {size} {colour} {shape} , {position}", " , and "),
    ("{count} {shapes} : {objects} .", "{size} {colour} {shape} {position}", " ; "),
)
VIDEO_TEMPLATES = (
    "a {colour} {shape} moving {direction} {speed_adverb} .",
    "the {colour} {shape} moves {speed_adverb} {direction} .",
    "a {speed} {colour} {shape} going {direction} .",
    "in the video , a {colour} {shape} moves {direction} at {speed} speed .",
)
AUDIO_TEMPLATES = (
    "{count} {pitch} {timbre} {beeps} .",
    "a {pitch} {timbre} sounds {times} .",
    "the sound has {count} {beeps} of a {pitch} {timbre} .",
    "{timbre} , {pitch} pitch , {count} {beeps} .",
)
POINT_TEMPLATES = (
    "a {proportion} {colour} {shape} .",
    "a 3d model of a {proportion} {colour} {shape} .",
    "the object is a {colour} {shape} , {proportion} .",
    "a {colour} {shape} that is {proportion} .",
)
TEMPLATES = {"image": IMAGE_TEMPLATES, "video": VIDEO_TEMPLATES, "audio": AUDIO_TEMPLATES, "point": POINT_TEMPLATES}

_XY_BINS = 8  # fine position classes of the image encoder's auxiliary heads (not in the text)


def attribute_heads(modality: str) -> dict[str, int]:
    """Attribute name -> number of classes; exactly the keys of ``ToySample.attributes``.

    A value of -1 in ``attributes`` means "absent" (the second shape of a one-shape image).
    Image also has ``x_k`` / ``y_k``: the shape's centre in 8 bins per axis, an auxiliary
    target for the image encoder (so that its features locate shapes finely, which video needs).
    """
    if modality == "image":
        heads = {"count": 2}
        for k in (1, 2):
            heads |= {f"colour_{k}": len(COLOURS), f"shape_{k}": len(SHAPES_2D), f"size_{k}": len(SIZES),
                      f"position_{k}": len(POSITIONS), f"x_{k}": _XY_BINS, f"y_{k}": _XY_BINS}
        return heads
    if modality == "video":
        return {"colour": len(COLOURS), "shape": len(SHAPES_2D), "direction": len(DIRECTIONS), "speed": len(SPEEDS)}
    if modality == "audio":
        return {"count": len(NUMBERS), "pitch": len(PITCHES), "timbre": len(TIMBRES)}
    if modality == "point":
        return {"shape": len(SHAPES_3D), "colour": len(COLOURS), "proportion": len(PROPORTIONS)}
    raise ConfigError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")


# ------------------------------------------------------------------------------ config


# toy-world-2's default sizes of the evaluation sets (toy-world-1 keeps 60 + 60)
_V2_EVAL_SIZES = {"n_test_caption": 300, "n_test_qa": 300, "n_val_caption": 300, "n_val_qa": 300}


class ToyWorldConfig(StrictModel):
    """The toy world's sizes and difficulty. Counts are per modality and per set.

    ``version`` selects the world: 1 (toy-world-1, the default) or 2 (toy-world-2: shared prompts
    and question formats, 300 + 300 test and validation items per modality by default). A
    version-1 config dumps without ``version``, so its hashes and folders are what they always were.
    """

    version: int = Field(1, ge=1, le=2)
    seed: int = 0
    n_train_caption: int = Field(600, ge=1)
    n_train_qa: int = Field(600, ge=1)
    n_test_caption: int = Field(60, ge=1)
    n_test_qa: int = Field(60, ge=1)
    n_val_caption: int = Field(60, ge=1)  # the validation split (its own random stream; like test)
    n_val_qa: int = Field(60, ge=1)
    n_points: int = Field(256, ge=32)
    image_size: int = Field(32, ge=16, le=256)
    video_frames: int = Field(4, ge=2, le=16)
    audio_rate: int = Field(8000, ge=4000, le=48000)
    audio_seconds: float = Field(1.0, ge=0.5, le=10.0)
    # difficulty
    image_noise: float = Field(0.08, ge=0.0, le=1.0)  # std of per-pixel noise (pixel values in [0, 1])
    video_noise: float = Field(0.08, ge=0.0, le=1.0)
    audio_noise: float = Field(0.05, ge=0.0, le=1.0)  # std of additive noise (waveform in [-1, 1])
    point_noise: float = Field(0.02, ge=0.0, le=1.0)  # std of xyz jitter (cloud in the unit sphere)
    point_outliers: float = Field(0.05, ge=0.0, le=0.5)  # share of points replaced by random clutter
    colour_jitter: float = Field(0.06, ge=0.0, le=0.5)  # per-sample jitter of each colour channel

    @model_validator(mode="before")
    @classmethod
    def _version_defaults(cls, data):
        if isinstance(data, dict) and data.get("version") == 2:
            data = {**_V2_EVAL_SIZES, **data}
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        d = handler(self)
        if isinstance(d, dict) and self.version == 1:
            d.pop("version", None)  # toy-world-1's dumps (hashes, manifests) predate the field
        return d

    @property
    def world_version(self) -> str:
        return WORLD_VERSIONS[self.version]


def config_hash(cfg: ToyWorldConfig) -> str:
    blob = json.dumps({"version": cfg.world_version, "config": cfg.model_dump()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class ToySample:
    """One generated sample in memory; ``media`` is what ``read_media`` returns for its file(s)."""

    id: str
    modality: str
    task: str
    media: np.ndarray | AudioClip
    prompt: str
    answer: str
    references: list[str]
    attributes: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------ semantics


def _sample_semantics(modality: str, rng: np.random.Generator) -> dict[str, int]:
    """The attributes that the text talks about (no media, no auxiliary targets)."""
    if modality == "image":
        n = int(rng.integers(1, 3))
        quads = np.sort(rng.choice(4, n, replace=False))
        colours = rng.choice(len(COLOURS), n, replace=False)
        shapes = rng.choice(len(SHAPES_2D), n, replace=False)
        sizes = rng.integers(0, len(SIZES), n)
        a = {"count": n - 1}
        for k in (1, 2):
            i = k - 1
            on = i < n
            a[f"colour_{k}"] = int(colours[i]) if on else -1
            a[f"shape_{k}"] = int(shapes[i]) if on else -1
            a[f"size_{k}"] = int(sizes[i]) if on else -1
            a[f"position_{k}"] = int(quads[i]) if on else -1
        return a
    if modality == "video":
        return {"colour": int(rng.integers(len(COLOURS))), "shape": int(rng.integers(len(SHAPES_2D))),
                "direction": int(rng.integers(len(DIRECTIONS))), "speed": int(rng.integers(len(SPEEDS)))}
    if modality == "audio":
        return {"count": int(rng.integers(len(NUMBERS))), "pitch": int(rng.integers(len(PITCHES))),
                "timbre": int(rng.integers(len(TIMBRES)))}
    if modality == "point":
        return {"shape": int(rng.integers(len(SHAPES_3D))), "colour": int(rng.integers(len(COLOURS))),
                "proportion": int(rng.integers(len(PROPORTIONS)))}
    raise ConfigError(f"unknown modality {modality!r}")


def _image_objects(a: dict[str, int]) -> list[dict[str, str]]:
    return [
        {"size": SIZES[a[f"size_{k}"]], "colour": COLOURS[a[f"colour_{k}"]], "shape": SHAPES_2D[a[f"shape_{k}"]],
         "position": POSITIONS[a[f"position_{k}"]]}
        for k in (1, 2)
        if a[f"colour_{k}"] >= 0
    ]


def _words(modality: str, a: dict[str, int]) -> dict[str, str]:
    if modality == "video":
        return {"colour": COLOURS[a["colour"]], "shape": SHAPES_2D[a["shape"]], "direction": DIRECTIONS[a["direction"]],
                "speed": SPEEDS[a["speed"]], "speed_adverb": SPEED_ADVERBS[a["speed"]]}
    if modality == "audio":
        c = a["count"]
        return {"count": NUMBERS[c], "pitch": PITCHES[a["pitch"]], "timbre": TIMBRES[a["timbre"]],
                "beeps": "beep" if c == 0 else "beeps", "times": TIMES[c]}
    if modality == "point":
        return {"proportion": PROPORTIONS[a["proportion"]], "colour": COLOURS[a["colour"]],
                "shape": SHAPES_3D[a["shape"]]}
    raise ConfigError(f"no word table for {modality!r}")


def caption(modality: str, attributes: dict[str, int], template: int) -> str:
    """The caption of ``attributes`` in template number ``template``."""
    t = TEMPLATES[modality][template]
    if modality == "image":
        sentence, phrase, joiner = t
        objs = _image_objects(attributes)
        n = len(objs)
        return sentence.format(objects=joiner.join(phrase.format(**o) for o in objs),
                               count=NUMBERS[n - 1], shapes="shape" if n == 1 else "shapes")
    return t.format(**_words(modality, attributes))


def all_captions(modality: str, attributes: dict[str, int]) -> list[str]:
    """Every template's rendering (distinct, in template order): the references of a test caption."""
    out: list[str] = []
    for i in range(len(TEMPLATES[modality])):
        c = caption(modality, attributes, i)
        if c not in out:
            out.append(c)
    return out


def _question(modality: str, a: dict[str, int], qtype: str, rng: np.random.Generator,
              version: int = 1) -> tuple[str, str]:
    q = questions(version)[modality][qtype]
    if modality == "image":
        objs = _image_objects(a)
        o = objs[int(rng.integers(len(objs)))]
        answer = {"colour": o["colour"], "shape": o["shape"], "size": o["size"], "position": o["position"],
                  "count": NUMBERS[len(objs) - 1]}[qtype]
        return q.format(shape=o["shape"], colour=o["colour"]), answer
    w = _words(modality, a)
    answer = {"count": w.get("count"), "pitch": w.get("pitch"), "timbre": w.get("timbre"), "colour": w.get("colour"),
              "shape": w.get("shape"), "direction": w.get("direction"), "speed": w.get("speed"),
              "proportion": w.get("proportion")}[qtype]
    return q.format(**w), answer


def _describe_attributes(modality: str, a: dict[str, int]) -> str:
    """The attributes in words, as a text instruction gives them."""
    if modality == "image":
        return " ; ".join(f"{o['size']} {o['colour']} {o['shape']} , {o['position']}" for o in _image_objects(a))
    w = _words(modality, a)
    if modality == "video":
        return f"{w['colour']} {w['shape']} , {w['direction']} , {w['speed']}"
    if modality == "audio":
        return f"{w['count']} , {w['pitch']} , {w['timbre']}"
    return f"{w['proportion']} {w['colour']} {w['shape']}"


# ------------------------------------------------------------------------------ rendering


def _coverage(shape: str, cx: float, cy: float, r: float, size: int, ss: int = 3) -> np.ndarray:
    """Anti-aliased coverage [size, size] in [0, 1] of a shape (ss x ss sub-samples per pixel)."""
    lo_x, hi_x = max(0, int(cx - r - 1)), min(size, int(cx + r + 2))
    lo_y, hi_y = max(0, int(cy - r - 1)), min(size, int(cy + r + 2))
    out = np.zeros((size, size))
    if lo_x >= hi_x or lo_y >= hi_y:
        return out
    xs = lo_x + (np.arange((hi_x - lo_x) * ss) + 0.5) / ss
    ys = lo_y + (np.arange((hi_y - lo_y) * ss) + 0.5) / ss
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        h = 0.85 * r
        inside = (adx <= h) & (ady <= h)
    elif shape == "triangle":  # apex up, base at 0.75 r below the centre
        inside = (dy <= 0.75 * r) & (adx <= (dy + r) / 1.75)
    elif shape == "cross":
        w = 0.38 * r
        inside = ((adx <= w) & (ady <= r)) | ((ady <= w) & (adx <= r))
    else:
        raise ValueError(shape)
    cov = inside.reshape(hi_y - lo_y, ss, hi_x - lo_x, ss).mean(axis=(1, 3))
    out[lo_y:hi_y, lo_x:hi_x] = cov
    return out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    level = rng.uniform(0.05, 0.35) + rng.uniform(-0.04, 0.04, 3)
    g = rng.uniform(-0.08, 0.08, 2)  # a gentle linear gradient
    t = np.linspace(-1.0, 1.0, size)
    grad = g[0] * t[None, :] + g[1] * t[:, None]
    return np.clip(level[None, None, :] + grad[:, :, None], 0.0, 1.0)


def _colour(rng: np.random.Generator, c: int, jitter: float) -> np.ndarray:
    return np.clip(_COLOUR_RGB[c] + rng.uniform(-jitter, jitter, 3), 0.0, 1.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render_image(a: dict[str, int], rng: np.random.Generator, cfg: ToyWorldConfig) -> tuple[np.ndarray, dict]:
    S = cfg.image_size
    s = S / 32.0
    img = _background(rng, S)
    placed: list[tuple[float, float, float]] = []
    aux: dict[str, int] = {}
    for k in (1, 2):
        if a[f"colour_{k}"] < 0:
            aux[f"x_{k}"] = aux[f"y_{k}"] = -1
            continue
        big = a[f"size_{k}"] == 1
        r = (rng.uniform(3.8, 6.0) if big else rng.uniform(2.5, 3.8)) * s
        q = a[f"position_{k}"]
        row, col = divmod(q, 2)
        for _ in range(100):  # rejection: keep the two shapes apart
            cx = rng.uniform(r + 0.5, S / 2) if col == 0 else rng.uniform(S / 2, S - r - 0.5)
            cy = rng.uniform(r + 0.5, S / 2) if row == 0 else rng.uniform(S / 2, S - r - 0.5)
            if all((cx - px) ** 2 + (cy - py) ** 2 >= (r + pr + 1.5 * s) ** 2 for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        cov = _coverage(SHAPES_2D[a[f"shape_{k}"]], cx, cy, r, S)[:, :, None]
        img = img * (1 - cov) + _colour(rng, a[f"colour_{k}"], cfg.colour_jitter)[None, None, :] * cov
        aux[f"x_{k}"] = min(_XY_BINS - 1, int(cx / S * _XY_BINS))
        aux[f"y_{k}"] = min(_XY_BINS - 1, int(cy / S * _XY_BINS))
    img = img + rng.normal(0.0, cfg.image_noise, img.shape)
    return _to_uint8(img), aux


_DIR_VEC = {0: (-1.0, 0.0), 1: (1.0, 0.0), 2: (0.0, -1.0), 3: (0.0, 1.0)}  # left, right, up, down (y grows down)


def _render_video(a: dict[str, int], rng: np.random.Generator, cfg: ToyWorldConfig) -> tuple[np.ndarray, dict]:
    S, F = cfg.image_size, cfg.video_frames
    s = S / 32.0
    r = rng.uniform(3.0, 5.0) * s
    v = (rng.uniform(2.2, 4.0) if a["speed"] == 1 else rng.uniform(0.8, 2.2)) * s * 3.0 / (F - 1)  # px per frame
    ux, uy = _DIR_VEC[a["direction"]]
    travel = v * (F - 1)
    lo, hi = r + 0.5, S - r - 0.5

    def start(u):
        if u > 0:
            return rng.uniform(lo, hi - travel)
        if u < 0:
            return rng.uniform(lo + travel, hi)
        return rng.uniform(lo, hi)

    x0, y0 = start(ux), start(uy)
    bg = _background(rng, S)
    col = _colour(rng, a["colour"], cfg.colour_jitter)
    shape = SHAPES_2D[a["shape"]]
    frames = []
    for f in range(F):
        wob = rng.normal(0.0, 0.25 * s, 2)  # a little wobble off the straight line
        cx, cy = x0 + ux * v * f + wob[0], y0 + uy * v * f + wob[1]
        cov = _coverage(shape, cx, cy, r, S)[:, :, None]
        fr = bg * (1 - cov) + col[None, None, :] * cov
        frames.append(_to_uint8(fr + rng.normal(0.0, cfg.video_noise, fr.shape)))
    return np.stack(frames), {}


_PITCH_HZ = ((180.0, 400.0), (400.0, 900.0), (900.0, 2000.0))


def _tone(timbre: str, f0: float, n: int, rate: int) -> np.ndarray:
    t = np.arange(n) / rate
    nyq = rate / 2
    if timbre == "whistle":  # pure tone
        y = np.sin(2 * np.pi * f0 * t)
        env = np.ones(n)
    elif timbre == "buzz":  # band-limited square wave with a rough 50 Hz amplitude modulation
        ks = np.arange(1, int(nyq / f0) + 1, 2)
        y = (np.sin(2 * np.pi * f0 * ks[:, None] * t[None, :]) / ks[:, None]).sum(0)
        env = 0.6 + 0.4 * np.sin(2 * np.pi * 50.0 * t)
    elif timbre == "horn":  # band-limited sawtooth with a slow attack
        ks = np.arange(1, int(nyq / f0) + 1)
        y = (np.sin(2 * np.pi * f0 * ks[:, None] * t[None, :]) / ks[:, None]).sum(0)
        env = np.minimum(1.0, t / 0.03)
    elif timbre == "bell":  # inharmonic partials, fast exponential decay
        ratios, amps = np.array([1.0, 2.0, 2.76, 5.4]), np.array([1.0, 0.5, 0.6, 0.25])
        keep = ratios * f0 < nyq
        y = (amps[keep, None] * np.sin(2 * np.pi * f0 * ratios[keep, None] * t[None, :])).sum(0)
        env = np.exp(-t / 0.045)
    else:
        raise ValueError(timbre)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.004)  # no clicks
    y = y * env * fade
    return y / (np.abs(y).max() + 1e-9)


def _render_audio(a: dict[str, int], rng: np.random.Generator, cfg: ToyWorldConfig) -> tuple[AudioClip, dict]:
    rate = cfg.audio_rate
    total = int(round(rate * cfg.audio_seconds))
    n = a["count"] + 1
    lo, hi = _PITCH_HZ[a["pitch"]]
    f0 = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    durs = rng.uniform(0.08, 0.16, n) * cfg.audio_seconds
    gap0 = 0.05 * cfg.audio_seconds
    free = cfg.audio_seconds - durs.sum() - (n - 1) * gap0 - 0.02
    parts = rng.dirichlet(np.ones(n + 1)) * free
    x = np.zeros(total)
    t = 0.01 + parts[0]
    for i in range(n):
        start = int(round(t * rate))
        length = int(round(durs[i] * rate))
        f = f0 * (1.0 + rng.normal(0.0, 0.01))
        beep = _tone(TIMBRES[a["timbre"]], f, length, rate) * rng.uniform(0.35, 0.7)
        end = min(total, start + length)
        x[start:end] += beep[: end - start]
        t += durs[i] + gap0 + parts[i + 1]
    x = x + rng.normal(0.0, cfg.audio_noise, total)
    q = np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0  # exactly what a 16-bit WAV holds
    return AudioClip(q.astype(np.float32), rate), {}


def _surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points spread uniformly over the surface of a unit shape in [-1, 1]^3."""
    if shape == "sphere":
        v = rng.normal(size=(n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    if shape == "cube":
        face = rng.integers(0, 6, n)
        p = rng.uniform(-1.0, 1.0, (n, 3))
        axis, sign = face // 2, np.where(face % 2 == 0, -1.0, 1.0)
        p[np.arange(n), axis] = sign
        return p
    if shape == "cylinder":
        side = rng.random(n) < 2.0 / 3.0  # side area 4 pi, caps 2 pi
        th = rng.uniform(0, 2 * np.pi, n)
        rad = np.where(side, 1.0, np.sqrt(rng.random(n)))
        z = np.where(side, rng.uniform(-1.0, 1.0, n), np.where(rng.random(n) < 0.5, -1.0, 1.0))
        return np.stack([rad * np.cos(th), rad * np.sin(th), z], 1)
    if shape == "cone":  # apex at z = 1, base disc at z = -1
        lat = rng.random(n) < np.sqrt(5) / (1 + np.sqrt(5))
        th = rng.uniform(0, 2 * np.pi, n)
        rho = np.sqrt(rng.random(n))
        z = np.where(lat, 1.0 - 2.0 * rho, -1.0)
        return np.stack([rho * np.cos(th), rho * np.sin(th), z], 1)
    if shape == "pyramid":  # square base at z = -1, apex at (0, 0, 1)
        base_area, side_area = 4.0, np.sqrt(5)
        probs = np.array([base_area] + [side_area] * 4)
        face = rng.choice(5, n, p=probs / probs.sum())
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
        p = np.empty((n, 3))
        b = face == 0
        p[b] = np.column_stack([rng.uniform(-1, 1, (b.sum(), 2)), -np.ones(b.sum())])
        apex = np.array([0.0, 0.0, 1.0])
        for f in range(1, 5):
            m = face == f
            k = int(m.sum())
            if not k:
                continue
            c1 = np.append(corners[f - 1], -1.0)
            c2 = np.append(corners[f % 4], -1.0)
            su, v = np.sqrt(rng.random(k))[:, None], rng.random(k)[:, None]
            p[m] = (1 - su) * apex + su * (1 - v) * c1 + su * v * c2
        return p
    raise ValueError(shape)


_PROPORTION_RATIO = ((1.5, 2.6), (0.72, 1.5), (0.38, 0.72))  # height / width: tall, regular, flat


def _render_point(a: dict[str, int], rng: np.random.Generator, cfg: ToyWorldConfig) -> tuple[np.ndarray, dict]:
    n = cfg.n_points
    p = _surface(SHAPES_3D[a["shape"]], n, rng)
    lo, hi = _PROPORTION_RATIO[a["proportion"]]
    ratio = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    p = p * np.array([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), ratio])
    yaw = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(yaw), np.sin(yaw)
    p = p @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
    p = p - p.mean(0)
    p = p / np.linalg.norm(p, axis=1).max()  # into the unit sphere, as Point-BERT / PointLLM expect
    p = p + rng.normal(0.0, cfg.point_noise, p.shape)
    rgb = _colour(rng, a["colour"], cfg.colour_jitter)[None, :] + rng.normal(0.0, 0.04, (n, 3))
    k = int(round(cfg.point_outliers * n))
    if k:
        idx = rng.choice(n, k, replace=False)
        v = rng.normal(size=(k, 3))
        p[idx] = v / np.linalg.norm(v, axis=1, keepdims=True) * rng.random((k, 1)) ** (1 / 3)  # inside the ball
        rgb[idx] = rng.uniform(0.0, 1.0, (k, 3))
    perm = rng.permutation(n)
    out = np.concatenate([p, np.clip(rgb, 0.0, 1.0)], 1)[perm]
    return out.astype(np.float32), {}


_RENDER = {"image": _render_image, "video": _render_video, "audio": _render_audio, "point": _render_point}


def draw(modality: str, rng: np.random.Generator, cfg: ToyWorldConfig | None = None):
    """One random scene: ``(media, attributes)`` with every key of :func:`attribute_heads` (no text)."""
    cfg = cfg or ToyWorldConfig()
    a = _sample_semantics(modality, rng)
    media, aux = _RENDER[modality](a, rng, cfg)
    a.update(aux)
    return media, a


# ------------------------------------------------------------------------------ data sets

# the random stream of a set; never renumber (train and test must stay what they always were)
_STREAM = {"caption": 1, "qa": 2, "train": 1, "test": 2, "val": 3}


def generate(modality: str, task: str, split: str, n: int, seed: int = 0,
             cfg: ToyWorldConfig | None = None) -> list[ToySample]:
    """``n`` samples of one set, in memory. ``cfg`` gives sizes and noise (its seed and counts are unused).

    ``split`` is ``train``, ``test`` or ``val``; each (modality, task, split) has its own random
    stream. Deterministic in (modality, task, split, seed, cfg); the first k samples do not
    depend on ``n``.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
    if task not in TASKS or split not in SPLITS:
        raise ConfigError(f"task must be one of {list(TASKS)} and split one of {list(SPLITS)}; got {task!r}, {split!r}")
    cfg = cfg or ToyWorldConfig()
    rng = np.random.default_rng([int(seed), MODALITIES.index(modality) + 1, _STREAM[task], _STREAM[split], 17])
    qtypes = list(questions(cfg.version)[modality])
    out = []
    for i in range(n):
        media, a = draw(modality, rng, cfg)
        if task == "caption":
            answer = caption(modality, a, int(rng.integers(len(TEMPLATES[modality]))))
            prompt = caption_prompts(cfg.version)[modality]
            refs = all_captions(modality, a) if split in EVAL_SPLITS else [answer]
        else:
            question, answer = _question(modality, a, qtypes[int(rng.integers(len(qtypes)))], rng, cfg.version)
            prompt = f"{PLACEHOLDERS[modality]}\n{question}"
            refs = [answer]
        out.append(ToySample(f"{modality}_{task}_{split}_{i:05d}", modality, task, media, prompt, answer, refs, a))
    return out


def text_instructions(n: int, seed: int = 0, version: int = 1) -> list[tuple[str, str]]:
    """``n`` text-only (prompt, answer) pairs in the toy language, for pre-training the tiny LM.

    Every world ``version`` pre-trains on the same pairs (toy-world-1's instruction formats):
    toy-world-2's shared prompts and question formats are never among them.

    Half are "describe" instructions, for every modality's attribute set::

        "describe the image : big red circle , top left"  ->  "there is a big red circle in the top left ."
        "describe the sound : three , high , bell"          ->  "three high bell beeps ."

    half are colour / shape questions about an object given in words (image, video, point)::

        "a tall red cone . what colour is the object ?"  ->  "red"

    The modality-specific question types (position, size, count, direction, speed, pitch,
    timbre, proportions) never appear: each modality's stage has to teach them to the LLM.
    """
    rng = np.random.default_rng([int(seed), 97, 5])
    out: list[tuple[str, str]] = []
    qa_modalities = [m for m in MODALITIES if any(q in QUESTIONS[m] for q in TEXT_QUESTION_TYPES)]
    for _ in range(n):
        if rng.random() < 0.5:
            m = MODALITIES[int(rng.integers(len(MODALITIES)))]
            a = _sample_semantics(m, rng)
            prompt = f"describe the {NOUNS[m]} : {_describe_attributes(m, a)}"
            answer = caption(m, a, int(rng.integers(len(TEMPLATES[m]))))
        else:
            m = qa_modalities[int(rng.integers(len(qa_modalities)))]
            a = _sample_semantics(m, rng)
            scene = caption(m, a, int(rng.integers(len(TEMPLATES[m]))))
            qtype = TEXT_QUESTION_TYPES[int(rng.integers(len(TEXT_QUESTION_TYPES)))]
            question, answer = _question(m, a, qtype, rng)
            prompt = f"{scene} {question}"
        out.append((prompt, answer))
    return out


def vocabulary(version: int = 1) -> list[str]:
    """Every word that any prompt, answer, reference or text instruction of world ``version`` can
    contain (sorted; version 2's is version 1's plus the words of its prompts)."""
    texts: list[str] = list(CAPTION_PROMPTS.values())
    texts += [q for qs in QUESTIONS.values() for q in qs.values()]
    if version >= 2:
        texts += list(CAPTION_PROMPTS_V2.values())
        texts += [q for qs in QUESTIONS_V2.values() for q in qs.values()]
    for ts in TEMPLATES.values():
        for t in ts:
            texts += list(t) if isinstance(t, tuple) else [t]
    texts += [f"describe the {w} : , ;" for w in NOUNS.values()]  # text instructions
    texts += list(COLOURS + SHAPES_2D + SIZES + POSITIONS + NUMBERS + TIMES + DIRECTIONS + SPEEDS + SPEED_ADVERBS
                  + PITCHES + TIMBRES + SHAPES_3D + PROPORTIONS)
    texts += ["shape shapes beep beeps"]
    words = set()
    placeholders = set(PLACEHOLDERS.values())
    for t in texts:
        for w in t.split():
            if w in placeholders or (w.startswith("{") and w.endswith("}")):
                continue
            words.add(w)
    return sorted(words)


# ------------------------------------------------------------------------------ on disk

_SUFFIX = {"image": ".png", "audio": ".wav", "point": ".npy"}


def _media_paths(modality: str, folder: Path, i: int, frames: int):
    if modality == "video":
        return [str(folder / f"{i:05d}_f{k}.png") for k in range(frames)]
    return str(folder / f"{i:05d}{_SUFFIX[modality]}")


def world_paths(out_dir: str | os.PathLike) -> dict[str, dict[str, dict[str, str]]]:
    """Where :func:`write_world` puts each set: ``paths[modality][task][split]``."""
    out = Path(out_dir).absolute()
    return {m: {t: {s: str(out / m / f"{t}_{s}.json") for s in SPLITS} for t in TASKS} for m in MODALITIES}


def write_world(out_dir: str | os.PathLike, cfg: ToyWorldConfig | None = None,
                progress: bool = False) -> dict[str, dict[str, dict[str, str]]]:
    """Write the whole world under ``out_dir``; returns ``paths[modality][task][split]`` (absolute).

    Layout: ``<modality>/<task>_<split>.json`` (split: train, test, val) and
    ``<modality>/media/<task>_<split>/<index>.<ext>`` (video: ``<index>_f<k>.png`` per frame),
    then ``manifest.json`` last. Nothing is rewritten when a manifest with the same config hash
    exists and every set file is there.
    """
    cfg = cfg or ToyWorldConfig()
    out = Path(out_dir).absolute()
    paths = world_paths(out)
    h = config_hash(cfg)
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not (isinstance(old, dict) and str(old.get("world_version", "")).startswith("toy-world")):
            raise DataError(f"{manifest}: exists but is not a toy world's manifest; "
                            "choose an empty folder for the toy world")
        if (old.get("config_hash") == h
                and all(os.path.isfile(p) for t in paths.values() for s in t.values() for p in s.values())):
            return paths
        manifest.unlink()  # from here on the folder holds no complete world
        for m in MODALITIES:  # media of the previous world: remove stale files
            shutil.rmtree(out / m / "media", ignore_errors=True)
    counts = {}
    todo = [(m, t, s) for m in MODALITIES for t in TASKS for s in SPLITS]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="toy world", leave=False)
    for m, t, s in todo:
        n = getattr(cfg, f"n_{s}_{t}")
        folder = out / m / "media" / f"{t}_{s}"
        samples = []
        for i, ts in enumerate(generate(m, t, s, n, cfg.seed, cfg)):
            mp = _media_paths(m, folder, i, cfg.video_frames)
            write_media(m, mp, ts.media)
            samples.append(Sample(ts.id, m, t, mp, ts.prompt, ts.answer, ts.references))
        write_dataset(paths[m][t][s], samples)
        counts[f"{m}/{t}_{s}"] = n
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    write_json(manifest, {
        "world_version": cfg.world_version,
        "config_hash": h,
        "config": cfg.model_dump(),
        "counts": counts,
        "sets": {m: {t: {s: os.path.relpath(p, out) for s, p in ss.items()} for t, ss in ts.items()}
                 for m, ts in paths.items()},
    })
    return paths
