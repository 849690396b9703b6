"""``mera generate`` on a stage folder, a run directory (--stage / --expert) and an exported folder:
the same answers, the run's own evaluation predictions, streaming, batches, clear errors.

Uses the micro run of test_import_export.py (an imported tiny LLaVA + a toy point branch)."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from mera.errors import CheckpointError, ConfigError
from mera.generate import add_generate_parser, answer, answer_batch, generate_command, load_target
# the same module-scoped fixtures (an imported tiny LLaVA + a toy point branch, run once)
from test_import_export import exported, run, runner  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage2(run, runner):
    return load_target(run["stage2"], runner=runner)


@pytest.fixture(scope="module")
def export2(exported):
    return load_target(exported)


def _sample(runner, modality, task="caption"):
    s = getattr(runner.sets[modality], f"{task}_test")[0]
    return s.media, s.prompt


def test_stage_and_export_answer_alike(runner, stage2, export2):
    assert stage2.kind == "stage" and export2.kind == "export"
    assert sorted(stage2.modalities) == sorted(export2.modalities) == ["image", "point"]
    assert stage2.max_new_tokens == export2.max_new_tokens == 4
    for m in ("image", "point"):
        for task in ("caption", "qa"):
            media, prompt = _sample(runner, m, task)
            a = answer(stage2, m, media, prompt)
            assert a == answer(export2, m, media, prompt)
            assert a == answer(export2, m, media, prompt.split("\n", 1)[1])  # placeholder added in front
    media, prompt = _sample(runner, "point")
    long = answer(export2, "point", media, prompt, max_new_tokens=8)
    assert len(long.split()) > len(answer(export2, "point", media, prompt, max_new_tokens=1).split())


def test_batches_reproduce_the_runs_evaluation(run, runner, stage2, export2):
    """The same batch as the run's evaluation (left-padded, batch 8) gives its predictions exactly."""
    preds = [json.loads(line) for line in (run["stage2"] / "predictions.jsonl").read_text().splitlines()]
    for m in ("image", "point"):
        samples = runner.sets[m].caption_test
        want = {p["id"]: p["prediction"] for p in preds if p["modality"] == m and p["task"] == "caption"}
        items = [{"id": s.id, "media": s.media, "modality": m, "prompt": s.prompt} for s in samples]
        for loaded in (stage2, export2):
            rows = answer_batch(loaded, items, batch_size=runner.cfg.eval.batch_size)
            assert {r["id"]: r["answer"] for r in rows} == want


def test_stream_prints_the_same_answer(runner, export2):
    media, prompt = _sample(runner, "image")
    chunks = []
    got = answer(export2, "image", media, prompt, max_new_tokens=6, stream=chunks.append)
    assert got == answer(export2, "image", media, prompt, max_new_tokens=6)
    assert "".join(chunks).strip() == got and len(chunks) >= 1


def test_unlearned_modality_is_a_clear_error(run, runner, stage2, export2):
    media, prompt = _sample(runner, "point")
    for loaded in (stage2, export2):
        with pytest.raises(ConfigError, match=r"has not learned 'audio'; it has learned: image, point"):
            answer(loaded, "audio", media, prompt)
    stage1 = load_target(run["run"], stage="sequential/MERA (10%)/1", runner=runner)
    assert stage1.modalities == ["image"]
    with pytest.raises(ConfigError, match=r"has not learned 'point'; it has learned: image$"):
        answer(stage1, "point", media, prompt)
    with pytest.raises(ConfigError, match="exactly one <image>"):
        answer(stage1, "image", _sample(runner, "image")[0], "<image> <point> what ?")


def _args(*argv):
    p = argparse.ArgumentParser()
    add_generate_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["generate", *argv])


def test_generate_command(run, runner, exported, tmp_path):
    media, prompt = _sample(runner, "image")
    out = io.StringIO()
    assert generate_command(_args(str(exported), "--media", media, "--modality", "image", "--prompt", prompt),
                            out=out) == 0
    single = out.getvalue()
    out = io.StringIO()
    generate_command(_args(str(run["run"]), "--stage", "sequential/mera-10", "--media", media, "--modality", "image",
                           "--prompt", prompt, "--stream"), out=out)
    assert out.getvalue().strip() == single.strip() and single.endswith("\n")
    # expert of the imported image branch: the base LLM + the imported connector
    out = io.StringIO()
    generate_command(_args(str(run["run"]), "--expert", "image", "--media", media, "--modality", "image",
                           "--prompt", prompt), out=out)
    expert = load_target(run["run"] / "experts/image", runner=runner)
    assert out.getvalue().strip() == answer(expert, "image", media, prompt)
    # a batch file: JSON lines out, media relative to the file
    pm, pp = _sample(runner, "point")
    (tmp_path / "img.png").write_bytes(open(media, "rb").read())
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"media": "img.png", "modality": "image", "prompt": prompt},
                                 {"media": pm, "modality": "point", "prompt": pp, "id": "p0"}]))
    generate_command(_args(str(exported), "--batch", str(batch), "--out", str(tmp_path / "answers.jsonl")))
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[1]["id"] == "p0"
    assert rows[0]["answer"] == single.strip()
    assert rows[1]["answer"] == answer(load_target(exported), "point", pm, pp)


def test_generate_command_errors(run, exported, tmp_path):
    with pytest.raises(ConfigError, match=r"--stage ORDER/METHOD/I or --expert MODALITY \(finished: --expert image"):
        generate_command(_args(str(run["run"]), "--media", "x.png", "--modality", "image", "--prompt", "hi"))
    with pytest.raises(ConfigError, match="no method 'nope'"):
        generate_command(_args(str(run["run"]), "--stage", "sequential/nope/1", "--media", "x.png",
                               "--modality", "image", "--prompt", "hi"))
    with pytest.raises(ConfigError, match="generate needs --prompt"):
        generate_command(_args(str(exported), "--media", "x.png", "--modality", "image"))
    with pytest.raises(CheckpointError, match="neither a run directory"):
        generate_command(_args(str(tmp_path), "--media", "x.png", "--modality", "image", "--prompt", "hi"))
    from mera.errors import DataError

    with pytest.raises(DataError, match="image file not found"):
        generate_command(_args(str(exported), "--media", str(tmp_path / "x.png"), "--modality", "image",
                               "--prompt", "hi"))
