"""Report: JSON for the paper fixture, Markdown markers, files written with --out, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mera.errors import DataError
from mera.eval.metrics import read_scores, run_metrics
from mera.eval.report import _stage_means, render_markdown, report_command, slug, write_report

FIXTURE = Path(__file__).parent / "data" / "paper_sequential_scores.csv"
from hand_tables import HAND, HEADER, PAPER_TABLE2, write  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Hand table (same as in test_metrics). Experts: image MSCOCO 100, image VQA 0.5, video V 50, audio A 10.
#   stage 1: RG_img = (0.8 + 1.0)/2 = 90
#   stage 2: RG_img = (0.6 + 0.6)/2 = 60 (down from 90: no marker); RG_vid = 40/50 = 80; BW = 60 (< 100)
#   stage 3: RG_img = (0.7 + 0.8)/2 = 75 (up from 60: marker); RG_vid = 45/50 = 90 (up from 80: marker);
#            RG_aud = 5/10 = 50; BW = (75 + 90)/2 = 82.5 (up from 60: marker); FW = 50
#   mean BW = (100 + 60 + 82.5)/3 = 80.83; sample std = 20.05




def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The data rows of the first table after ``heading``, as lists of cell strings."""
    lines = markdown.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(heading))
    rows, in_table = [], False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            in_table = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif in_table:
            break
    return rows[2:]  # drop header and separator


# ----------------------------------------------------------------------------- JSON


def test_json_for_paper_fixture(capsys):
    assert report_command([str(FIXTURE)], as_json=True) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)  # the whole stdout is exactly one JSON object
    # the summary of the first release, then the reviewer's statistics (tests/test_report_stats.py)
    assert list(obj) == ["summary", "last_stage_bw", "bootstrap", "primary", "cl_metrics", "claims"]
    methods = [e["method"] for e in obj["summary"]]
    assert methods == ["Fine-Tuning", "Replay (1%)", "Replay (10%)", "EWC", "PathWeave", "MERA (1%)", "MERA (10%)"]
    expected = PAPER_TABLE2
    for e in obj["summary"]:
        assert set(e) == {"method", "order", "seed", "bw_rg", "fw_rg", "bw_mean", "bw_std", "rg"}
        assert e["seed"] is None  # a table without the seed column: one seed
        assert e["order"] == "sequential"
        assert len(e["bw_rg"]) == len(e["fw_rg"]) == 4
        assert e["bw_rg"][0] == 100.0 and e["fw_rg"][0] == 100.0
        assert list(e["rg"]) == ["image", "video", "audio", "point"]
        assert e["rg"]["point"][:3] == [None, None, None] and e["rg"]["image"][0] == pytest.approx(100.0)
        mean, std = expected[e["method"]]
        assert e["bw_mean"] == pytest.approx(mean, abs=0.005)
        assert e["bw_std"] == pytest.approx(std, abs=0.005)
        # the backward RG at stage 4 is the mean RG of the three old modalities
        old = [e["rg"][m][3] for m in ("image", "video", "audio")]
        assert e["bw_rg"][3] == pytest.approx(sum(old) / 3)
        assert e["fw_rg"][3] == pytest.approx(e["rg"]["point"][3])
        assert obj["last_stage_bw"][e["method"]] == pytest.approx(e["bw_rg"][3])
    assert obj["last_stage_bw"]["MERA (10%)"] == pytest.approx(102.17, abs=0.005)
    # the CL metrics of the paper's own scores: MERA (10%) keeps the most (Last) and forgets the least
    cl = obj["cl_metrics"]["methods"]
    assert max(cl, key=lambda m: cl[m]["last"]) == "MERA (10%)" and min(cl, key=lambda m: cl[m]["forgetting"]) == "MERA (10%)"
    for m, e in cl.items():  # Last = ((m-1) BW_m + FW_m) / m with m = 4 stages
        s = next(x for x in obj["summary"] if x["method"] == m)
        assert e["last"] == pytest.approx((3 * s["bw_rg"][3] + s["fw_rg"][3]) / 4)
    # no per-item scores for the paper's table: no bootstrap, and the primary family is named but not tested
    assert "missing" in obj["bootstrap"] and len(obj["primary"]["family"]) == 5 and not obj["primary"]["dropped"]


# ----------------------------------------------------------------------------- markdown


def test_markdown_markers_on_hand_table(tmp_path, capsys):
    assert report_command([str(write(tmp_path, HAND))]) == 0
    md = capsys.readouterr().out
    (summary,) = table_rows(md, "## Backward relative gain")
    assert summary == ["M", "80.83 ± 20.05", "82.50"]
    stages = table_rows(md, "### M, order o")
    # columns: stage | new | image | video | audio | Backward RG | Forward RG
    assert stages[0] == ["1", "image", "90.00", "–", "–", "100.00", "100.00"]
    assert stages[1] == ["2", "video", "60.00", "80.00", "–", "60.00", "80.00"]
    assert stages[2] == ["3", "audio", "75.00 ↑", "90.00 ↑", "50.00", "82.50 ↑", "50.00"]
    assert "↑ marks positive backward transfer" in md
    assert "image → video → audio" in md


