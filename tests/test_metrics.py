"""Metrics: the paper's Table 2 from its raw scores, hand-computed tables, and every error case."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mera.errors import DataError
from mera.eval.metrics import (
    LEGACY_COLUMNS,
    ScoreRow,
    backward_rg,
    check_unique,
    expert_table,
    find_expert,
    forward_rg,
    last_stage_bw,
    mean_std,
    modality_schedule,
    parse_scores,
    read_scores,
    relative_gain,
    relative_gains,
    run_metrics,
    summarize,
)

FIXTURE = Path(__file__).parent / "data" / "paper_sequential_scores.csv"
HEADER = ",".join(LEGACY_COLUMNS)  # these tables are in the first release's format, without the seed column
from hand_tables import HAND, PAPER_TABLE2, write  # noqa: E402

# A hand table. Experts: image MSCOCO 100 (caption), image VQA 0.5 (qa), video V 50, audio A 10.
# Run M / o:
#   stage 1 (image): RG_img = (80/100 + 0.5/0.5)/2 = (0.8 + 1.0)/2 = 90%
#   stage 2 (video): RG_img = (60/100 + 0.3/0.5)/2 = (0.6 + 0.6)/2 = 60%; RG_vid = 40/50 = 80%
#                    BW = RG_img = 60; FW = RG_vid = 80
#   stage 3 (audio): RG_img = (70/100 + 0.4/0.5)/2 = (0.7 + 0.8)/2 = 75%; RG_vid = 45/50 = 90%;
#                    RG_aud = 5/10 = 50%; BW = (75 + 90)/2 = 82.5; FW = 50
#   BW = [100, 60, 82.5]: mean = 242.5/3 = 80.8333...; deviations 19.1667, -20.8333, 1.6667;
#   squares 367.36 + 434.03 + 2.78 = 804.17; / (3-1) = 402.08; sqrt = 20.052
# File lines: 1 header, 2-5 experts, 6-7 stage 1, 8-10 stage 2 (10 = video), 11-14 stage 3.




def rows_of(text: str, source: str = "t.csv") -> list[ScoreRow]:
    return parse_scores(text.splitlines(keepends=True), source=source)


# ----------------------------------------------------------------------------- the paper




def test_reproduces_paper_table2_sequential_column():
    result = summarize(read_scores([FIXTURE]))
    got = {e["method"]: (e["bw_mean"], e["bw_std"]) for e in result["summary"]}
    assert list(got) == list(PAPER_TABLE2)  # first-appearance order, expert excluded
    for method, (mean, std) in PAPER_TABLE2.items():
        assert round(got[method][0], 2) == pytest.approx(mean, abs=0.005), method
        assert round(got[method][1], 2) == pytest.approx(std, abs=0.005), method
    mera10 = next(e for e in result["summary"] if e["method"] == "MERA (10%)")
    assert round(mera10["bw_rg"][3], 2) == pytest.approx(102.17, abs=0.005)
    assert result["last_stage_bw"]["MERA (10%)"] == pytest.approx(102.17, abs=0.005)


def test_paper_fine_tuning_stage2_by_hand():
    # Fine-Tuning stage 2, old modality image: (54.52/100.76 + 0.172/0.358)/2
    #   = (0.541088 + 0.480447)/2 = 0.510768 -> 51.08%
    # Forward (video): (130.22/138.39 + 0.555/0.46)/2 = (0.940964 + 1.206522)/2 = 1.073743 -> 107.37%
    run = next(r for r in run_metrics(read_scores(FIXTURE)) if r.method == "Fine-Tuning")
    assert run.modalities == ["image", "video", "audio", "point"]
    assert run.bw_rg[1] == pytest.approx(100 * (54.52 / 100.76 + 0.172 / 0.358) / 2)
    assert run.fw_rg[1] == pytest.approx(100 * (130.22 / 138.39 + 0.555 / 0.46) / 2)
    assert round(run.bw_rg[1], 2) == 51.08 and round(run.fw_rg[1], 2) == 107.37


# ----------------------------------------------------------------------------- formulas


def test_relative_gain():
    # (80/100 + 0.5/0.5)/2 = 0.9 -> 90%
    assert relative_gain([80, 0.5], [100, 0.5]) == pytest.approx(90.0)
    # a score above the expert gives more than 100%: 120/100 -> 120%
    assert relative_gain([120], [100]) == pytest.approx(120.0)
    with pytest.raises(ValueError):
        relative_gain([1, 2], [1])


def test_backward_rg():
    assert backward_rg({"image": 90.0}, []) == 100.0  # stage 1, by definition
    assert backward_rg({"image": 60.0, "video": 80.0}, ["image"]) == pytest.approx(60.0)
    # (75 + 90)/2 = 82.5; the new modality (audio, 50) is not averaged in
    assert backward_rg({"image": 75.0, "video": 90.0, "audio": 50.0}, ["image", "video"]) == pytest.approx(82.5)


def test_forward_rg():
    assert forward_rg({"image": 90.0}, "image", 1) == 100.0  # stage 1, by definition (not 90)
    assert forward_rg({"image": 60.0, "video": 80.0}, "video", 2) == pytest.approx(80.0)


def test_mean_std_is_sample_std():
    mean, std = mean_std([100.0, 60.0, 82.5])
    assert mean == pytest.approx(80.833333, abs=1e-5)
    assert std == pytest.approx(20.052016, abs=1e-5)  # see the HAND comment
    # two values: mean 80, std = sqrt((20^2 + 20^2)/1) = 28.2843
    assert mean_std([100.0, 60.0]) == pytest.approx((80.0, math.sqrt(800.0)))
    rng = np.random.default_rng(0)
    values = list(rng.uniform(0, 120, size=7))
    assert mean_std(values) == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    m, s = mean_std([42.0])
    assert m == 42.0 and math.isnan(s)  # undefined with n-1 = 0


def test_hand_table_all_metrics():
    (run,) = run_metrics(rows_of(HAND))
    assert (run.method, run.order) == ("M", "o")
    assert run.modalities == ["image", "video", "audio"]
    assert run.rg[0] == pytest.approx({"image": 90.0})
    assert run.rg[1] == pytest.approx({"image": 60.0, "video": 80.0})
    assert run.rg[2] == pytest.approx({"image": 75.0, "video": 90.0, "audio": 50.0})
    assert run.bw_rg == pytest.approx([100.0, 60.0, 82.5])
    assert run.fw_rg == pytest.approx([100.0, 80.0, 50.0])
    assert run.bw_mean == pytest.approx(242.5 / 3)
    assert run.bw_std == pytest.approx(20.052016, abs=1e-5)
    assert run.datasets == {"image": ["MSCOCO", "VQA"], "video": ["V"], "audio": ["A"]}


def test_accuracy_matrix_has_none_for_unseen():
    (run,) = run_metrics(rows_of(HAND))
    matrix = run.accuracy_matrix()
    assert [[None if v is None else round(v, 6) for v in row] for row in matrix] == [
        [90.0, None, None],
        [60.0, 80.0, None],
        [75.0, 90.0, 50.0],
    ]


def test_relative_gains_and_summarize_hand():
    gains = relative_gains(rows_of(HAND))
    assert list(gains) == [("M", "o")]
    assert gains[("M", "o")][2]["audio"] == pytest.approx(50.0)
    result = summarize(rows_of(HAND))
    (entry,) = result["summary"]
    assert entry["bw_rg"] == pytest.approx([100.0, 60.0, 82.5])
    assert entry["fw_rg"] == pytest.approx([100.0, 80.0, 50.0])
    assert entry["rg"]["audio"][:2] == [None, None]
    assert entry["rg"]["image"] == pytest.approx([90.0, 60.0, 75.0])
    assert result["last_stage_bw"] == pytest.approx({"M": 82.5})


def test_two_orders_headline_and_modality_order():
    # Order r (reverse: video then image), experts shared with order o by fallback.
    #   stage 1 (video): 50/50 -> 100; stage 2 (image): RG_vid = 25/50 = 50 -> BW = 50;
    #   FW = RG_img = (100/100 + 0.25/0.5)/2 = 75.
    # Headline for M: last-stage BW of o (82.5) and r (50) averaged: (82.5 + 50)/2 = 66.25
    text = HAND + "\n".join(
        [
            "M,r,1,video,V,caption,50",
            "M,r,2,video,V,caption,25",
            "M,r,2,image,MSCOCO,caption,100",
            "M,r,2,image,VQA,qa,0.25",
        ]
    )
    runs = run_metrics(rows_of(text))
    assert [(r.method, r.order) for r in runs] == [("M", "o"), ("M", "r")]
    rev = runs[1]
    assert rev.modalities == ["video", "image"]
    assert rev.bw_rg == pytest.approx([100.0, 50.0])
    assert rev.fw_rg == pytest.approx([100.0, 75.0])
    assert last_stage_bw(runs) == pytest.approx({"M": 66.25})


def test_methods_in_order_of_first_appearance():
    text = f"""{HEADER}
