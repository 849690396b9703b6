"""Holm's step-down correction: a hand-worked family, the step-down rule it encodes, statsmodels, labels."""

from __future__ import annotations

import numpy as np
import pytest

from mera.eval.multiple import EXPLORATORY, PRIMARY, holm, holm_adjust, label_comparisons

# n = 4, raw p in input order: 0.01, 0.04, 0.03, 0.005
# sorted: 0.005 (#3), 0.01 (#0), 0.03 (#2), 0.04 (#1); multipliers 4, 3, 2, 1
#   4 * 0.005 = 0.02; 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; 1 * 0.04 = 0.04
# running maximum: 0.02, 0.03, 0.06, 0.06   (0.04 is lifted to 0.06: monotone)
# back in input order: #0 0.03, #1 0.06, #2 0.06, #3 0.02
# at alpha 0.05: reject #0 and #3; #2 fails (0.06) and the step-down stops, so #1 is kept although 0.04 < 0.05
RAW = [0.01, 0.04, 0.03, 0.005]
ADJ = [0.03, 0.06, 0.06, 0.02]


def test_hand_worked_family():
    adjusted, rejected = holm(RAW, alpha=0.05)
    np.testing.assert_allclose(adjusted, ADJ, rtol=1e-12)
    assert rejected.tolist() == [True, False, False, True]


def test_capped_at_one_and_monotone():
    # 2 * 0.7 = 1.4 -> 1; max(1, 0.8) = 1
    np.testing.assert_allclose(holm_adjust([0.8, 0.7]), [1.0, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(100):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 12)))
        adj = holm_adjust(p)
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= 0)
        assert np.all(adj >= p) and np.all(adj <= 1)


def _step_down(p, alpha):
    """The procedure as Holm states it: walk the sorted p-values, reject while p_(i) <= alpha/(n-i+1)."""
    n = len(p)
    reject = [False] * n
    for rank, i in enumerate(sorted(range(n), key=lambda k: p[k])):
        if p[i] > alpha / (n - rank):
            break
        reject[i] = True
    return reject


def test_adjusted_p_rejections_equal_the_step_down_rule():
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = rng.uniform(0, 0.1, size=int(rng.integers(1, 10))).round(3)  # rounding makes ties
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        assert holm(p, alpha)[1].tolist() == _step_down(list(p), alpha)


def test_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest", reason="statsmodels is not installed here")
    rng = np.random.default_rng(2)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 15)))
        reject, adjusted, _, _ = multitest.multipletests(p, alpha=0.05, method="holm")
        np.testing.assert_allclose(holm_adjust(p), adjusted, rtol=1e-12)
        assert holm(p, 0.05)[1].tolist() == list(reject)


@pytest.mark.parametrize("bad", [[0.1, float("nan")], [1.5], [-0.01]])
def test_bad_p_values(bad):
    with pytest.raises(ValueError, match="p-value"):
        holm_adjust(bad)


def test_empty_family():
    assert holm_adjust([]).size == 0


def test_labels_primary_family_only():
    pvalues = {("A", "B"): 0.01, ("A", "C"): 0.04, ("B", "C"): 0.03, ("A", "D"): 0.005, ("C", "D"): 0.002}
    labels = label_comparisons(pvalues, primary=[("A", "B"), ("A", "C"), ("B", "C"), ("A", "D")])
    # the family is the hand-worked one above; ("C", "D") stays out of it and is not corrected
    assert [labels[k].p_adjusted for k in [("A", "B"), ("A", "C"), ("B", "C"), ("A", "D")]] == pytest.approx(ADJ)
    assert [labels[k].reject for k in [("A", "B"), ("A", "C"), ("B", "C"), ("A", "D")]] == [True, False, False, True]
    assert all(labels[k].kind == PRIMARY for k in [("A", "B"), ("A", "C"), ("B", "C"), ("A", "D")])
    explore = labels[("C", "D")]
    assert explore.kind == EXPLORATORY and explore.p == 0.002
    assert explore.p_adjusted is None and explore.reject is None
    assert explore.as_json() == {"kind": "exploratory", "p": 0.002, "p_adjusted": None, "reject": None}


def test_family_size_changes_the_correction():
    pvalues = {"x": 0.02, "y": 0.5}
    assert label_comparisons(pvalues, ["x"])["x"].p_adjusted == pytest.approx(0.02)
    assert label_comparisons(pvalues, ["x", "y"])["x"].p_adjusted == pytest.approx(0.04)
    assert label_comparisons(pvalues, [])["x"].kind == EXPLORATORY


def test_declared_comparison_without_p_value():
    with pytest.raises(ValueError, match="'z'"):
        label_comparisons({"x": 0.1}, ["x", "z"])
