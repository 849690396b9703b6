"""report.html in a real headless Chromium (the system's, driven by selenium: tests/browser.py):
no console error, every picture decoded, the tables show the numbers of metrics.json, the gallery
shows the predictions, both colour themes apply; full-page screenshots are kept as artifacts (in
the test's tmp folder and, when MERA_TEST_ARTIFACTS is set, there too).

Without Chromium the test fails saying how to get it (.ci/run installs it); MERA_SKIP_BROWSER=1
skips it instead."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from browser import chromium, full_page_png, need_chromium
from html_fixture import METHODS, MODS, expected_progression, fake_run, judged, pm, stage_text, unmarked

TABLES_JS = """
return [...document.querySelectorAll('table')].map(t => ({
  section: t.closest('section') ? t.closest('section').id : null,
  item: t.closest('article') ? t.closest('article').id : null,
  rows: [...t.rows].map(r => [...r.cells].map(c => c.innerText.replace(/\\s+/g, ' ').trim()))}));
"""
IMAGES_JS = """
return [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
  shown: i.getBoundingClientRect().width, section: i.closest('section').id}));
"""
STYLE_JS = """
const bg = e => getComputedStyle(document.querySelector(e)).backgroundColor;
return {body: bg('body'), plot: bg('#figures .plot'), fg: getComputedStyle(document.body).color};
"""


def keep(shot: Path) -> None:
    folder = os.environ.get("MERA_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(folder) / shot.name)


def test_report_html_in_headless_chromium(tmp_path):
    need_chromium()  # before the work: a missing browser fails at once, saying what to do
    from PIL import Image

    from mera.cli.report import gallery_for
    from mera.eval.report import report_command

    run = fake_run(tmp_path)
    scores = str(run / "scores.csv")
    out = tmp_path / "rep"
    report_command([scores], out=str(out), html=True, gallery=lambda: gallery_for([scores]))
    metrics = json.loads((out / "metrics.json").read_text())

    with chromium(width=1400, height=1000) as driver:
        driver.get((out / "report.html").as_uri())
        assert driver.title == "Continual-learning report: run"
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(n.startswith("data:") for n in fetched), fetched[:5]  # nothing fetched from anywhere

        images = driver.execute_script(IMAGES_JS)
        assert len(images) == 4 + 3 + 24  # figures, loss curves (align, instruct, realign), gallery
        bad = [i["alt"] for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
        assert bad == []
        gallery = [i for i in images if i["section"] == "gallery"]
        assert all(i["shown"] >= 90 for i in gallery)  # a 32 px toy picture is shown enlarged

        tables = driver.execute_script(TABLES_JS)
        head = next(t for t in tables if t["section"] == "results")["rows"]
        for e in metrics["summary"]:
            row = next(r for r in head if r[0] == e["method"])
            assert row[1:] == [pm(e["bw_mean"], e["bw_std"]), f"{metrics['last_stage_bw'][e['method']]:.2f}"]
        prog = [t for t in tables if t["section"] == "progression"]
        assert [unmarked(t["rows"][1:]) for t in prog] == [expected_progression(e) for e in metrics["summary"]]

        items = [t for t in tables if t["item"]]
        assert len(items) == len(MODS) * 2 * 3
        qa = next(t for t in items if t["item"] == "item-video_qa_test_00000")["rows"]
        assert qa[0] == ["method", "stage 2 (+video)", "stage 3 (+audio)", "stage 4 (+point)"]
        for row, meth in zip(qa[1:], METHODS):
            name = meth["name"]
            assert row == [name] + [stage_text(name, i, "video_qa_test_00000") + " "
                                    + ("\u2713" if judged(name, i, "video_qa_test_00000") else "\u2717") for i in (2, 3, 4)]
        assert driver.execute_script("return document.querySelectorAll('#gallery td.ok').length") > 0
        assert driver.execute_script("return document.querySelectorAll('#gallery td.bad').length") > 0

        light = driver.execute_script(STYLE_JS)
        shots = [full_page_png(driver, tmp_path / "report-light.png")]
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark = driver.execute_script(STYLE_JS)
        shots.append(full_page_png(driver, tmp_path / "report-dark.png"))

    assert light["body"] == "rgb(255, 255, 255)" and dark["body"] == "rgb(20, 22, 26)"
    assert light["fg"] != dark["fg"]
    assert light["plot"] == dark["plot"] == "rgb(255, 255, 255)"  # the figures keep their light card
    for shot in shots:
        with Image.open(shot) as im:
            assert im.width == 1400 and im.height > 3000
            corner = im.convert("RGB").getpixel((5, im.height - 5))
        assert (sum(corner) > 600) == shot.name.endswith("light.png")  # the page's own background
        keep(shot)


def test_a_missing_chromium_fails_the_test_and_says_what_to_do(monkeypatch):
    import browser

    monkeypatch.setattr(browser, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("MERA_SKIP_BROWSER", raising=False)
    said = (r"/nonexistent/chromium not found: .* Run \.ci/run \(it installs one\) or "
            r"`apt-get install -y chromium chromium-driver`")
    with pytest.raises(pytest.fail.Exception, match=said):
        browser.need_chromium()
    monkeypatch.setenv("MERA_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="MERA_SKIP_BROWSER=1"):
        browser.need_chromium()
