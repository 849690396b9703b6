"""report.html without a browser: its tables hold the numbers of metrics.json, the pictures are
embedded (the figures byte for byte), nothing points outside the file, the gallery shows each
item's predictions, the loss curves come from metrics.jsonl, and a missing source is said in
one line. The browser test is test_html_browser.py."""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from html_fixture import (
    METHODS,
    MODS,
    Page,
    decode_data_uri,
    expected_progression,
    expert_text,
    fake_run,
    judged,
    pm,
    stage_text,
    unmarked,
    write_training_log,
)

from mera.errors import DataError
from mera.eval.html_report import loss_panels, read_training_log, run_dir_of
from mera.eval.report import report_command, write_report

CHECK, CROSS = "\u2713", "\u2717"


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    """The hand-written run's report, made by ``mera report RUN/scores.csv --out DIR``."""
    root = tmp_path_factory.mktemp("html-one")
    run = fake_run(root)
    out = root / "rep"
    r = subprocess.run([sys.executable, "-m", "mera", "report", str(run / "scores.csv"), "--out", str(out)],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip().endswith(f"figures in {out / 'figures'}; the whole report in one page: {out / 'report.html'}")
    text = (out / "report.html").read_text(encoding="utf-8")
    return run, out, text, Page(text), json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    from mera.cli.report import gallery_for

    root = tmp_path_factory.mktemp("html-seeds")
    run = fake_run(root, seeds=[0, 1], training_log=False)
    scores = str(run / "scores.csv")
    report_command([scores], out=str(root / "rep"), html=True, gallery=lambda: gallery_for([scores]))
    text = (root / "rep" / "report.html").read_text(encoding="utf-8")
    return run, root / "rep", text, Page(text), json.loads((root / "rep" / "metrics.json").read_text())


def numbers(rows: list[list[str]]) -> list[float]:
    return [float(x) for r in rows for c in r for x in re.findall(r"[-+]?\d+\.\d+", c)]


def metric_values(obj) -> set[str]:
    """Every number of metrics.json, at the report's precision."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= metric_values(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= metric_values(v)
    elif isinstance(obj, float) and not isinstance(obj, bool):
        out.add(f"{obj:.2f}")
    return out


# ----------------------------------------------------------------------------- tables


def test_headline_and_progression_tables_are_metrics_json(one_seed):
    _, _, _, page, metrics = one_seed
    head = page.tables_in("results")[0]["rows"]
    assert head[0] == ["method", "sequential", "last-stage BW (avg over orders)"]
    assert [r[0] for r in head[1:]] == [m["name"] for m in METHODS]
    for e in metrics["summary"]:
        row = next(r for r in head[1:] if r[0] == e["method"])
        assert row[1] == pm(e["bw_mean"], e["bw_std"])
        assert row[2] == f"{metrics['last_stage_bw'][e['method']]:.2f}"
    prog = page.tables_in("progression")
    assert len(prog) == len(metrics["summary"]) == 2
    for table, e in zip(prog, metrics["summary"]):
        assert table["heading"].startswith(f"{e['method']}, order {e['order']}")
        assert table["rows"][0] == ["stage", "new", *MODS, "Backward RG", "Forward RG"]
        assert unmarked(table["rows"][1:]) == expected_progression(e)
    # and nothing else: every number in these tables is a number of metrics.json
    known = metric_values(metrics)
    for t in page.tables_in("results") + prog:
        assert {f"{x:.2f}" for x in numbers(t["rows"][1:])} <= known


def test_several_seeds_tables_are_metrics_json(two_seeds):
    _, _, _, page, metrics = two_seeds
    over = metrics["over_seeds"]["methods"]
    head = page.tables_in("results")[0]["rows"]
    assert head[0] == ["method", "seeds", "sequential", "last-stage BW (avg over orders)", "95% CI"]
    for m, o in over.items():
        row = next(r for r in head[1:] if r[0] == m)
        bw, last = o["orders"]["sequential"]["bw_mean"], o["last_stage_bw"]
        assert row[1:] == ["2", pm(bw["mean"], bw["std"]), pm(last["mean"], last["std"]),
                           f"[{last['ci_low']:.2f}, {last['ci_high']:.2f}]"]
    # the per-stage tables: means over the seeds of each seed's numbers
    for table, (m, o) in zip(page.tables_in("progression"), over.items()):
        per = [e for s in metrics["seeds"] for e in metrics["per_seed"][str(s)]["summary"] if e["method"] == m]
        mean = {"rg": {k: [None if per[0]["rg"][k][i] is None else sum(e["rg"][k][i] for e in per) / len(per)
                           for i in range(4)] for k in MODS},
                "bw_rg": [sum(e["bw_rg"][i] for e in per) / len(per) for i in range(4)],
                "fw_rg": [sum(e["fw_rg"][i] for e in per) / len(per) for i in range(4)]}
        assert [iv["mean"] for iv in o["orders"]["sequential"]["bw_rg"]] == pytest.approx(mean["bw_rg"])
        assert unmarked(table["rows"][1:]) == expected_progression(mean)
    # each seed's own tables, folded: that seed's numbers of metrics.json
    for s in metrics["seeds"]:
        tables = page.tables_in(f"seed-{s}")
        summary = metrics["per_seed"][str(s)]["summary"]
        first = tables[0]["rows"]
        for e in summary:
            row = next(r for r in first[1:] if r[0] == e["method"])
            assert row[1:] == [pm(e["bw_mean"], e["bw_std"]), f"{metrics['per_seed'][str(s)]['last_stage_bw'][e['method']]:.2f}"]
        prog = [t for t in tables if t["rows"][0][:2] == ["stage", "new"]]
        assert [unmarked(t["rows"][1:]) for t in prog] == [expected_progression(e) for e in summary]
    paired = next(t for t in page.tables_in("results") if t["rows"][0][0] == "pair (A \u2212 B)")["rows"][1:]
    assert len(paired) == len(metrics["paired"])
    for row, p in zip(paired, metrics["paired"]):
        assert row[3] == ("+" if p["mean"] >= 0 else "") + f"{p['mean']:.2f}" and row[5] == p["verdict"]


# ----------------------------------------------------------------------------- self-contained


def test_the_page_is_one_file_with_nothing_outside(one_seed):
    _, out, text, page, _ = one_seed
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert not page.tags & {"script", "link", "iframe", "object", "embed", "base"}
    assert "@import" not in text and "url(" not in text  # the inline CSS fetches nothing
    for tag, attr, value in page.urls:
        assert value.startswith(("data:", "#")), (tag, attr, value[:60])
        assert "http://" not in value and "https://" not in value
    from PIL import Image

    embedded = []
    for img in page.images:
        mime, data = decode_data_uri(img["src"])
        with Image.open(io.BytesIO(data)) as im:
            assert im.format.lower() == mime.split("/")[1].replace("jpg", "jpeg") and im.width > 0 and im.height > 0
            im.verify()
        embedded.append(data)
    # the figures of figures/, byte for byte (Backward, Forward RG, one heatmap per run)
    figures = sorted((out / "figures").iterdir())
    assert len(figures) == 4
    for f in figures:
        assert f.read_bytes() in embedded, f.name
    # fragment links point at ids of the page
    ids = set(re.findall(r'id="([^"]+)"', text))
    assert {v[1:] for _, _, v in page.urls if v.startswith("#")} <= ids


# ----------------------------------------------------------------------------- gallery


def test_gallery_shows_each_item_with_every_prediction(one_seed):
    run, _, text, page, _ = one_seed
    items = [t for t in page.tables if t["class"] == "preds"]
    assert len(items) == len(MODS) * 2 * 3  # the first 3 of each task, each modality
    order = [t["context"][-1] for t in items]
    assert order[:6] == [f"item-image_{t}_test_{k:05d}" for t in ("caption", "qa") for k in range(3)]
    for t in items:
        sid = t["context"][-1][len("item-"):]
        m, task = sid.split("_")[:2]
        first = MODS.index(m) + 1
        assert t["rows"][0] == ["method"] + [f"stage {i} (+{MODS[i - 1]})" for i in range(first, 5)]
        for row, meth in zip(t["rows"][1:], METHODS):
            name = meth["name"]
            assert row[0] == name
            for cell, i in zip(row[1:], range(first, 5)):
                want = expert_text(m, sid) if i == 1 else stage_text(name, i, sid)
                if task == "qa":
                    want += " " + (CHECK if (1.0 if i == 1 else judged(name, i, sid)) == 1.0 else CROSS)
                assert cell == want
    # each item's media, question, reference and expert answer
    block = text[text.index('id="item-audio_qa_test_00001"'):]
    block = block[: block.index("</article>")]
    sample = json.loads((run.parent / "world" / "audio" / "qa_test.json").read_text())[1]
    assert sample["conversations"][0]["value"].replace("<audio>", "").strip() in block
    assert f'<span class="label">Reference</span> {sample["conversations"][1]["value"]}' in block
    assert f"{expert_text('audio', 'audio_qa_test_00001')}</span>" in block
    gallery_imgs = [i for i in page.images if "gallery" in i["context"]]
    assert len(gallery_imgs) == len(items)
    kinds = {i["alt"].split()[0]: decode_data_uri(i["src"])[0] for i in gallery_imgs}
    assert kinds == {"image": "image/png", "video": "image/png", "audio": "image/jpeg", "point": "image/jpeg"}


def test_report_command_writes_the_page_only_when_asked(tmp_path, capsys):
    """The library call keeps its old outputs (report.md, metrics.json, figures/); the command line
    and write_report (the run's report) add report.html."""
    from hand_tables import HAND, write

    scores = write(tmp_path, HAND)
    report_command([str(scores)], out=str(tmp_path / "a"))
    assert not (tmp_path / "a" / "report.html").exists()
    report_command([str(scores)], out=str(tmp_path / "b"), html=True)
    for name in ("report.md", "metrics.json", "figures/backward_rg.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "b" / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert capsys.readouterr().out.rstrip().endswith(f"the whole report in one page: {tmp_path / 'b' / 'report.html'}")


def test_bare_scores_file_has_no_gallery_and_says_why(tmp_path):
    from hand_tables import HAND, write

    scores = write(tmp_path, HAND)
    write_report([str(scores)], tmp_path / "rep")
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    gallery = page[page.index('<section id="gallery">'):]
    missing = re.findall(r'<p class="missing">([^<]*)</p>', gallery)
    assert missing == [f"No gallery: {scores} is not in a run directory (no config.yaml beside it), so there is "
                       "no run to take gallery from."]
    assert 'class="item"' not in page
    assert "No training loss curves" in page and "is not in a run directory" in page
    assert run_dir_of([str(scores)]) is None and run_dir_of([str(scores), str(scores)]) is None


def test_a_run_whose_data_is_gone_says_so_in_the_gallery(tmp_path):
    import shutil

    from mera.cli.report import gallery_for

    run = fake_run(tmp_path, training_log=False)
    shutil.rmtree(tmp_path / "world" / "video")
    scores = str(run / "scores.csv")
    report_command([scores], out=str(tmp_path / "rep"), html=True, gallery=lambda: gallery_for([scores]))
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    gallery = page[page.index('<section id="gallery">'):]
    (line,) = re.findall(r'<p class="missing">([^<]*)</p>', gallery)
    assert line.startswith("No gallery: the run&#x27;s test sets cannot be read here (")
    assert "video" in line and "dataset file not found" in line


def test_the_loop_passes_the_gallery_and_profile_too():
    """Both writers of a run's report hand it the gallery of that run (source check: they are the
    only callers of write_report outside mera.eval)."""
    import inspect

    from mera.runner import loop
    from mera.runner import profile as profile_run

    assert "gallery=gallery" in inspect.getsource(loop.StageLoop.finish)
    assert "gallery=gallery_or_reason(run, cfg, assets.sets)" in inspect.getsource(profile_run.profile_run)


# ----------------------------------------------------------------------------- training loss


def test_loss_curves_from_metrics_jsonl(one_seed, tmp_path):
    run, _, _, page, _ = one_seed
    records, n_eval, note = read_training_log(run / "metrics.jsonl")
    assert len(records) == 4 * (6 + 8) + 3 * (6 + 8) + 3 * (6 + 8 + 4) and n_eval == 6 and note == ""
    phases = [h for tag, h in page.headings if tag == "h3" and h.startswith("Phase ")]
    assert phases == ["Phase align", "Phase instruct", "Phase realign"]
    imgs = [i for i in page.images if "training" in i["context"]]
    assert [i["alt"] for i in imgs] == [f"training loss, phase {p}" for p in ("align", "instruct", "realign")]
    panels = loss_panels(records)
    assert list(panels) == ["align", "instruct", "realign"]
    assert list(panels["instruct"]) == ["expert image", "expert video", "expert audio", "expert point",
                                        "stage 2 (video)", "stage 3 (audio)", "stage 4 (point)"]
    assert list(panels["realign"]) == ["stage 2 (video)", "stage 3 (audio)", "stage 4 (point)"]
    line = panels["instruct"]["stage 3 (audio)"][("MERA (10%)", 0)]
    assert line == [(s, round(2.0 / s + 0.1 * 3, 4)) for s in range(1, 9)]  # as the fixture logged them


def test_training_log_resumed_steps_and_unfinished_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rec = {"type": "train", "seed": 0, "order": "o", "method": "M", "stage": 2, "modality": "video", "phase": "instruct",
           "total_steps": 3, "lr": 1e-4, "grad_norm": 1.0}
    lines = [dict(rec, step=1, loss=2.0), dict(rec, step=2, loss=1.5), dict(rec, step=2, loss=1.25),  # resumed at 2
             dict(rec, step=3, loss=1.0), {"type": "note", "text": "other kinds are skipped"}]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"type": "train", "seed"')  # being written
    records, n_eval, note = read_training_log(log)
    assert len(records) == 4 and n_eval == 0 and note == "The last line (6) is unfinished and was skipped."
    assert loss_panels(records) == {"instruct": {"stage 2 (video)": {("M", 0): [(1, 2.0), (2, 1.25), (3, 1.0)]}}}


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"type": "train", "method": "M", "phase": "align", "step": 1}', "line 2: a train record needs 'loss' (a number), got None"),
    ('{"type": "train", "method": "M", "phase": "align", "step": "1", "loss": 1}', "line 2: a train record needs 'step'"),
])
def test_a_malformed_training_log_is_named_in_one_line(tmp_path, line, problem):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    write_training_log(log, [0])
    good = log.read_text().splitlines(keepends=True)
    log.write_text(good[0] + line + "\n" + "".join(good[1:]))
    with pytest.raises(DataError) as info:
        read_training_log(log)
    assert str(info.value).startswith(f"{log}: {problem}")
    from mera.eval.html_report import _training_section

    (log.parent / "config.yaml").write_text("{}")
    section = _training_section(log.parent, [str(log.parent / "scores.csv")])
    assert html.escape(f"No training loss curves: {log}: {problem}") in section and "<img" not in section


