"""The paired bootstrap over seeds and items: degenerate data, the point estimate, pairing, coverage, items.csv."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mera.errors import DataError
from mera.eval.bootstrap import (
    COLUMNS,
    ItemScore,
    bootstrap_cells,
    bootstrap_differences,
    read_items,
    resample,
    write_items,
)
from mera.eval.cl_metrics import backward_transfer, cl_metrics_of_rows, table_matrix
from mera.eval.metrics import ScoreRow, last_stage_bw, run_metrics

# image has two caption data sets, video one; two orders
DATASETS = {"image": ["coco", "flickr"], "video": ["msr"]}
ORDERS = {"iv": ["image", "video"], "vi": ["video", "image"]}


def make_items(seeds, methods, score, expert, n=20, orders=ORDERS, datasets=DATASETS, task="caption"):
    """Items of every seed / method / order / stage / modality-seen-so-far / dataset, plus each seed's expert.

    ``score(seed, method, order, stage, modality, dataset, k)`` and ``expert(seed, modality, dataset, k)``
    give item k's score."""
    items = []
    for s in seeds:
        for mod, names in datasets.items():
            for d in names:
                items += [ItemScore(s, "expert", "iv", None, mod, d, task, f"q{k}", expert(s, mod, d, k)) for k in range(n)]
        for m in methods:
            for o, mods in orders.items():
                for i in range(1, len(mods) + 1):
                    for mod in mods[:i]:
                        for d in datasets[mod]:
                            items += [ItemScore(s, m, o, i, mod, d, task, f"q{k}", score(s, m, o, i, mod, d, k))
                                      for k in range(n)]
    return items


def means_as_rows(items):
    """The scores table of the items' plain means (computed here, independently of the module)."""
    acc: dict[tuple, list[float]] = {}
    for it in items:
        acc.setdefault((it.method, it.order, it.stage, it.modality, it.dataset, it.task, it.seed), []).append(it.score)
    return [ScoreRow(m, o, st, mod, d, t, sum(v) / len(v), seed=s) for (m, o, st, mod, d, t, s), v in acc.items()]


def noisy(seed_base=0):
    rng = np.random.default_rng(seed_base)
    table: dict[tuple, float] = {}

    def score(*key):
        return table.setdefault(key, float(rng.uniform(5, 95)))
    return score


def test_one_seed_and_equal_items_collapse_the_interval():
    # every item of a (method, order, stage, dataset) has the same score: each resample has the same means
    items = make_items([0], ["A"], lambda s, m, o, i, mod, d, k: 30.0 + 10 * i + len(d) + len(o),
                       lambda s, mod, d, k: 60.0 + len(d))
    cells = bootstrap_cells(items, B=300, seed=1)["methods"]["A"]
    estimates = [cells["last_bw"], cells["bw_mean"]]
    for order in ORDERS:
        c = cells["orders"][order]
        estimates += [c["last_bw"], c["bw_mean"], *c["bw_rg"], *c["fw_rg"]]
    for e in estimates:
        assert e.low == pytest.approx(e.point, rel=1e-12) and e.high == pytest.approx(e.point, rel=1e-12)
        assert e.n == 300
    assert cells["orders"]["iv"]["bw_rg"][0].point == 100.0  # stage 1 by definition


def test_point_estimate_is_the_plain_metric_of_the_means():
    score, expert = noisy(1), noisy(2)
    items = make_items([0, 1, 2], ["A", "B"], lambda *k: score(*k), lambda *k: expert(*k), n=15)
    rows = means_as_rows(items)
    runs = run_metrics(rows)
    cells = bootstrap_cells(items, B=50, seed=0)["methods"]
    headline = last_stage_bw(runs)  # per seed over the orders, then over the seeds
    for m in ("A", "B"):
        assert cells[m]["last_bw"].point == pytest.approx(headline[m], rel=1e-12)
        for o in ORDERS:
            mine = [r for r in runs if r.method == m and r.order == o]
            got = cells[m]["orders"][o]
            assert got["last_bw"].point == pytest.approx(np.mean([r.bw_rg[-1] for r in mine]), rel=1e-12)
            assert got["bw_mean"].point == pytest.approx(np.mean([r.bw_mean for r in mine]), rel=1e-12)
            assert [e.point for e in got["fw_rg"]] == pytest.approx(np.mean([r.fw_rg for r in mine], axis=0), rel=1e-12)
            assert [e.point for e in got["bw_rg"]] == pytest.approx(np.mean([r.bw_rg for r in mine], axis=0), rel=1e-12)
            assert got["last_bw"].low < got["last_bw"].point < got["last_bw"].high


