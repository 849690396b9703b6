"""report.html in a real headless Chromium (the system's, driven by selenium: tests/browser.py):
no console error, every picture decoded, the tables show the numbers of metrics.json, the gallery
shows the predictions, both colour themes apply; full-page screenshots are kept as artifacts (in
the test's tmp folder and, when MERA_TEST_ARTIFACTS is set, there too).

Without Chromium (or its driver) the test skips, in one line naming what is missing and how to
install it; under MERA_REQUIRE_BROWSER=1 (.ci/run sets it, after installing Chromium) it fails
instead."""

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
    need_chromium()  # before the work: a missing browser skips (or fails) at once, saying what to do
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


@pytest.mark.parametrize("require", [False, True], ids=["default", "required"])
@pytest.mark.parametrize("absent", [("chromium",), ("chromedriver",), ("chromium", "chromedriver"), ()],
                         ids=["no-chromium", "no-driver", "neither", "both-there"])
def test_a_missing_browser_skips_or_fails_naming_exactly_what_is_missing(absent, require, tmp_path, monkeypatch):
    """The lookup pointed at fake paths: an executable file for a program that is there, a path to
    nothing for one that is not. Skip by default, fail under MERA_REQUIRE_BROWSER=1; the one-line
    message names each missing program's path and no other, and says how to install them."""
    import browser

    paths = {}
    for name in ("chromium", "chromedriver"):
        if name in absent:
            paths[name] = tmp_path / "nowhere" / f"{name}-absent"
        else:
            paths[name] = tmp_path / "bin" / f"{name}-present"
            paths[name].parent.mkdir(exist_ok=True)
            paths[name].write_text("#!/bin/sh\n")
            paths[name].chmod(0o755)
    monkeypatch.setattr(browser, "CHROMIUM", str(paths["chromium"]))
    monkeypatch.setattr(browser, "CHROMEDRIVER", str(paths["chromedriver"]))
    if require:
        monkeypatch.setenv("MERA_REQUIRE_BROWSER", "1")
    else:
        monkeypatch.delenv("MERA_REQUIRE_BROWSER", raising=False)

    if not absent:
        assert browser.need_chromium() is None  # both there: the test goes on
        return
    with pytest.raises(pytest.fail.Exception if require else pytest.skip.Exception) as caught:
        browser.need_chromium()
    said = str(caught.value)
    assert "\n" not in said
    for name, path in paths.items():
        assert (str(path) in said) == (name in absent), (name, said)
    assert said.startswith(" and ".join(str(paths[n]) for n in absent) + " not found: ")
    assert "`apt-get install -y chromium chromium-driver`, or run .ci/run" in said
    assert ("MERA_REQUIRE_BROWSER=1" in said) == require
