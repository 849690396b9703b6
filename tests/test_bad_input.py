"""A catalogue of bad input. House rule: each kind gives ONE readable line naming the file, field
or row and what was expected, a non-zero exit (2 for a MeraError), no traceback, and leaves an
existing run directory byte-identical.

Most cases go through the real CLI entry point in this process (``mera.cli.main``: the same
argument parsing and error handling as ``python -m mera``, without 4 s of interpreter and torch
start-up per case); three run ``python -m mera`` in a subprocess (a missing config, the
unreachable judge whose key must not leak, a corrupt PNG). Against a run directory, one tiny real
run (order image -> point, fine-tuning, 1 epoch) is made once for the module and copied per test.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mera.cli import main as cli_main

pytestmark = pytest.mark.slow

STAGE2 = "seq/ft/stage_2_point"
STAGE1 = "seq/ft/stage_1_image"
EXPERT = "experts/image"


# ----------------------------------------------------------------------------------- helpers


@dataclass
class Result:
    rc: int
    out: str
    err: str


def cli(*args) -> Result:
    """``mera ARGS`` in this process; a non-MeraError escaping main() is what would print a traceback."""
    from transformers.utils import logging as hf_logging

    # `python -m mera` turns the weight-loading bars off before transformers is imported; here
    # transformers may already be imported (by a fixture or another test module), so do it now
    hf_logging.disable_progress_bar()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"mera {' '.join(map(str, args))}: uncaught {type(e).__name__}: {e} (a traceback for the user)")
    return Result(rc, out.getvalue(), err.getvalue())


def cli_subprocess(*args, env=None) -> Result:
    r = subprocess.run([sys.executable, "-m", "mera", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=120)
    return Result(r.returncode, r.stdout, r.stderr)


def one_line_error(r: Result, *needles: str) -> str:
    """Exit 2, no traceback, stderr exactly one line ``error: ...`` holding every needle."""
    assert "Traceback" not in r.err + r.out
    lines = r.err.strip().splitlines()
    assert r.rc == 2, (r.rc, r.err)
    assert len(lines) == 1, r.err
    line = lines[0]
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (but the lock files: who held a unit)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".locks" not in p.relative_to(folder).parts}


def without(t: dict[str, str], prefix: str) -> dict[str, str]:
    return {k: v for k, v in t.items() if not k.startswith(prefix)}


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """MERA_HOME in a temporary folder for the whole module (judge cache, toy data)."""
    mp = pytest.MonkeyPatch()
    h = tmp_path_factory.mktemp("home")
    mp.setenv("MERA_HOME", str(h))
    yield h
    mp.undo()


@pytest.fixture(scope="module")
def assets(home, tmp_path_factory):
    """The tiny assets of tests/micro.py (a 2-step Llama, random toy encoders, a small toy world)."""
    from micro import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("assets"))


def base_config(assets: Path, world: Path | None = None) -> dict:
    from micro import tiny_config

    return tiny_config(assets, "bad-input", world)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """(config path, run directory) of one finished tiny run, made through the CLI."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_config(tmp / "run.yaml", base_config(assets))
    out = tmp / "out"
    r = cli("run", cfg, "--out", out, "--quiet")
    assert r.rc == 0, r.err
    assert (out / STAGE2 / "DONE").is_file() and (out / EXPERT / "DONE").is_file()
    return cfg, out


@pytest.fixture
def resumable(run, tmp_path):
    """A copy of the run whose last stage is unfinished (no DONE): --resume has work to do."""
    cfg, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / STAGE2 / "DONE").unlink()
    return cfg, copy


def resume(cfg: Path, out: Path, *overrides) -> Result:
    return cli("run", cfg, "--out", out, "--resume", "--quiet", *overrides)


# ----------------------------------------------------------------------------------- the config