def test_user_statistics_on_the_aggregated_table():
    score, expert = noisy(3), noisy(4)
    items = make_items([5], ["A", "B"], lambda *k: score(*k), lambda *k: expert(*k), n=10)
    stats = {"bwt_A_iv": lambda t: backward_transfer(table_matrix(t, "A", "iv")),
             "gap": lambda t: t[("last_bw", "B", None)] - t[("last_bw", "A", None)]}
    rep = resample(items, B=200, seed=7, statistics=stats)
    want = cl_metrics_of_rows(means_as_rows(items))[("A", "iv", 5)].bwt
    assert rep.estimate("bwt_A_iv").point == pytest.approx(want, rel=1e-12)
    diff = bootstrap_differences([("B", "A")], rep)[("B", "A")]
    gap = rep.estimate("gap")
    assert (gap.point, gap.low, gap.high) == pytest.approx((diff.point, diff.low, diff.high))
    assert gap.p is None and 0 < diff.p <= 1
    a_point = rep.point[rep.keys.index(("last_bw", "A", None))]
    assert rep.estimate("gap", minus=("last_bw", "A", None)).point == pytest.approx(gap.point - a_point)


def test_pairing_a_constant_shift_gives_a_point_interval_for_the_difference():
    rng = np.random.default_rng(5)
    base: dict[tuple, float] = {}
    experts = {"coco": 100.0, "flickr": 80.0, "msr": 50.0}  # the same constant on every item and seed

    def score(s, m, o, i, mod, d, k):
        x = base.setdefault((s, o, i, mod, d, k), float(rng.uniform(10, 60)))
        return x + (5.0 if m == "B" else 0.0)  # B = A + 5 on every item
    items = make_items([1, 2], ["A", "B"], score, lambda s, mod, d, k: experts[d], n=30)
    # last-stage BW difference, c = 5:
    #   order iv (old modality image): 100 * (5/100 + 5/80) / 2 = 100 * (0.05 + 0.0625) / 2 = 5.625
    #   order vi (old modality video): 100 * 5/50 = 10
    #   over the orders: (5.625 + 10) / 2 = 7.8125, the same on every seed and every replicate
    rep = resample(items, B=400, seed=3)
    (diff,) = bootstrap_differences([("B", "A")], rep).values()
    assert (diff.point, diff.low, diff.high) == pytest.approx((7.8125,) * 3, abs=1e-9)
    assert diff.p == 1 / 400 and diff.n == 400  # every replicate above 0: floored at 1/B
    assert bootstrap_differences([("A", "B")], rep)[("A", "B")].high == pytest.approx(-7.8125, abs=1e-9)
    by_order = {o: bootstrap_differences([("B", "A")], rep, order=o)[("B", "A")] for o in ORDERS}
    assert (by_order["iv"].low, by_order["iv"].high) == pytest.approx((5.625, 5.625), abs=1e-9)
    assert (by_order["vi"].low, by_order["vi"].high) == pytest.approx((10.0, 10.0), abs=1e-9)
    # bw_mean of order iv: stages (100, RG) -> the difference halves: 2.8125
    mean_iv = bootstrap_differences([("B", "A")], rep, statistic="bw_mean", order="iv")[("B", "A")]
    assert (mean_iv.low, mean_iv.high) == pytest.approx((2.8125, 2.8125), abs=1e-9)
    # while each method alone, resampled, varies a lot
    for m in ("A", "B"):
        e = rep.estimate(("last_bw", m, None))
        assert e.high - e.low > 2.0
    # a method against itself: d = 0 on every replicate, p = 1
    assert bootstrap_differences([("A", "A")], rep)[("A", "A")].p == 1.0


