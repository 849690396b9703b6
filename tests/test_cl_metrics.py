"""Last / Avg / BWT / Forgetting: two matrices worked by hand, the invariants, and the scores-table path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hand_tables import HAND

from mera.errors import DataError
from mera.eval.cl_metrics import (
    accuracy_matrix,
    as_matrix,
    average_incremental_accuracy,
    backward_transfer,
    cl_metrics,
    cl_metrics_of_rows,
    cl_metrics_of_run,
    forgetting,
    last_accuracy,
    table_matrix,
)
from mera.eval.metrics import parse_scores, run_metrics

NAN = float("nan")

# 3 x 3: the RG_j^i of the hand table of test_metrics.py (image, video, audio).
A3 = [[90, NAN, NAN],
      [60, 80, NAN],
      [75, 90, 50]]
# Last = (75 + 90 + 50) / 3 = 215/3 = 71.666...
# Avg  = (90 + (60 + 80)/2 + 215/3) / 3 = (90 + 70 + 71.666...) / 3 = 231.666.../3 = 77.222...
# BWT  = ((75 - 90) + (90 - 80)) / 2 = (-15 + 10) / 2 = -2.5
# F    = (max(90, 60) - 75 + max(80) - 90) / 2 = (15 - 10) / 2 = 2.5   (video got better: negative term)

# 4 x 4 where column 1 peaks after its own stage (85 at stage 3 > 80 on the diagonal).
A4 = [[80, None, None, None],
      [70, 90, None, None],
      [85, 60, 70, None],
      [50, 75, 40, 95]]
# Last = (50 + 75 + 40 + 95) / 4 = 260/4 = 65
# Avg  = (80 + (70+90)/2 + (85+60+70)/3 + 65) / 4 = (80 + 80 + 215/3 + 65) / 4 = (890/3) / 4 = 890/12 = 74.1666...
# BWT  = ((50-80) + (75-90) + (40-70)) / 3 = (-30 - 15 - 30) / 3 = -25
# F    = ((max(80,70,85) - 50) + (max(90,60) - 75) + (70 - 40)) / 3 = (35 + 15 + 30) / 3 = 80/3 = 26.666...


def test_three_by_three_by_hand():
    got = cl_metrics(A3, ["image", "video", "audio"])
    assert got.last == pytest.approx(215 / 3)
    assert got.avg == pytest.approx((90 + 70 + 215 / 3) / 3)
    assert got.avg == pytest.approx(77.2222222222)
    assert got.bwt == pytest.approx(-2.5)
    assert got.forgetting == pytest.approx(2.5)
    assert got.modalities == ("image", "video", "audio")
    assert got.num_stages == 3


def test_four_by_four_by_hand():
    assert last_accuracy(A4) == pytest.approx(65.0)
    assert average_incremental_accuracy(A4) == pytest.approx(890 / 12)
    assert backward_transfer(A4) == pytest.approx(-25.0)
    assert forgetting(A4) == pytest.approx(80 / 3)
    # the column that peaked late makes F larger than -BWT
    assert forgetting(A4) > -backward_transfer(A4)


def test_entries_above_the_diagonal_are_ignored():
    filled = [list(map(lambda v: 999.0 if v is None else v, r)) for r in A4]
    assert cl_metrics(filled).as_json() == cl_metrics(A4).as_json()
    assert np.isnan(as_matrix(filled)[0, 1])


def test_one_stage_has_no_transfer():
    got = cl_metrics([[70.0]])
    assert got.last == 70.0 and got.avg == 70.0
    assert math.isnan(got.bwt) and math.isnan(got.forgetting)
    assert got.as_json()["bwt"] is None


@pytest.mark.parametrize("bad", [[], [[1, 2]], [[1, NAN], [NAN, 2]], [[1, None], [2]]])
def test_bad_matrices(bad):
    with pytest.raises(ValueError):
        cl_metrics(bad)


def _random_lower(rng, m):
    a = np.full((m, m), np.nan)
    for i in range(m):
        a[i, : i + 1] = rng.uniform(0, 120, size=i + 1)
    return a


def test_scores_that_only_fall_give_bwt_below_zero_and_forgetting_above():
    rng = np.random.default_rng(3)
    for _ in range(200):
        m = int(rng.integers(2, 7))
        a = _random_lower(rng, m)
        for j in range(m):  # each column non-increasing from its diagonal down
            a[j:, j] = np.sort(a[j:, j])[::-1]
        got = cl_metrics(a)
        assert got.bwt <= 0
        assert got.forgetting >= 0
        # the maximum of each column is then its diagonal: F is exactly -BWT
        assert got.forgetting == pytest.approx(-got.bwt, abs=1e-9)


def test_forgetting_is_at_least_minus_bwt_and_equal_when_columns_peak_on_the_diagonal():
    rng = np.random.default_rng(4)
    strict = 0
    for _ in range(200):
        m = int(rng.integers(2, 6))
        a = _random_lower(rng, m)
        got = cl_metrics(a)
        assert got.forgetting >= -got.bwt - 1e-9
        strict += got.forgetting > -got.bwt + 1e-9
        for j in range(m):  # raise each diagonal above its column (values below may still rise and fall)
            a[j, j] = np.nanmax(a[j:, j]) + 1
        peaked = cl_metrics(a)
        assert peaked.forgetting == pytest.approx(-peaked.bwt, abs=1e-9)
    assert strict > 0  # the inequality is not always an equality


def test_from_a_scores_table_matches_the_papers_metrics():
    rows = parse_scores(HAND.splitlines(keepends=True), source="hand.csv")
    got = cl_metrics_of_rows(rows)
    assert list(got) == [("M", "o", None)]
    cl = got[("M", "o", None)]
    np.testing.assert_allclose(cl.matrix, np.array(A3, dtype=float), equal_nan=True)
    assert cl.modalities == ("image", "video", "audio")
    assert cl.bwt == pytest.approx(-2.5)
    run = run_metrics(rows)[0]
    # Last = ((m-1) * BW_m + FW_m) / m
    assert cl.last == pytest.approx((2 * run.bw_rg[-1] + run.fw_rg[-1]) / 3)
    assert cl_metrics_of_run(run).as_json() == cl.as_json()
    assert accuracy_matrix(run).shape == (3, 3)


def test_a_bad_table_is_a_data_error_naming_the_file():
    text = HAND.replace("expert,o,,audio,A,caption,10\n", "")
    with pytest.raises(DataError, match="hand.csv"):
        cl_metrics_of_rows(parse_scores(text.splitlines(keepends=True), source="hand.csv"))


def test_matrix_from_a_statistics_table():
    # the keys a bootstrap replicate uses; columns follow the stage each modality first appears at
    mods = ["image", "video", "audio"]
    table = {("rg", "M", "o", i + 1, mods[j]): A3[i][j] for i in range(3) for j in range(i + 1)}
    table.update({("rg", "N", "o", 1, "video"): 1.0, "a user statistic": 5.0, ("bw", "M", "o", 2): 60.0})
    np.testing.assert_allclose(table_matrix(table, "M", "o"), np.array(A3, dtype=float), equal_nan=True)
    assert table_matrix(table, "N", "o").tolist() == [[1.0]]