def test_missing_config_file(tmp_path):
    r = cli_subprocess("run", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    one_line_error(r, str(tmp_path / "nope.yaml"), "config file not found")
    assert not (tmp_path / "out").exists()


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nmodel: [unclosed\nmethods: []\n")
    one_line_error(cli("run", cfg, "--out", tmp_path / "out"), str(cfg), "invalid YAML", "line ")
    assert not (tmp_path / "out").exists()


def test_yaml_that_is_not_a_mapping(tmp_path):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- image\n- point\n")
    one_line_error(cli("run", cfg), str(cfg), "top level must be a mapping", "got list")


def test_a_duplicate_key_in_the_file(assets, tmp_path):
    cfg = tmp_path / "c.yaml"
    write_config(cfg, base_config(assets))
    cfg.write_text(cfg.read_text() + "seed: 3\nseed: 4\n")
    one_line_error(cli("run", cfg, "--out", tmp_path / "out"), str(cfg), "duplicate key 'seed'", "lines ")
    assert not (tmp_path / "out").exists()


def test_misspelled_key_in_the_file(assets, tmp_path):
    c = base_config(assets)
    c["train"]["instrcut"] = c["train"].pop("instruct")
    cfg = write_config(tmp_path / "c.yaml", c)
    one_line_error(cli("run", cfg, "--out", tmp_path / "out"), str(cfg), "train.instrcut: unknown key",
                   "did you mean 'instruct'?", "known keys: align, instruct, realign")
    assert not (tmp_path / "out").exists()


# (overrides, what the one line must say): each is refused before anything is read or written
BAD_OVERRIDES = {
    "misspelled key": (["train.instrcut.epochs=1"], ["train.instrcut: unknown key", "did you mean 'instruct'?"]),
    "unknown top-level key": (["trian.seed=1"], ["trian: unknown key", "known keys: name, seed"]),
    "wrong type (number)": (["train.instruct.epochs=abc"], ["train.instruct.epochs", "valid number", "'abc'"]),
    "wrong type (section)": (["train.lora=5"], ["train.lora", "LoraSettings", "got 5"]),
    "unknown dtype": (["model.dtype=float8"], ["model.dtype", "'float32', 'bfloat16' or 'float16'", "'float8'"]),
    "unknown modality (branch)": (["model.branches.imgae={encoder: {family: toy_image}}"],
                                  ["model.branches", "unknown modality 'imgae'", "image, video, audio, point"]),
    "unknown modality (order)": (["orders.seq=[image, imgae]"],
                                 ["orders.seq", "modality 'imgae' has no entry in model.branches"]),
    "order names a modality without a branch": (["orders.seq=[image, audio]"],
                                                ["orders.seq", "modality 'audio' has no entry in model.branches"]),
    "order names a modality without data": (["model.branches.audio={encoder: {family: toy_audio}}",
                                             "orders.seq=[image, audio]"],
                                            ["data.sets", "no data for modality 'audio'"]),
    "empty order": (["orders.seq=[]"], ["orders.seq", "non-empty list of distinct modalities"]),
    "unknown strategy": (["methods.0.strategies=[finetun]"],
                         ["methods.0.strategies", "unknown strategy 'finetun'", "did you mean 'finetune'", "known: cma, "]),
    "replay_ratio 0": (["methods.0.replay_ratio=0"], ["methods.0.replay_ratio", "must be in (0, 1]", "got 0"]),
    "replay_ratio > 1": (["methods.0.replay_ratio=1.5"], ["methods.0.replay_ratio", "(0, 1]", "got 1.5"]),
    "realign_ratio < 0": (["methods.0.realign_ratio=-0.1"], ["methods.0.realign_ratio", "(0, 1]", "got -0.1"]),
    "fisher_ratio > 1": (["methods.0.fisher_ratio=2"], ["methods.0.fisher_ratio", "(0, 1]", "got 2"]),
    "reserved method name": (["methods.0.name=expert"], ["methods", "'expert' is reserved"]),
    "batch size 0": (["train.align.batch_size=0"], ["train.align", "batch sizes must be >= 1, got batch_size 0"]),
    "max_test 0": (["data.max_test=0"], ["data.max_test", "greater than or equal to 1", "got 0"]),
    "unknown zoo path": (["model.llm=zoo:nope"], ["model.llm", "unknown zoo path 'zoo:nope'", "zoo:llm"]),
    "unknown zoo encoder": (["model.branches.image.encoder.path=zoo:encoders/imgae"],
                            ["model.branches.image.encoder.path", "'zoo:encoders/imgae'", "zoo:encoders/<modality>"]),
    "override that is not key=value": (["nokeyvalue"], ["override 'nokeyvalue'", "expected key=value"]),
    "override with an empty key": (["=3"], ["override '=3'", "empty key"]),
    "two merge rules in a method": (["methods.0.strategies=[finetune, merge]"],
                                    ["methods.0", "finetune and cma are both merge rules"]),
    "a plug-in parameter out of its range": (["methods.0.strategies=[{name: realign, ratio: 2}]"],
                                             ["methods.0", "realign", "ratio", "less than or equal to 1"]),
    "method names that share a folder": (["methods=[{name: MERA 10%}, {name: MERA (10%)}]"],
                                         ["methods", "would share the folder 'mera-10'"]),
    "an order name that is a path": (["orders={../escape: [image]}"],
                                     ["orders", "'../escape' cannot name a folder of the run directory"]),
    "negative epochs": (["train.instruct.epochs=-1"], ["train.instruct.epochs", "greater than 0", "got -1"]),
    "negative learning rate": (["train.align.lr_connector=-0.001"], ["train.align.lr_connector", "greater than 0"]),
    "lora rank 0": (["train.lora.r=0"], ["train.lora.r", "greater than or equal to 1", "got 0"]),
    "threads -1": (["threads=-1"], ["threads", "greater than or equal to 1", "got -1"]),
    "huge max_new_tokens": (["eval.max_new_tokens=1000000"], ["eval.max_new_tokens", "less than or equal to 4096"]),
}


@pytest.mark.parametrize("kind", list(BAD_OVERRIDES))
def test_bad_config_leaves_the_run_directory_alone(run, home, kind):
    cfg, out = run
    overrides, needles = BAD_OVERRIDES[kind]
    before, home_before = tree(out), sorted(p.name for p in home.iterdir())
    # overrides before the options (argparse keeps them as positionals)
    r = cli("run", cfg, *overrides, "--out", out, "--resume", "--quiet")
    line = one_line_error(r, *needles)
    if "override" not in kind:
        assert str(cfg) in line  # the config file is named
    assert tree(out) == before
    assert sorted(p.name for p in home.iterdir()) == home_before  # e.g. zoo:nope built no toy zoo


def test_changed_config_on_resume(run):
    cfg, out = run
    before = tree(out)
    one_line_error(resume(cfg, out, "eval.max_new_tokens=5", "train.lora.r=3"), str(out / "config.yaml"),
                   "the resumed config differs from the run's in: eval.max_new_tokens, train.lora.r")
    assert tree(out) == before


def test_existing_run_directory_without_resume(run):
    cfg, out = run
    before = tree(out)
    one_line_error(cli("run", cfg, "--out", out, "--quiet"), str(out), "a run directory is already there",
                   "--resume")
    assert tree(out) == before


def test_workers_zero(run):
    cfg, out = run
    before = tree(out)
    one_line_error(resume(cfg, out, "--workers", "0"), "--workers must be >= 1, got 0")
    assert tree(out) == before


def test_a_deepspeed_launch_is_refused_before_anything_is_written(run, monkeypatch):
    cfg, out = run
    before = tree(out)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a deepspeed config
    one_line_error(resume(cfg, out), "DeepSpeed", "is not supported", "fsdp.yaml")
    assert tree(out) == before
    one_line_error(cli("run", cfg, "--out", out.parent / "fresh", "--quiet"), "DeepSpeed")
    assert not (out.parent / "fresh").exists()


def test_workers_not_an_integer(run):
    cfg, out = run
    before = tree(out)
    r = resume(cfg, out, "--workers", "two")
    # argparse's own check: usage, then one error line (exit 2, no traceback)
    assert r.rc == 2 and "Traceback" not in r.err
    assert r.err.strip().splitlines()[-1] == "mera run: error: argument --workers: invalid int value: 'two'"
    assert tree(out) == before


def test_override_after_the_options_that_is_not_key_value(run):
    cfg, out = run
    before = tree(out)
    one_line_error(resume(cfg, out, "nokeyvalue"), "override 'nokeyvalue'", "expected key=value")
    assert tree(out) == before


def test_unknown_judge(run, tmp_path):
    cfg, _ = run
    out = tmp_path / "out"
    one_line_error(cli("run", cfg, "--out", out, "--quiet", "eval.judge=gpt4"),
                   "unknown judge 'gpt4'", "known judges: exact_match, local_llm, openai")
    assert not out.exists()


def test_unknown_encoder_family(run, tmp_path):
    cfg, _ = run
    out = tmp_path / "out"
    one_line_error(cli("run", cfg, "--out", out, "--quiet", "model.branches.image.encoder.family=toy_imgae"),
                   "unknown encoder family 'toy_imgae'", "toy_image")
    assert not out.exists()


# ----------------------------------------------------------------------------------- data sets


@pytest.fixture
def image_set(assets, tmp_path):
    """A private copy of the image sets and a config that reads them: (folder, config path, out)."""
    folder = tmp_path / "image"
    shutil.copytree(assets / "world" / "image", folder)
    c = base_config(assets)
    for k in ("caption_train", "caption_test", "qa_train", "qa_test"):
        c["data"]["sets"]["image"][k] = str(folder / f"{k}.json")
    return folder, write_config(tmp_path / "c.yaml", c), tmp_path / "out"


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


def _prompt(data, i, fn):
    data[i]["conversations"][0]["value"] = fn(data[i]["conversations"][0]["value"])
    return data


DATA_CASES = {
    "not a list": ("caption_train.json", lambda d: {"samples": d}, ["expected a JSON list of samples", "got a JSON dict"]),
    "sample without placeholder": ("qa_train.json", lambda d: _prompt(d, 3, lambda v: v.replace("<image>", "")),
                                   ["sample 3 (id 'image_qa_train_00003')", "exactly one '<image>', found 0"]),
    "sample with two placeholders": ("qa_train.json", lambda d: _prompt(d, 2, lambda v: v + " <image>"),
                                     ["sample 2 (id 'image_qa_train_00002')", "exactly one '<image>', found 2"]),
    "another modality's placeholder": ("qa_test.json", lambda d: _prompt(d, 1, lambda v: v + " <audio>"),
                                       ["sample 1", "the human turn of an image sample must not contain ['<audio>']"]),
    "missing field": ("caption_test.json", lambda d: [{k: v for k, v in d[0].items() if k != "task"}] + d[1:],
                      ["sample 0", "missing field(s) ['task']"]),
    "unknown sample modality": ("caption_test.json", lambda d: [{**d[0], "modality": "imgae"}] + d[1:],
                                ["sample 0", "'modality' must be one of ['image', 'video', 'audio', 'point']",
                                 "'imgae'"]),
    "empty training set": ("caption_train.json", lambda d: [], ["the image caption train set is empty",
                                                                "at least one sample"]),
    "empty test set": ("qa_test.json", lambda d: [], ["the image qa test set is empty"]),
}


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_dataset_file(image_set, kind):
    folder, cfg, out = image_set
    name, fn, needles = DATA_CASES[kind]
    _edit(folder / name, fn)
    one_line_error(cli("run", cfg, "--out", out, "--quiet"), str(folder / name), *needles)
    assert not out.exists()  # data sets are read before the run directory is made


def test_dataset_that_is_not_json(image_set):
    folder, cfg, out = image_set
    (folder / "qa_train.json").write_text('[{"id": "x",]')
    one_line_error(cli("run", cfg, "--out", out, "--quiet"), str(folder / "qa_train.json"), "not valid JSON",
                   "line 1, column")
    assert not out.exists()


def test_missing_media_file(image_set):
    folder, cfg, out = image_set
    media = folder / json.loads((folder / "caption_train.json").read_text())[1]["media"]
    media.unlink()
    one_line_error(cli("run", cfg, "--out", out, "--quiet"), str(folder / "caption_train.json"),
                   "sample 1 (id 'image_caption_train_00001')", f"media file not found: {media}")
    assert not out.exists()


def test_corrupt_png_stops_the_run(image_set):
    """Media are decoded when the features are computed (in training): the message names the file;
    the unfinished expert is not marked done. A real ``python -m mera`` process."""
    folder, cfg, out = image_set
    png = folder / json.loads((folder / "caption_train.json").read_text())[1]["media"]
    png.write_bytes(png.read_bytes()[:60])
    r = cli_subprocess("run", cfg, "--out", out, "--quiet")
    one_line_error(r, str(png), "cannot decode image", "truncated")
    assert not list(out.rglob("DONE"))


def _png_claiming(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its header (IHDR) claiming ``width`` x ``height``: a decompression bomb's first bytes."""
    import struct
    import zlib

    ihdr = bytearray(png[12:29])  # type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + png[33:]


def _media_cases(tmp: Path, assets: Path) -> dict:
    from mera.data.media import write_audio, write_points
    from mera.data.video import write_video_file

    png = sorted((assets / "world/image/media/caption_train").glob("*.png"))[0].read_bytes()
    write_audio(tmp / "ok.wav", (np.zeros(4000), 8000))
    wav = (tmp / "ok.wav").read_bytes()
    write_points(tmp / "ok.npy", np.zeros((64, 6), np.float32))
    npy = (tmp / "ok.npy").read_bytes()
    write_video_file(tmp / "ok.mp4", np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8), fps=8)
    mp4 = (tmp / "ok.mp4").read_bytes()
    np.save(tmp / "shape.npy", np.zeros((10, 3), np.float32))
    np.save(tmp / "nan.npy", np.full((8, 6), np.nan, np.float32))
    return {  # name: (modality, bytes or None = already written, what the message must say)
        "bomb.png": ("image", _png_claiming(png, 40000, 40000), "40000 x 40000 = 1,600,000,000 pixels, more than mera decodes"),
        "truncated.png": ("image", png[:60], "cannot decode image"),
        "text.png": ("image", b"not an image", "cannot decode image"),
        "truncated.wav": ("audio", wav[: len(wav) // 2], "truncated WAV: header says 4000 frames"),
        "garbage.wav": ("audio", os.urandom(64), "cannot read WAV"),
        "garbage.npy": ("point", os.urandom(64), "not a NumPy .npy/.npz file (expected a float array of shape (N, 6))"),
        "truncated.npy": ("point", npy[: len(npy) // 2], "cannot read point cloud"),
        "shape.npy": ("point", None, "point cloud has shape (10, 3), expected (N, 6)"),
        "nan.npy": ("point", None, "NaN or infinite"),
        "garbage.mp4": ("video", os.urandom(3000), "cannot open the video"),
        "truncated.mp4": ("video", mp4[: len(mp4) // 3], "cannot open the video"),
        "empty.mp4": ("video", b"", "the video file is empty"),
        "missing.png": ("image", "missing", "image file not found"),
    }


def test_corrupt_media_files(assets, tmp_path):
    """Every reader's complaint names the file and what is wrong (the library call the feature
    cache makes for each sample)."""
    from mera.data.media import read_media
    from mera.errors import DataError

    for name, (modality, data, needle) in _media_cases(tmp_path, assets).items():
        path = tmp_path / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        with pytest.raises(DataError) as e:
            read_media(modality, str(path))
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg, (name, msg)


# ----------------------------------------------------------------------------------- checkpoints


def _save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _foreign_lora(out: Path, assets: Path) -> None:  # another model's weights under the stage's name
    shutil.copy(assets / "image" / "model.safetensors", out / EXPERT / "delta.safetensors")


def _foreign_connectors(out: Path, assets: Path) -> None:
    shutil.copy(assets / "image" / "model.safetensors", out / STAGE1 / "connectors.safetensors")


def _lora_other_shapes(out: Path, assets: Path) -> None:  # a LoRA trained on a wider LLM (48 instead of 32)
    f = out / EXPERT / "delta.safetensors"
    _save(f, {k: torch.zeros(v.shape[0], 48) if k.endswith("lora_A") else torch.zeros(48, v.shape[1])
              for k, v in _load(f).items()})


def _lora_other_modules(out: Path, assets: Path) -> None:  # a LoRA of a deeper LLM: layer 7
    f, m = out / EXPERT / "delta.safetensors", out / EXPERT / "manifest.json"
    _save(f, {k.replace("layers.0.", "layers.7."): v for k, v in _load(f).items()})
    man = json.loads(m.read_text())
    man["folds"][0]["scalings"] = {k.replace("layers.0.", "layers.7."): v
                                    for k, v in man["folds"][0]["scalings"].items()}
    m.write_text(json.dumps(man))


def _corrupt_manifest(out: Path, assets: Path) -> None:
    (out / STAGE1 / "manifest.json").write_text('{"format": "mera-stage-v1", ')


def _foreign_manifest(out: Path, assets: Path) -> None:
    (out / STAGE1 / "manifest.json").write_text('{"model_type": "llama"}')


CHECKPOINT_CASES = {
    "truncated LoRA": (lambda out, a: _truncate(out / EXPERT / "delta.safetensors"),
                       f"{EXPERT}/delta.safetensors", ["unreadable safetensors file"]),
    "truncated connectors": (lambda out, a: _truncate(out / STAGE1 / "connectors.safetensors"),
                             f"{STAGE1}/connectors.safetensors", ["unreadable safetensors file"]),
    "not a safetensors file": (lambda out, a: (out / EXPERT / "delta.safetensors").write_text('{"a": 1}'),
                               f"{EXPERT}/delta.safetensors", ["unreadable safetensors file"]),
    "foreign LoRA file": (_foreign_lora, f"{EXPERT}/delta.safetensors",
                          ["not the delta file its manifest describes", "missing tensor", "the file holds"]),
    "foreign connectors file": (_foreign_connectors, f"{STAGE1}/connectors.safetensors",
                                ["holds connectors for", "its manifest lists ['image']"]),
    "LoRA of another backbone (shapes)": (_lora_other_shapes, f"{EXPERT}/delta.safetensors",
                                          ["LoRA of 'model.layers.0.", "A (2, 48)", "A (r, 32) and B (", "another LLM"]),
    "LoRA of another backbone (modules)": (_lora_other_modules, f"{EXPERT}/delta.safetensors",
                                           ["module 'model.layers.7.", "which the LLM does not have", "another LLM"]),
    "corrupt manifest": (_corrupt_manifest, f"{STAGE1}/manifest.json", ["invalid JSON"]),
    "foreign manifest": (_foreign_manifest, f"{STAGE1}/manifest.json", ["not a mera stage manifest"]),
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_bad_checkpoint_on_resume(resumable, assets, kind):
    """Resuming the unfinished stage 2 loads stage 1's chain (stage 1 -> image expert). The DONE files
    are the first release's (no record of the files: a run directory of that release, or one a tool
    rewrote whole), so the readers meet the damage; a recorded DONE would have the stage redone
    instead (tests/test_run_safety.py)."""
    cfg, out = resumable
    mutate, file, needles = CHECKPOINT_CASES[kind]
    mutate(out, assets)
    _unrecorded_done(out)
    before = tree(out)
    one_line_error(resume(cfg, out), str(out / file), *needles)
    assert tree(out) == before  # the unfinished stage is not even cleared


def _unrecorded_done(out: Path) -> None:
    for done in out.rglob("DONE"):
        done.write_text("done\n")


def test_connectors_of_another_backbone_on_resume(resumable):
    cfg, out = resumable
    f = out / STAGE1 / "connectors.safetensors"
    _save(f, {k: torch.zeros(*[s + 16 for s in v.shape]) for k, v in _load(f).items()})
    _unrecorded_done(out)
    before = tree(out)
    one_line_error(resume(cfg, out), str(f), "image")
    assert tree(out) == before


def test_corrupt_llm_weights(assets, run, tmp_path):
    cfg, _ = run
    llm = tmp_path / "llm"
    shutil.copytree(assets / "llm", llm)
    _truncate(llm / "model.safetensors")
    one_line_error(cli("run", cfg, "--out", tmp_path / "out", "--quiet", f"model.llm={llm}",
                       f"model.tokenizer={assets / 'tokenizer'}"), str(llm), "cannot load the language model")


def test_stage_without_done_is_redone(run, resumable):
    """Not an error: an unfinished stage (no DONE, a half-written file) is cleared and trained again,
    to the same result; finished stages are not touched."""
    cfg, out = resumable
    orig = run[1]
    (out / STAGE2 / "connectors.safetensors").write_bytes(b"half-written")
    (out / STAGE2 / "scores.csv").unlink()
    before = tree(out)
    r = resume(cfg, out)
    assert r.rc == 0, r.err
    assert "Traceback" not in r.err
    after = tree(out)
    assert (out / STAGE2 / "DONE").is_file()
    finished = lambda t: {k: v for k, v in t.items() if k.startswith(("experts/", STAGE1)) or k == "config.yaml"}  # noqa: E731
    assert finished(after) == finished(before)  # experts and stage 1 untouched
    assert after[f"{STAGE2}/connectors.safetensors"] == tree(orig)[f"{STAGE2}/connectors.safetensors"]
    assert (out / "scores.csv").read_bytes() == (orig / "scores.csv").read_bytes()


# ----------------------------------------------------------------------------------- training


def test_nan_loss_from_a_huge_learning_rate(run, tmp_path):
    cfg, _ = run
    out = tmp_path / "out"
    r = cli("run", cfg, "--out", out, "--quiet", "train.align.lr_connector=1e30", "train.align.epochs=3")
    one_line_error(r, "expert s1 image align", "the training loss is nan at step", "lower train.align's learning rates")
    assert not list(out.rglob("DONE"))


def test_nan_loss_keeps_the_last_good_checkpoint(resumable, monkeypatch):
    """The loss turns NaN in stage 2: the run stops naming the phase and step; the experts and
    stage 1 are byte-identical and stage 2 is not marked done."""
    from mera.model.mllm import MultimodalLM

    cfg, out = resumable
    forward = MultimodalLM.forward

    def nan_forward(self, *a, **kw):
        res = forward(self, *a, **kw)
        res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(MultimodalLM, "forward", nan_forward)
    shutil.rmtree(out / ".shared")  # else stage 2's step is reused from the first run, not trained again
    before = tree(out)
    one_line_error(resume(cfg, out), "FT s2 point align: the training loss is nan at step 1 of 1 (micro-batch 1)")
    assert without(tree(out), STAGE2) == without(before, STAGE2)
    assert not (out / STAGE2 / "DONE").exists()


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_saving_a_stage(resumable, monkeypatch):
    """ENOSPC in the middle of writing a checkpoint file: one line naming it, nothing half-written
    left, the stage not marked done, every other file unchanged."""
    import mera.continual.checkpoint as ckpt

    cfg, out = resumable

    def full_disk(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"\0" * 10)  # some bytes got out, then the disk was full
        raise _enospc(filename)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    before = tree(out)
    one_line_error(resume(cfg, out), str(out / STAGE2 / "delta.safetensors"), "No space left on device",
                   "not marked done")
    assert without(tree(out), STAGE2) == without(before, STAGE2)
    assert not (out / STAGE2 / "DONE").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    import mera.continual.checkpoint as ckpt
    from mera.errors import CheckpointError

    path = tmp_path / "connectors.safetensors"
    ckpt.save_tensors(path, {"image.w": torch.ones(3)})
    old = path.read_bytes()

    def full_disk(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"\0" * 10)
        raise _enospc(filename)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(CheckpointError) as e:
        ckpt.save_tensors(path, {"image.w": torch.zeros(3)})
    assert str(e.value).startswith(f"{path}: cannot write") and "No space left on device" in str(e.value)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["connectors.safetensors"]  # no temporary file left


def test_disk_full_while_writing_predictions(resumable, monkeypatch):
    import mera.io

    cfg, out = resumable
    real = mera.io.atomic_path

    def atomic_path(path):
        if Path(path).name == "predictions.jsonl":
            raise _enospc(path)
        return real(path)

    monkeypatch.setattr(mera.io, "atomic_path", atomic_path)
    before = tree(out)
    one_line_error(resume(cfg, out), str(out / STAGE2 / "predictions.jsonl"), "No space left on device")
    assert without(tree(out), STAGE2) == without(before, STAGE2)
    assert not (out / STAGE2 / "DONE").exists()


# ----------------------------------------------------------------------------------- the judge and its key


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_holding(folder: Path, secret: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_unreachable_judge_and_the_key_never_leaks(assets, home, tmp_path):
    """eval.judge: openai at a closed port, its key in an environment variable: one line naming the
    endpoint; the key appears in no output, no run file and no cache file. A real process."""
    key = "sk-mera-planted-" + secrets.token_hex(12)
    port = _closed_port()
    c = base_config(assets)
    c["eval"].update(judge="openai", judge_options={"base_url": f"http://127.0.0.1:{port}/v1",
                                                    "api_key_env": "MERA_TEST_JUDGE_KEY", "max_retries": 1,
                                                    "backoff_base": 0.01, "backoff_max": 0.02, "timeout": 5})
    cfg = write_config(tmp_path / "judge.yaml", c)
    out = tmp_path / "out"
    env = {**os.environ, "MERA_HOME": str(home), "MERA_TEST_JUDGE_KEY": key}
    env.pop("OPENAI_API_KEY", None)
    r = cli_subprocess("run", cfg, "--out", out, env=env)
    one_line_error(r, f"judge endpoint http://127.0.0.1:{port}/v1", "could not be judged",
                   "connection failed or dropped")
    assert key not in r.out + r.err
    assert not _files_holding(out, key.encode()) and not _files_holding(home, key.encode())
    assert (out / "config.yaml").is_file() and "MERA_TEST_JUDGE_KEY" in (out / "config.yaml").read_text()
    assert not list(out.rglob("DONE"))  # the expert is not done: its QA score is not a silent 0


def test_api_key_in_the_config_is_refused_without_echoing_it(run, tmp_path):
    cfg, _ = run
    key = "sk-mera-planted-" + secrets.token_hex(12)
    out = tmp_path / "out"
    r = cli("run", cfg, "--out", out, "--quiet", "eval.judge=openai", f"eval.judge_options.api_key={key}")
    one_line_error(r, "judge 'openai'", "unknown option(s) api_key")
    assert key not in r.out + r.err
    assert not out.exists()  # no config.yaml holding the key


# ----------------------------------------------------------------------------------- mera report


def test_report_scores_with_a_bad_header(tmp_path):
    f = tmp_path / "scores.csv"
    f.write_text("method,order,stag,modality,dataset,task,score\nFT,seq,1,image,d,caption,1.0\n")
    out = tmp_path / "report"
    one_line_error(cli("report", f, "--out", out), f"{f}, line 1: wrong header", "missing stage",
                   "unexpected 'stag'", "expected exactly method,order,stage,modality,dataset,task,score")
    assert not out.exists()


def test_report_scores_with_a_bad_row(tmp_path):
    f = tmp_path / "scores.csv"
    f.write_text("method,order,stage,modality,dataset,task,score\nexpert,seq,,image,d,caption,abc\n")
    one_line_error(cli("report", f), f"{f}, line 2", "not a number")


def test_report_of_a_missing_file(tmp_path):
    one_line_error(cli("report", tmp_path / "none.csv"), str(tmp_path / "none.csv"), "no such file")