expert,o,,image,I,caption,10
Zeta,o,1,image,I,caption,5
Alpha,o,1,image,I,caption,10
"""
    assert [e["method"] for e in summarize(rows_of(text))["summary"]] == ["Zeta", "Alpha"]


def test_modality_schedule():
    rows = [r for r in rows_of(HAND) if not r.is_expert]
    assert modality_schedule(rows) == ["image", "video", "audio"]
    assert modality_schedule([]) == []


# ----------------------------------------------------------------------------- experts


def test_expert_lookup_prefers_same_order_then_agreeing_fallback():
    text = f"""{HEADER}
expert,o1,,image,I,caption,10
expert,o2,,image,I,caption,20
expert,o3,,video,V,caption,40
expert,o4,,video,V,caption,40
"""
    experts = expert_table(rows_of(text))

    def row(order, modality, dataset):
        return ScoreRow("M", order, 1, modality, dataset, "caption", 5.0, "t.csv", 9)

    assert find_expert(experts, row("o2", "image", "I")).score == 20  # same order preferred
    assert find_expert(experts, row("o9", "video", "V")).score == 40  # others agree
    with pytest.raises(DataError, match="disagree"):
        find_expert(experts, row("o9", "image", "I"))  # 10 vs 20


def test_fallback_expert_gives_rg():
    # The run is in order "rev" but the experts are only in order "seq": 5/10 -> 50%
    text = f"""{HEADER}
