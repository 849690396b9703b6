"""``mera generate`` on a stage folder, a run directory (--stage / --expert) and an exported folder:
the same answers, the run's own evaluation predictions, streaming, batches, clear errors.

Uses the micro run of test_import_export.py (an imported tiny LLaVA + a toy point branch)."""

from __future__ import annotations

import argparse
import io
import json

import pytest

# the same module-scoped fixtures (an imported tiny LLaVA + a toy point branch, run once)
from test_import_export import assets, exported, run  # noqa: F401

from mera.cli import generate as generate_cli
from mera.errors import CheckpointError, ConfigError
from mera.interop.generate import answer, answer_batch, load_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage2(run, assets):
    return load_target(run["stage2"], assets=assets)


@pytest.fixture(scope="module")
def export2(exported):
    return load_target(exported)


def _sample(assets, modality, task="caption"):
    s = getattr(assets.sets[modality], f"{task}_test")[0]
    return s.media, s.prompt


def test_stage_and_export_answer_alike(assets, stage2, export2):
    assert stage2.kind == "stage" and export2.kind == "export"
    assert sorted(stage2.modalities) == sorted(export2.modalities) == ["image", "point"]
    assert stage2.max_new_tokens == export2.max_new_tokens == 4
    for m in ("image", "point"):
        for task in ("caption", "qa"):
            media, prompt = _sample(assets, m, task)
            a = answer(stage2, m, media, prompt)
            assert a == answer(export2, m, media, prompt)
            assert a == answer(export2, m, media, prompt.split("\n", 1)[1])  # placeholder added in front
    media, prompt = _sample(assets, "point")
    long = answer(export2, "point", media, prompt, max_new_tokens=8)
    assert len(long.split()) > len(answer(export2, "point", media, prompt, max_new_tokens=1).split())


def test_batches_reproduce_the_runs_evaluation(run, assets, stage2, export2):
    """The same batch as the run's evaluation (left-padded, batch 8) gives its predictions exactly."""
    preds = [json.loads(line) for line in (run["stage2"] / "predictions.jsonl").read_text().splitlines()]
    for m in ("image", "point"):
        samples = assets.sets[m].caption_test
        want = {p["id"]: p["prediction"] for p in preds if p["modality"] == m and p["task"] == "caption"}
        items = [{"id": s.id, "media": s.media, "modality": m, "prompt": s.prompt} for s in samples]
        for loaded in (stage2, export2):
            rows = answer_batch(loaded, items, batch_size=assets.cfg.eval.batch_size)
            assert {r["id"]: r["answer"] for r in rows} == want


def test_stream_prints_the_same_answer(assets, export2):
    media, prompt = _sample(assets, "image")
    chunks = []
    got = answer(export2, "image", media, prompt, max_new_tokens=6, stream=chunks.append)
    assert got == answer(export2, "image", media, prompt, max_new_tokens=6)
    assert "".join(chunks).strip() == got and len(chunks) >= 1


def test_unlearned_modality_is_a_clear_error(run, assets, stage2, export2):
    media, prompt = _sample(assets, "point")
    for loaded in (stage2, export2):
        with pytest.raises(ConfigError, match=r"has not learned 'audio'; it has learned: image, point"):
            answer(loaded, "audio", media, prompt)
    stage1 = load_target(run["run"], stage="sequential/MERA (10%)/1", assets=assets)
    assert stage1.modalities == ["image"]
    with pytest.raises(ConfigError, match=r"has not learned 'point'; it has learned: image$"):
        answer(stage1, "point", media, prompt)
    with pytest.raises(ConfigError, match="exactly one <image>"):
        answer(stage1, "image", _sample(assets, "image")[0], "<image> <point> what ?")


def _args(*argv):
    p = argparse.ArgumentParser()
    generate_cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["generate", *argv])


def test_generate_command(run, assets, exported, tmp_path):
    media, prompt = _sample(assets, "image")
    out = io.StringIO()
    assert generate_cli.run(_args(str(exported), "--media", media, "--modality", "image", "--prompt", prompt),
                            out=out) == 0
    single = out.getvalue()
    out = io.StringIO()
    generate_cli.run(_args(str(run["run"]), "--stage", "sequential/mera-10", "--media", media, "--modality", "image",
                           "--prompt", prompt, "--stream"), out=out)
    assert out.getvalue().strip() == single.strip() and single.endswith("\n")
    # expert of the imported image branch: the base LLM + the imported connector
    out = io.StringIO()
    generate_cli.run(_args(str(run["run"]), "--expert", "image", "--media", media, "--modality", "image",
                           "--prompt", prompt), out=out)
    expert = load_target(run["run"] / "experts/image", assets=assets)
    assert out.getvalue().strip() == answer(expert, "image", media, prompt)
    # a batch file: JSON lines out, media relative to the file
    pm, pp = _sample(assets, "point")
    (tmp_path / "img.png").write_bytes(open(media, "rb").read())
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"media": "img.png", "modality": "image", "prompt": prompt},
                                 {"media": pm, "modality": "point", "prompt": pp, "id": "p0"}]))
    generate_cli.run(_args(str(exported), "--batch", str(batch), "--out", str(tmp_path / "answers.jsonl")))
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[1]["id"] == "p0"
    assert rows[0]["answer"] == single.strip()
    assert rows[1]["answer"] == answer(load_target(exported), "point", pm, pp)


def test_generate_command_errors(run, exported, tmp_path):
    with pytest.raises(ConfigError, match=r"--stage ORDER/METHOD/I or --expert MODALITY \(finished: --expert image"):
        generate_cli.run(_args(str(run["run"]), "--media", "x.png", "--modality", "image", "--prompt", "hi"))
    with pytest.raises(ConfigError, match="no method 'nope'"):
        generate_cli.run(_args(str(run["run"]), "--stage", "sequential/nope/1", "--media", "x.png",
                               "--modality", "image", "--prompt", "hi"))
    with pytest.raises(ConfigError, match="generate needs --prompt"):
        generate_cli.run(_args(str(exported), "--media", "x.png", "--modality", "image"))
    with pytest.raises(CheckpointError, match="neither a run directory"):
        generate_cli.run(_args(str(tmp_path), "--media", "x.png", "--modality", "image", "--prompt", "hi"))
    from mera.errors import DataError

    with pytest.raises(DataError, match="image file not found"):
        generate_cli.run(_args(str(exported), "--media", str(tmp_path / "x.png"), "--modality", "image",
                               "--prompt", "hi"))