def test_the_expert_is_resampled_with_the_same_items():
    rng = np.random.default_rng(6)
    expert: dict[tuple, float] = {}

    def e(s, mod, d, k):
        return expert.setdefault((s, mod, d, k), float(rng.uniform(1, 100)))
    # every score is 0.9 x the expert's on the same item: any paired resample keeps RG at exactly 90
    items = make_items([0, 1], ["A"], lambda s, m, o, i, mod, d, k: 0.9 * e(s, mod, d, k), e, n=25)
    got = bootstrap_cells(items, B=300, seed=2)["methods"]["A"]["last_bw"]
    assert (got.point, got.low, got.high) == pytest.approx((90.0, 90.0, 90.0), rel=1e-12)


def test_same_seed_same_numbers():
    score, expert = noisy(8), noisy(9)
    items = make_items([0, 1], ["A"], lambda *k: score(*k), lambda *k: expert(*k), n=8)
    a, b, c = (resample(items, B=100, seed=s) for s in (11, 11, 12))
    np.testing.assert_array_equal(a.draws, b.draws)
    assert not np.array_equal(a.draws, c.draws)


def test_coverage_on_normal_data():
    """300 items ~ N(60, 20), expert 100 on every item: last-stage BW = the items' mean, truth 60."""
    orders, datasets = {"xy": ["x", "y"]}, {"x": ["dx"], "y": ["dy"]}
    rng = np.random.default_rng(2024)
    covered, reps = 0, 200
    for r in range(reps):
        draws = np.clip(rng.normal(60, 20, size=300), 0, None)
        items = make_items([0], ["A"], lambda s, m, o, i, mod, d, k, x=draws: float(x[k]) if (i, mod) == (2, "x") else 50.0,
                           lambda s, mod, d, k: 100.0, n=300, orders=orders, datasets=datasets)
        e = bootstrap_cells(items, B=400, seed=r)["methods"]["A"]["last_bw"]
        assert e.point == pytest.approx(draws.mean() * 100 / 100)
        covered += e.low <= 60 <= e.high
    assert 0.90 * reps <= covered <= 0.99 * reps, covered


# ----------------------------------------------------------------------------- items.csv


def test_items_csv_round_trip(tmp_path):
    items = make_items([None], ["A"], lambda s, m, o, i, mod, d, k: 1.0 / (k + 3), lambda s, mod, d, k: 0.5, n=3)
    items.append(ItemScore(7, "A, with comma", "iv", 1, "image", "coco", "qa", 'id "7"', 0.25))
    path = tmp_path / "items.csv"
    write_items(path, items)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    back = read_items(path)
    assert [(b.seed, b.method, b.order, b.stage, b.modality, b.dataset, b.task, b.item, b.score) for b in back] == \
        [(a.seed, a.method, a.order, a.stage, a.modality, a.dataset, a.task, a.item, a.score) for a in items]
    assert back[1].where == f"{path}, line 3"
    assert not [p for p in tmp_path.iterdir() if p.name != "items.csv"]  # no temporary file left


GOOD = "seed,method,order,stage,modality,dataset,task,item,score\n0,expert,iv,,image,coco,caption,q1,80\n"