expert,seq,,image,I,caption,10
M,rev,1,image,I,caption,5
M,rev,2,image,I,caption,5
M,rev,2,video,V,caption,5
expert,seq,,video,V,caption,20
"""
    (run,) = run_metrics(rows_of(text))
    assert run.rg[1] == pytest.approx({"image": 50.0, "video": 25.0})


# ----------------------------------------------------------------------------- reading


def test_read_scores_concatenates_and_remembers_lines(tmp_path):
    lines = HAND.strip().splitlines()
    a = write(tmp_path, "\n".join(lines[:5]) + "\n", "a.csv")  # header + experts
    b = write(tmp_path, "\n".join([lines[0]] + lines[5:]) + "\n", "b.csv")
    rows = read_scores([a, b])
    assert len(rows) == 13  # 4 experts + 9 method rows
    assert rows[0].source == str(a) and rows[0].line == 2
    assert rows[4].source == str(b) and rows[4].line == 2 and rows[4].method == "M"
    assert rows[4].stage == 1 and rows[0].stage is None
    assert run_metrics(rows)[0].bw_rg == pytest.approx([100.0, 60.0, 82.5])


def test_read_fixture_shape():
    rows = read_scores(FIXTURE)
    assert len(rows) == 148
    assert sum(r.is_expert for r in rows) == 8
    assert rows[0] == ScoreRow("expert", "sequential", None, "image", "MSCOCO", "caption", 100.76, str(FIXTURE), 2)


def test_header_columns_may_be_reordered_and_blank_lines_skipped():
    text = "score,task,dataset,modality,stage,order,method\n10,caption,I,image,,o,expert\n\n5,caption,I,image,1,o,M\n"
    (run,) = run_metrics(rows_of(text))
    assert run.rg[0] == pytest.approx({"image": 50.0})


# ----------------------------------------------------------------------------- errors


def error_of(tmp_path, text: str) -> str:
    path = write(tmp_path, text, "bad.csv")
    with pytest.raises(DataError) as info:
        run_metrics(read_scores([path]))
    message = str(info.value)
    assert str(path) in message  # every error names the file
    return message


def test_error_missing_expert(tmp_path):
    text = HAND.replace("expert,o,,video,V,caption,50\n", "")
    message = error_of(tmp_path, text)
    assert "no expert row" in message and "'video'" in message and "'V'" in message
    # line 9: the video row, one line up since the expert line was removed
    assert "line 9" in message and "M,o,,2,video,V,caption,40" in message  # as_csv: the seed column (empty) after order


def test_error_duplicate_row(tmp_path):
    message = error_of(tmp_path, HAND + "M,o,2,video,V,caption,41\n")
    assert "duplicated" in message and "line 15" in message and "line 10" in message


def test_error_duplicate_expert_row(tmp_path):
    message = error_of(tmp_path, HAND + "expert,o,,audio,A,caption,10\n")
    assert "duplicated" in message and "line 5" in message


def test_error_duplicate_across_files(tmp_path):
    a = write(tmp_path, HAND, "a.csv")
    b = write(tmp_path, f"{HEADER}\nM,o,1,image,VQA,qa,0.4\n", "b.csv")
    with pytest.raises(DataError) as info:
        check_unique(read_scores([a, b]))
    assert f"{b}, line 2" in str(info.value) and f"{a}, line 7" in str(info.value)


def test_error_stage_skips_a_modality(tmp_path):
    # stage 3 has no video rows although video is present at stage 2
    message = error_of(tmp_path, HAND.replace("M,o,3,video,V,caption,45\n", ""))
    assert "stage 3" in message and "'video'" in message


def test_error_stage_introduces_no_modality(tmp_path):
    text = HAND + "M,o,4,image,MSCOCO,caption,70\nM,o,4,image,VQA,qa,0.4\nM,o,4,video,V,caption,45\nM,o,4,audio,A,caption,5\n"
    message = error_of(tmp_path, text)
    assert "stage 4 introduces no new modality" in message


def test_error_stage_introduces_two_modalities(tmp_path):
    text = HAND.replace("M,o,1,image,VQA,qa,0.5\n", "M,o,1,image,VQA,qa,0.5\nM,o,1,video,V,caption,40\n")
    message = error_of(tmp_path, text)
    assert "stage 1 introduces 2 new modalities" in message


def test_error_missing_stage_number(tmp_path):
    lines = [l for l in HAND.splitlines() if not l.startswith("M,o,2,")]
    message = error_of(tmp_path, "\n".join(lines) + "\n")
    assert "no rows for stage 2" in message and "1, 3" in message


def test_error_dataset_set_changes(tmp_path):
    message = error_of(tmp_path, HAND.replace("M,o,3,image,VQA,qa,0.4\n", ""))
    assert "stage 3" in message and "'image'" in message and "MSCOCO, VQA" in message


@pytest.mark.parametrize(
    "score,fragment",
    [("abc", "not a number"), ("-1", "negative"), ("nan", "not a finite"), ("", "empty score")],
)
def test_error_bad_score(tmp_path, score, fragment):
    message = error_of(tmp_path, HAND.replace("M,o,2,video,V,caption,40", f"M,o,2,video,V,caption,{score}"))
    assert fragment in message and "line 10" in message


def test_error_qa_score_in_percent(tmp_path):
    message = error_of(tmp_path, HAND.replace("M,o,2,image,VQA,qa,0.3", "M,o,2,image,VQA,qa,30"))
    assert "above 1" in message and "line 9" in message


def test_error_expert_score_zero(tmp_path):
    message = error_of(tmp_path, HAND.replace("expert,o,,audio,A,caption,10", "expert,o,,audio,A,caption,0"))
    assert "expert score is 0" in message and "line 5" in message


@pytest.mark.parametrize(
    "header,fragment",
    [
        ("method,order,stage,modality,dataset,score", "missing task"),
        ("method,order,stage,modality,dataset,task,score,seed,run", "unexpected 'run'"),
        ("method,order,seed,stage,modality,dataset,score", "missing task"),
        ("method,order,step,modality,dataset,task,score", "missing stage"),
    ],
)
def test_error_wrong_header(tmp_path, header, fragment):
    message = error_of(tmp_path, header + "\nM,o,1,image,I,caption,1\n")
    assert "wrong header" in message and fragment in message and "line 1" in message


def test_error_wrong_field_count(tmp_path):
    message = error_of(tmp_path, HAND + "M,o,4,point,P,caption\n")
    assert "6 fields, expected 7" in message and "line 15" in message


def test_error_stage_values(tmp_path):
    assert "not a positive integer" in error_of(tmp_path, HAND.replace("M,o,2,video", "M,o,two,video"))
    assert "not a positive integer" in error_of(tmp_path, HAND.replace("M,o,2,video", "M,o,0,video"))
    assert "not a positive integer" in error_of(tmp_path, HAND.replace("M,o,2,video", "M,o,,video"))
    assert "empty stage" in error_of(tmp_path, HAND.replace("expert,o,,audio", "expert,o,1,audio"))


def test_error_unknown_task(tmp_path):
    assert "task 'vqa'" in error_of(tmp_path, HAND.replace("M,o,2,image,VQA,qa", "M,o,2,image,VQA,vqa"))


def test_error_task_differs_from_expert(tmp_path):
    message = error_of(tmp_path, HAND.replace("M,o,2,video,V,caption,40", "M,o,2,video,V,qa,0.4"))
    assert "differs from the expert" in message


def test_error_empty_file_and_missing_file(tmp_path):
    assert "empty file" in error_of(tmp_path, "")
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="no such file"):
        read_scores([missing])


def test_metrics_do_not_import_torch():
    code = "import sys, mera.eval.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