def test_no_training_log_says_so(two_seeds):
    run, _, text, _, _ = two_seeds
    assert f"No training loss curves: {run / 'metrics.jsonl'} does not exist" in text


# ----------------------------------------------------------------------------- thumbnails


def decode(th) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(th.data)).convert("RGB"))


def test_thumbnails_of_each_modality():
    from mera.eval import gallery as g

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    th = g.image_thumbnail(small)
    assert th.mime == "image/png" and np.array_equal(decode(th), small)  # small: kept exactly
    big = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    th = g.image_thumbnail(big)
    assert th.mime == "image/jpeg" and (th.width, th.height) == (g.THUMB_PX, 120)  # 640 x 480 -> 160 x 120
    frames = rng.integers(0, 256, (4, 32, 40, 3), dtype=np.uint8)
    th = g.video_thumbnail(frames)
    strip = decode(th)
    assert strip.shape == (32, 4 * 40 + 3 * 2, 3)  # side by side, 2 grey pixels apart
    assert np.array_equal(strip[:, 42:82], frames[1]) and (strip[:, 40:42] == 128).all()
    # a 1 kHz tone at 8 kHz: the brightest spectrogram row is the bin of 1 kHz
    rate, f = 8000, 1000.0
    wave = (0.5 * np.sin(2 * np.pi * f * np.arange(rate) / rate)).astype(np.float32)
    db = g.spectrogram(wave, rate)
    n_fft = 256  # 2 ** round(log2(0.032 * 8000)) = 2 ** 8
    assert db.shape[0] == n_fft // 2 + 1
    assert int(np.argmax(db.mean(axis=1))) == round(f * n_fft / rate)  # bin 32
    th = g.audio_thumbnail(wave, rate)
    assert th.mime == "image/jpeg" and (th.width, th.height) == g.SPEC_SIZE
    pic = decode(th).astype(int).sum(axis=2)
    assert abs(int(np.argmax(pic.mean(axis=1))) - round(th.height * (1 - 32 / 129))) <= 2  # the tone's row, flipped
    pts = np.concatenate([rng.uniform(-1, 1, (300, 3)), np.tile([[1.0, 0.0, 0.0]], (300, 1))], axis=1).astype(np.float32)
    th = g.point_thumbnail(pts)
    red = decode(th).astype(int)
    assert th.mime == "image/jpeg" and max(th.width, th.height) <= g.THUMB_PX
    assert ((red[..., 0] > 150) & (red[..., 1] < 100)).sum() > 100  # the points are drawn in their colour


def test_a_missing_media_file_is_said_in_its_item(tmp_path):
    from mera.eval.gallery import Gallery, GalleryItem, GalleryRow, Prediction
    from mera.eval.html_report import _item_html

    item = GalleryItem("image", "qa", "x1", "what ?", ["red"], str(tmp_path / "gone.png"), Prediction("red", 1.0),
                       [GalleryRow("M", "o", 1, {1: Prediction("red", 1.0), 2: Prediction("blue", 0.0),
                                                 3: Prediction(" ", 0.0)})])
    out = _item_html(item, Gallery([item], 4, ["stage 1", "stage 2", "stage 3", "stage 4"]))
    assert f"media unreadable: {tmp_path / 'gone.png'}: image file not found" in out
    assert f'<td class="ok">red <span class="mark ok" title="judged right">{CHECK}</span></td>' in out
    assert f'<td class="bad">blue <span class="mark bad" title="judged wrong">{CROSS}</span></td>' in out
    assert '<td class="bad"><span class="muted">(empty)</span> <span class="mark bad"' in out  # an empty answer
    assert '<td class="unseen" title="no prediction recorded">n/a</td>' in out  # stage 4: none recorded