@pytest.mark.parametrize("line, problem", [
    ("0,A,iv,1,image,coco,caption,q1,abc", "not a number"),
    ("0,A,iv,1,image,coco,caption,q1,inf", r"'inf' is not a number in \[0, inf\]"),
    ("0,A,iv,1,image,coco,caption,q1", "8 fields"),
    ('0,A,iv,1,image,coco,caption,"q1,1', "not CSV|fields"),
    ("0,A,iv,0,image,coco,caption,q1,1", "positive integer"),
    ("0,expert,iv,2,image,coco,caption,q2,1", "empty stage"),
    ("0,A,iv,1,image,vqa,qa,q1,1.5", r"in \[0, 1\]"),
    ("x,A,iv,1,image,coco,caption,q1,1", "seed"),
    ("0,A,iv,1,image,coco,essay,q1,1", "task"),
    ("0,A,iv,1,image,coco,caption,,1", "empty item"),
    ("0,A,iv,1,image,coco,caption,q1,-2", r"-2' is not a number in \[0, inf\]"),
])
def test_malformed_items_csv_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "items.csv"
    path.write_text(GOOD + line + "\n")
    with pytest.raises(DataError, match=problem) as err:
        read_items(path)
    assert str(err.value).startswith(f"{path}, line 3:")


def test_bad_header_empty_and_missing_file(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("seed,method,order,stage,modality,dataset,task,score\n")
    with pytest.raises(DataError, match=r"items.csv, line 1: header"):
        read_items(path)
    path.write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_items(path)
    with pytest.raises(DataError, match="(?i)nope.csv: cannot read .*no such file"):
        read_items(tmp_path / "nope.csv")


def test_design_errors_name_the_line():
    items = make_items([0], ["A"], lambda *k: 10.0, lambda *k: 20.0, n=4)
    items = [ItemScore(*[getattr(it, f) for f in ("seed", "method", "order", "stage", "modality", "dataset", "task",
                                                  "item", "score")], "items.csv", n + 2) for n, it in enumerate(items)]
    with pytest.raises(DataError, match=r"items.csv, line \d+: 3 items, not the 4 of the expert at items.csv, line 2;"):
        bootstrap_cells([it for it in items if not (it.method == "A" and it.item == "q3" and it.stage == 2)], B=10)
    dup = dataclasses.replace(items[-1], line=999)
    first = rf"\(first at items.csv, line {items[-1].line}\)"
    with pytest.raises(DataError, match=rf"items.csv, line 999: item 'q3' repeated {first}"):
        bootstrap_cells(items + [dup], B=10)
    mixed = ItemScore(0, "A", "iv", 1, "image", "coco", "qa", "q9", 0.5, "items.csv", 99)
    with pytest.raises(DataError, match="items.csv, line 99: task 'qa', but 'caption' at items.csv, line"):
        bootstrap_cells(items + [mixed], B=10)
    with pytest.raises(DataError, match="no expert"):
        bootstrap_cells([it for it in items if not (it.method == "expert" and it.modality == "video")], B=10)


def test_undefined_replicates_are_left_out():
    # expert items of dx 1, 0, 0 (QA): a resample of only zeros has no upper bound -> that replicate is dropped
    items = make_items([0], ["A"], lambda *k: 0.5, lambda s, mod, d, k: 1.0 if k == 0 or d == "dy" else 0.0, n=3,
                       task="qa", orders={"xy": ["x", "y"]}, datasets={"x": ["dx"], "y": ["dy"]})
    e = bootstrap_cells(items, B=500, seed=4)["methods"]["A"]["last_bw"]
    # P(no item 0 among 3 draws) = (2/3)^3 = 0.296: about 352 of 500 replicates remain
    assert 300 < e.n < 400 and e.low <= e.point <= e.high
    # a method without seed 2: replicates that drew only seed 2 (1/27 of them) leave it out
    score, expert = noisy(10), noisy(11)
    both = make_items([0, 1, 2], ["A"], lambda *k: score(*k), lambda *k: expert(*k), n=5)
    both += [dataclasses.replace(it, method="B") for it in both if it.method == "A" and it.seed != 2]
    rep = resample(both, B=2000, seed=5)
    assert rep.estimate(("last_bw", "A", None)).n == 2000
    assert 2000 * 0.95 < rep.estimate(("last_bw", "B", None)).n < 2000