def test_markdown_two_orders_columns_and_method_order(tmp_path):
    # Method B appears first; for M, order r: stage 1 video 50/50 = 100, stage 2 BW = 25/50 = 50.
    # M's last-stage BW averaged over its orders: (82.5 + 50)/2 = 66.25; B only has order r: 10/50 = 20.
    text = (
        HAND.replace(f"{HEADER}\n", f"{HEADER}\nB,r,1,video,V,caption,10\n")
        + "M,r,1,video,V,caption,50\nM,r,2,video,V,caption,25\nM,r,2,image,MSCOCO,caption,100\nM,r,2,image,VQA,qa,0.25\n"
    )
    runs = run_metrics(read_scores(write(tmp_path, text)))
    md = render_markdown(runs)
    rows = table_rows(md, "## Backward relative gain")
    assert [r[0] for r in rows] == ["B", "M"]
    assert md.splitlines()[md.splitlines().index("## Backward relative gain (%)") + 2] == (
        "| method | r | o | last-stage BW (avg over orders) |"
    )
    assert rows[0] == ["B", "100.00 ± n/a", "–", "100.00"]  # one stage: std undefined
    assert rows[1] == ["M", "75.00 ± 35.36", "80.83 ± 20.05", "66.25"]
    # per-method per-stage means used by the figures: M stage 2 = (60 + 50)/2, stage 3 only order o
    means = _stage_means(runs, "bw_rg")
    assert means["M"] == pytest.approx([100.0, 55.0, 82.5])
    assert _stage_means(runs, "fw_rg")["M"] == pytest.approx([100.0, (80.0 + 75.0) / 2, 50.0])


def test_slug():
    assert slug("MERA (10%)") == "mera-10pct"
    assert slug("Replay (1%)") == "replay-1pct"
    assert slug("Fine-Tuning") == "fine-tuning"
    assert slug("EWC + realign") == "ewc-plus-realign"


# ----------------------------------------------------------------------------- files


def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 150 and image.shape[1] >= 200, image.shape
    assert image.std() > 0.01  # not a blank canvas


def test_out_writes_report_metrics_and_figures(tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_command([str(write(tmp_path, HAND))], out=str(out)) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md in printed  # the same Markdown as on stdout
    assert str(out / "report.md") in printed and str(out / "figures") in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"][0]["bw_rg"] == pytest.approx([100.0, 60.0, 82.5])
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["accuracy_m_o.png", "backward_rg.png", "forward_rg.png"]
    for name in figures:
        check_png(out / "figures" / name)


def test_json_with_out_prints_only_json(tmp_path, capsys):
    out = tmp_path / "rep"
    report_command([str(write(tmp_path, HAND))], out=str(out), as_json=True)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads((out / "metrics.json").read_text())
    assert str(out) in captured.err  # where things went: on stderr, stdout stays pure JSON


def test_write_report_on_fixture(tmp_path):
    out = tmp_path / "run"
    metrics = write_report([str(FIXTURE)], out)
    assert metrics == json.loads((out / "metrics.json").read_text())
    names = {p.name for p in (out / "figures").iterdir()}
    assert "accuracy_mera-10pct_sequential.png" in names and "accuracy_fine-tuning_sequential.png" in names
    assert len(names) == 2 + 7
    check_png(out / "figures" / "accuracy_mera-10pct_sequential.png")
    # rows work as input too, giving the same metrics
    assert write_report(read_scores(FIXTURE), tmp_path / "again") == metrics


def test_malformed_file_leaves_existing_report_untouched(tmp_path):
    out = tmp_path / "rep"
    report_command([str(write(tmp_path, HAND))], out=str(out))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert len(before) == 5
    bad = write(tmp_path, HAND.replace("M,o,3,audio,A,caption,5", "M,o,3,audio,A,caption,five"), "broken.csv")
    with pytest.raises(DataError) as info:
        report_command([str(bad)], out=str(out))
    assert str(bad) in str(info.value) and "line 14" in str(info.value)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_no_method_rows_is_an_error(tmp_path):
    only_experts = write(tmp_path, f"{HEADER}\nexpert,o,,image,I,caption,10\n", "experts.csv")
    with pytest.raises(DataError, match="no method rows"):
        report_command([str(only_experts)], as_json=True)


def test_report_json_does_not_import_torch_or_matplotlib(tmp_path):
    code = (
        "import sys; from mera.eval.report import report_command; "
        f"report_command([{str(FIXTURE)!r}], as_json=True); "
        "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["last_stage_bw"]["MERA (10%)"] == pytest.approx(102.17, abs=0.005)


def test_cli_report_json_and_malformed_file(tmp_path):
    """`mera report --json` prints one JSON object; a malformed file is one line, exit 2, no traceback."""
    ok = subprocess.run([sys.executable, "-m", "mera", "report", str(FIXTURE), "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    obj = json.loads(ok.stdout)
    assert abs(obj["last_stage_bw"]["MERA (10%)"] - 102.17) < 0.01
    bad = write(tmp_path, HAND.replace("M,o,2,image,VQA,qa,0.3", "M,o,2,image,VQA,qa,zero"))
    r = subprocess.run([sys.executable, "-m", "mera", "report", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "line 9" in lines[0] and "Traceback" not in r.stderr


def _ablation_table(tmp_path):
    """Two stages (image, video); each method's stage-2 image scores give its backward RG."""
    rows = [HEADER, "expert,o,,image,MSCOCO,caption,100", "expert,o,,image,VQA,qa,0.5", "expert,o,,video,V,caption,50"]
    # stage-2 image RG = mean(caption / 100, qa / 0.5) in %
    stage2 = {"Fine-Tuning": (60, 0.3), "Realign only": (80, 0.4), "Replay": (70, 0.35),
              "Replay + Realign": (90, 0.45), "Merge only": (90, 0.45), "MERA (10%)": (100, 0.5)}
    for m, (cap, qa) in stage2.items():
        rows += [f"{m},o,1,image,MSCOCO,caption,100", f"{m},o,1,image,VQA,qa,0.5",
                 f"{m},o,2,image,MSCOCO,caption,{cap}", f"{m},o,2,image,VQA,qa,{qa}", f"{m},o,2,video,V,caption,40"]
    return write(tmp_path, "\n".join(rows) + "\n")


def test_realign_pairs_and_ablation_rows():
    from mera.eval.report import ablation_rows, realign_pairs

    methods = ["Fine-Tuning", "Realign only", "Replay (1%)", "replay (1%)+realign", "EWC", "Merge only", "MERA (10%)"]
    assert realign_pairs(methods) == [("Fine-Tuning", "Realign only"), ("Replay (1%)", "replay (1%)+realign"),
                                      ("Merge only", "MERA (10%)")]  # realign added to the merge is MERA
    assert ("Merge only", "MERA (1%)") not in realign_pairs(["Merge only", "MERA (1%)"])  # Table 5: 10% only
    assert ablation_rows(methods) == [("Fine-Tuning", False, False), ("Realign only", False, True),
                                      ("Merge only", True, False), ("MERA (10%)", True, True)]
    assert ablation_rows(["Fine-Tuning", "MERA (10%)"]) == []  # no ablation ran: no table


def test_ablation_and_realign_tables_hand_computed(tmp_path):
    from mera.eval.report import write_report

    path = _ablation_table(tmp_path)
    eff = {"Fine-Tuning": {"train_seconds": 12.345, "train_peak_mib": 700.4, "infer_ms_per_token": 1.234,
                           "infer_peak_mib": 650.0, "llm_params_m": 1.5, "memory_kind": "rss"}}
    write_report([str(path)], tmp_path / "r", efficiency=eff)
    md = (tmp_path / "r" / "report.md").read_text()
    # FT: BW = (100, 60) -> 80 +- 28.28; realign only: (100, 80) -> 90 +- 14.14: +10.00 / -14.14
    assert "| Fine-Tuning | Realign only | +10.00 / -14.14 |" in md
    # Replay: (100, 70) -> 85 +- 21.21; + realign: (100, 90) -> 95 +- 7.07
    assert "| Replay | Replay + Realign | +10.00 / -14.14 |" in md
    assert "| Merge only | \u2713 | \u2717 | 95.00 \u00b1 7.07 | 90.00 |" in md
    assert "| MERA (10%) | \u2713 | \u2713 | 100.00 \u00b1 0.00 | 100.00 |" in md
    assert "| Fine-Tuning | 12.3 | 700 | 1.23 | 650 | 1.500 |" in md
    assert "process peak RSS" in md


def test_report_command_reads_efficiency_next_to_scores(tmp_path, capsys):
    import json

    from mera.errors import DataError
    from mera.eval.report import report_command

    path = _ablation_table(tmp_path)
    (tmp_path / "efficiency.json").write_text(json.dumps({"MERA (10%)": {"train_seconds": 3.0, "memory_kind": "cuda"}}))
    report_command([str(path)])
    out = capsys.readouterr().out
    assert "| MERA (10%) | 3.0 | \u2013 |" in out and "GPU peak allocated" in out
    (tmp_path / "efficiency.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="efficiency.json"):
        report_command([str(path)])
