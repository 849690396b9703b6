"""The reviewer's statistics of metrics.json and the report: the bootstrap beside the t-intervals, the
declared primary family with Holm's correction (checked by hand on a two-method, one-order, two-seed
table), the claims checklist (each verdict flips when the numbers do), the CL metrics, the old keys
unchanged, ``mera report scores.csv items.csv``, and items.csv from a real micro run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hand_tables import HAND, write

from mera.errors import DataError
from mera.eval.bootstrap import ItemScore, write_items
from mera.eval.cl_metrics import cl_metrics_of_rows
from mera.eval.claims import checklist
from mera.eval.metrics import ScoreRow, format_rows, read_scores, run_metrics, summarize
from mera.eval.report import render_markdown, report_command, write_report
from mera.eval.stats import NO_ITEMS, Comparison, ReportSettings, report_stats

DATA = Path(__file__).parent / "data"
NEW_KEYS = {"bootstrap", "primary", "cl_metrics", "claims"}
EXPERT = 50.0  # every expert's score (caption): a score s is an RG of 2 s percent


def table(rg: dict, seeds=(0,), orders=None, n=4) -> list[ItemScore]:
    """Items with the same score on every item of a group: ``rg[(seed, method, order, stage, modality)]``
    is the relative gain in percent (the score is rg / 2 of an expert at 50); stage 1 is the expert's copy."""
    orders = orders or {"o": ["image", "video", "audio"]}
    items = []
    for s in seeds:
        for oname, mods in orders.items():
            items += [ItemScore(s, "expert", oname, None, m, f"{m}-cap", "caption", f"q{k}", EXPERT) for m in mods
                      for k in range(n)]
        methods = dict.fromkeys(k[1] for k in rg if k[0] == s)
        for meth in methods:
            for oname, mods in orders.items():
                for i in range(1, len(mods) + 1):
                    for m in mods[:i]:
                        value = 100.0 if i == 1 else rg[(s, meth, oname, i, m)]
                        items += [ItemScore(s, meth, oname, i, m, f"{m}-cap", "caption", f"q{k}", value * EXPERT / 100)
                                  for k in range(n)]
    return items


def rows_of(items: list[ItemScore]) -> list[ScoreRow]:
    acc: dict[tuple, list[float]] = {}
    for it in items:
        acc.setdefault((it.method, it.order, it.stage, it.modality, it.dataset, it.task, it.seed), []).append(it.score)
    return [ScoreRow(m, o, st, mod, d, t, sum(v) / len(v), seed=s) for (m, o, st, mod, d, t, s), v in acc.items()]


def save(tmp_path: Path, items: list[ItemScore]) -> tuple[Path, Path]:
    """scores.csv (each row the mean of its items, rounded as a run rounds it) and items.csv."""
    rows = [{"method": r.method, "order": r.order, "seed": r.seed, "stage": "" if r.stage is None else r.stage,
             "modality": r.modality, "dataset": r.dataset, "task": r.task, "score": round(r.score, 4)}
            for r in rows_of(items)]
    (tmp_path / "scores.csv").write_text(format_rows(rows))
    write_items(tmp_path / "items.csv", items)
    return tmp_path / "scores.csv", tmp_path / "items.csv"


# ----------------------------------------------------------------------------- Holm by hand

MERA, FT = "MERA (10%)", "Fine-Tuning"
# RG (%) of the old modalities; stage 2 adds video, stage 3 audio (their forward RG: 90)
#   seed 0: FT  BW2 = 80, BW3 = 60;  MERA BW2 = 20, BW3 = 72
#   seed 1: FT  BW2 = 50, BW3 = 70;  MERA BW2 = 80, BW3 = 76
# last-stage BW, MERA - FT: +12 (seed 0), +6 (seed 1): every replicate > 0
# mean BW over the stages (100, BW2, BW3), MERA - FT: (20 + 72 - 80 - 60) / 3 = -16, (80 + 76 - 50 - 70) / 3 = +12
BW = {(0, FT): (80, 60), (0, MERA): (20, 72), (1, FT): (50, 70), (1, MERA): (80, 76)}


def two_method_items() -> list[ItemScore]:
    rg = {}
    for (s, m), (bw2, bw3) in BW.items():
        rg.update({(s, m, "o", 2, "image"): bw2, (s, m, "o", 2, "video"): 90,
                   (s, m, "o", 3, "image"): bw3, (s, m, "o", 3, "video"): bw3, (s, m, "o", 3, "audio"): 90})
    return table(rg, seeds=(0, 1))


def test_primary_family_holm_by_hand(tmp_path):
    B, seed = 2000, 0
    settings = ReportSettings(bootstrap_samples=B, bootstrap_seed=seed, primary=[
        Comparison(a=MERA, b=FT), Comparison(a="mera  (10%)", b="FT", statistic="bw_mean", order="o"),
        Comparison(a=MERA, b="EWC"), Comparison(a=MERA, b=FT, order="reverse")])
    items = two_method_items()
    stats = report_stats(run_metrics(rows_of(items)), items, settings)
    # the items are alike within a group: only the seeds vary. A replicate draws 2 seeds out of (0, 1) -- the
    # generator's first draw, made here again -- so the mean-BW difference is -16 (0, 0), -2 (mixed) or +12 (1, 1)
    drawn = np.random.default_rng(seed).integers(0, 2, size=(B, 2))
    k11 = int((drawn == 1).all(axis=1).sum())
    assert 0.2 * B < k11 < 0.3 * B
    first, second = stats.primary_results()
    assert (first.a, first.b, first.statistic, first.order) == (MERA, FT, "last_stage_bw", None)
    assert first.estimate.point == pytest.approx(9.0)  # (12 + 6) / 2
    assert (first.estimate.low, first.estimate.high) == pytest.approx((6.0, 12.0))
    p1 = 1 / B  # every replicate above 0: floored at 1/B
    assert first.estimate.p == pytest.approx(p1)
    assert (second.a, second.b, second.statistic, second.order) == (MERA, FT, "bw_mean", "o")
    assert second.estimate.point == pytest.approx(-2.0)
    assert (second.estimate.low, second.estimate.high) == pytest.approx((-16.0, 12.0))
    p2 = 2 * min(k11 / B, 1 - k11 / B)
    assert second.estimate.p == pytest.approx(p2)
    # Holm over 2: the smaller p times 2, the larger times 1 (not below the first)
    assert first.label.p_adjusted == pytest.approx(2 * p1) and second.label.p_adjusted == pytest.approx(max(2 * p1, p2))
    assert (first.verdict, second.verdict) == ("holds", "inconclusive")
    obj = stats.as_json()
    assert [(d["a"], d["b"], d["reason"]) for d in obj["primary"]["dropped"]] == [
        (MERA, "EWC", "EWC is not in this run"), (MERA, FT, "the order reverse is not in this run")]
    assert obj["primary"]["declared_in"] == "report.primary in the run's config"
    assert [c["p_holm"] for c in obj["primary"]["comparisons"]] == pytest.approx([2 * p1, max(2 * p1, p2)])
    # every other difference is exploratory, with its raw p and no adjustment
    labels = {(d["statistic"], d["order"]): d for d in obj["bootstrap"]["differences"]}
    assert labels[("last_stage_bw", None)]["label"] == "primary" and labels[("bw_mean", "o")]["label"] == "primary"
    assert obj["bootstrap"]["B"] == B and obj["bootstrap"]["seed"] == seed
    # a family of one (the default: MERA (10%) against the Table 2 baselines present): no adjustment
    default = report_stats(run_metrics(rows_of(items)), items, ReportSettings(bootstrap_samples=B)).as_json()["primary"]
    (only,) = default["comparisons"]
    assert only["p_holm"] == pytest.approx(p1) and only["verdict"] == "holds"
    assert [d["b"] for d in default["dropped"]] == ["Replay (1%)", "Replay (10%)", "EWC", "PathWeave"]
    others = [d for d in report_stats(run_metrics(rows_of(items)), items, ReportSettings(bootstrap_samples=B)).as_json()
              ["bootstrap"]["differences"] if d["statistic"] == "bw_mean"]
    assert others and all(d["label"] == "exploratory" and "p_holm" not in d for d in others)


def test_two_seed_report_shows_the_bootstrap_beside_the_t_interval(tmp_path):
    scores, items_path = save(tmp_path, two_method_items())
    (tmp_path / "config.yaml").write_text("name: x\nreport:\n  bootstrap_samples: 500\n  bootstrap_seed: 3\n")
    out = tmp_path / "rep"
    metrics = write_report([str(scores)], out)  # items.csv and the report section found beside scores.csv
    assert metrics["bootstrap"]["B"] == 500 and metrics["bootstrap"]["seed"] == 3
    assert metrics["bootstrap"]["items"] == str(items_path)
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    head = lines[lines.index("## Backward relative gain (%)") + 2]
    assert head == "| method | seeds | o | last-stage BW (avg over orders) | 95% CI | bootstrap 95% CI |"
    boot = metrics["bootstrap"]["methods"][MERA]["last_stage_bw"]
    row = next(line for line in lines if line.startswith(f"| {MERA} | 2 |"))
    assert row.endswith(f"| [{boot['low']:.2f}, {boot['high']:.2f}] |")
    pair = next(line for line in lines if line.startswith(f"| {MERA} − {FT} | last-stage BW |"))
    # with two seeds the t-interval (t = 12.71) cannot tell; the bootstrap over seeds and items can: p = 1/500
    assert pair.endswith("| inconclusive | [+6.00, +12.00] | 0.0020 | primary |")
    # the new sections come after the main table, in this order, and the old ones are still there
    order = [lines.index(h) for h in ("## Backward relative gain (%)", "## Primary comparisons (Holm-corrected)",
                                      "## The paper's claims on this run", "## Continual-learning metrics",
                                      "## Paired differences", "## The paper's orderings on this run",
                                      "## Per-stage progression")]
    assert order == sorted(order)
    html = (out / "report.html").read_text()
    assert "Primary comparisons (Holm-corrected)" in html and "bootstrap 95% CI" in html


# ----------------------------------------------------------------------------- claims

ORDERS2 = {"iv": ["image", "video", "audio"], "vi": ["video", "image", "audio"]}
GRID = ["Fine-Tuning", "Replay (1%)", "Replay (10%)", "EWC", "PathWeave", "MERA (1%)", "MERA (10%)", "Merge only",
        "Realign only", "EWC + Realign"]


def grid_items(bw: dict[str, float], fw: dict[str, float], seeds=(0,), orders=ORDERS2, per_seed=None, per_order=None):
    """Every method's old modalities at ``bw[method]`` percent and its new one at ``fw[method]`` (stages 2, 3);
    ``per_seed[(seed, method)]`` / ``per_order[(order, method)]`` add to both."""
    rg = {}
    for s in seeds:
        for m in bw:
            for o, mods in orders.items():
                shift = (per_seed or {}).get((s, m), 0.0) + (per_order or {}).get((o, m), 0.0)
                for i in (2, 3):
                    for j, mod in enumerate(mods[:i]):
                        rg[(s, m, o, i, mod)] = (fw[m] if j == i - 1 else bw[m]) + shift
    return table(rg, seeds=seeds, orders=orders)


BASE_BW = {"Fine-Tuning": 40, "Replay (1%)": 60, "Replay (10%)": 70, "EWC": 65, "PathWeave": 80, "MERA (1%)": 92,
           "MERA (10%)": 95, "Merge only": 85, "Realign only": 55, "EWC + Realign": 75}
BASE_FW = {m: 90.0 for m in BASE_BW} | {"EWC": 101.0, "PathWeave": 103.0, "MERA (10%)": 104.0}


def verdicts(items, margin=5.0, B=400) -> dict[str, str]:
    stats = report_stats(run_metrics(rows_of(items)), items, ReportSettings(bootstrap_samples=B, plasticity_margin=margin))
    return {c.key: c.verdict for c in stats.claims}


def test_every_claim_holds_on_a_run_made_to_agree():
    got = verdicts(grid_items(BASE_BW, BASE_FW))
    assert got == {"mera_best": "holds", "mera_10_above_1": "holds", "merge_realign": "holds", "realign_helps": "holds",
                   "plasticity": "holds", "forward_transfer": "holds"}


@pytest.mark.parametrize("change, claim", [
    ({"bw": {"PathWeave": 99}}, "mera_best"),  # a baseline above MERA (in both orders)
    ({"bw": {"MERA (1%)": 97}}, "mera_10_above_1"),
    ({"bw": {"Merge only": 30}}, "merge_realign"),  # merge alone below fine-tuning
    ({"bw": {"EWC + Realign": 60}}, "realign_helps"),  # realign hurts EWC
    ({"fw": {"PathWeave": 112}}, "plasticity"),  # MERA 8 points below PathWeave, outside 5
    ({"fw": {"MERA (10%)": 96}}, "forward_transfer"),  # MERA's forward RG below 100 everywhere
])
def test_each_claim_fails_when_its_numbers_do(change, claim):
    bw, fw = BASE_BW | change.get("bw", {}), BASE_FW | change.get("fw", {})
    if claim == "forward_transfer":  # keep plasticity within 5 of EWC's and PathWeave's
        fw |= {"EWC": 95.0, "PathWeave": 97.0}
    got = verdicts(grid_items(bw, fw))
    assert got[claim] == "does not hold"
    assert {k: v for k, v in got.items() if k != claim} == {k: "holds" for k in got if k != claim}


def test_mera_best_is_judged_order_by_order():
    # EWC 10 points above MERA in order vi only: the claim does not hold, though MERA wins on average
    items = grid_items(BASE_BW, BASE_FW, per_order={("vi", "EWC"): 40.0})
    stats = report_stats(run_metrics(rows_of(items)), items, ReportSettings(bootstrap_samples=200))
    claim = next(c for c in stats.claims if c.key == "mera_best")
    assert claim.verdict == "does not hold" and "MERA (10%) − EWC, last-stage BW, vi" in claim.reason
    used = {n.what: n.estimate.point for n in claim.numbers}
    assert used["MERA (10%) − EWC, last-stage BW, iv"] == pytest.approx(30.0)
    assert used["MERA (10%) − EWC, last-stage BW, vi"] == pytest.approx(-10.0)


def test_inconclusive_when_an_interval_straddles_the_bound():
    # two seeds: MERA (10%) - MERA (1%) is +3 on seed 0 and -5 on seed 1 -> replicates +3, -1, -5: the interval
    # contains 0; MERA - PathWeave's forward RG -3 and -11: its interval [-11, -3] crosses -5
    items = grid_items(BASE_BW, BASE_FW | {"PathWeave": 107.0}, seeds=(0, 1),
                       per_seed={(1, "MERA (10%)"): -8.0})
    got = verdicts(items)
    assert got["mera_10_above_1"] == "inconclusive" and got["plasticity"] == "inconclusive"


def test_claims_not_testable_say_why():
    one_order = {"iv": ORDERS2["iv"]}
    few = {m: BASE_BW[m] for m in ("Fine-Tuning", "MERA (10%)")}
    items = grid_items(few, BASE_FW, orders=one_order)
    stats = report_stats(run_metrics(rows_of(items)), items, ReportSettings(bootstrap_samples=100))
    why = {c.key: (c.verdict, c.reason) for c in stats.claims}
    assert why["mera_best"] == ("not testable in this run",
                                "the run has one order (iv); the claim is about every order the paper ran (two)")
    assert why["mera_10_above_1"] == ("not testable in this run", "MERA (1%) is not in this run")
    assert why["merge_realign"] == ("not testable in this run", "Merge only, Realign only are not in this run")
    assert why["plasticity"] == ("not testable in this run", "EWC, PathWeave are not in this run")
    assert why["forward_transfer"][0] == "holds"  # 104 at stages 2 and 3
    none = checklist(None, ["A"], ["o"], missing=NO_ITEMS)
    assert {c.verdict for c in none} == {"not testable in this run"} and {c.reason for c in none} == {NO_ITEMS}


# ----------------------------------------------------------------------------- CL metrics, old keys


def test_cl_metrics_section_means_over_orders_then_seeds():
    items = grid_items(BASE_BW, BASE_FW, seeds=(0, 1), per_seed={(1, "EWC"): 10.0}, per_order={("vi", "EWC"): -4.0})
    rows = rows_of(items)
    stats = report_stats(run_metrics(rows), None)
    ewc = stats.cl["methods"]["EWC"]
    by = cl_metrics_of_rows(rows)
    for f in ("last", "avg", "bwt", "forgetting"):
        per_seed = [np.mean([getattr(by[("EWC", o, s)], f) for o in ORDERS2]) for s in (0, 1)]
        assert ewc[f] == pytest.approx(np.mean(per_seed))
        assert ewc["over_seeds"][f]["mean"] == pytest.approx(np.mean(per_seed)) and ewc["over_seeds"][f]["n"] == 2
    # by hand, seed 0 order iv: rows (100), (65, 101), (65, 65, 101): Last = 231 / 3 = 77, Avg = (100 + 83 + 77) / 3,
    # BWT = ((65 - 100) + (65 - 101)) / 2 = -35.5, Forgetting = (35 + 36) / 2 = 35.5
    run = ewc["orders"]["iv"]["runs"][0]
    assert run["seed"] == 0 and run["matrix"] == [[100.0], [65.0, 101.0], [65.0, 65.0, 101.0]]
    assert (run["last"], run["bwt"], run["forgetting"]) == pytest.approx((77.0, -35.5, 35.5))
    assert run["avg"] == pytest.approx(260 / 3)
    assert ewc["orders"]["iv"]["over_seeds"]["bwt"]["n"] == 2


@pytest.mark.parametrize("name", ["single_seed_scores.csv", "paper_sequential_scores.csv"])
def test_old_keys_and_values_unchanged(tmp_path, name):
    path = DATA / name
    metrics = write_report([str(path)], tmp_path / "r")
    assert set(metrics) == {"summary", "last_stage_bw"} | NEW_KEYS
    old = summarize(read_scores(path))
    assert {k: metrics[k] for k in old} == json.loads(json.dumps(old))
    if name == "single_seed_scores.csv":  # the file of the code before any of this
        expected = json.loads((DATA / "single_seed_metrics.json").read_text())
        assert all(e.pop("seed") is None for e in metrics["summary"])
        assert {k: metrics[k] for k in expected} == expected
    # no items.csv: the bootstrap, the primary family and the claims say why, the CL metrics are there
    assert metrics["bootstrap"]["missing"] == NO_ITEMS and metrics["primary"]["missing"] == NO_ITEMS
    assert {c["verdict"] for c in metrics["claims"]} == {"not testable in this run"}
    assert set(metrics["cl_metrics"]["methods"]) == set(metrics["last_stage_bw"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert NO_ITEMS[0].upper() + NO_ITEMS[1:] in md


def test_render_without_stats_is_unchanged():
    """report.md's text outside the new sections: the same as render_markdown gives without them."""
    runs = run_metrics(read_scores(DATA / "single_seed_scores.csv"))
    plain = render_markdown(runs, ["s.csv"])
    stats = report_stats(runs, None)
    full = render_markdown(runs, ["s.csv"], stats=stats)
    start = full.index("## Primary comparisons")
    end = full.index("\n## ", full.index("## Continual-learning metrics")) + 1
    assert full[:start] + full[end:] == plain


# ----------------------------------------------------------------------------- mera report with items


def test_mera_report_takes_items_csv(tmp_path, capsys):
    scores, items_path = save(tmp_path, two_method_items())
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "mine.csv").write_bytes(items_path.read_bytes())
    items_path.unlink()
    report_command([str(scores)], as_json=True)
    assert json.loads(capsys.readouterr().out)["bootstrap"]["missing"] == NO_ITEMS
    report_command([str(scores), str(moved / "mine.csv")], as_json=True)
    obj = json.loads(capsys.readouterr().out)
    assert obj["bootstrap"]["items"] == str(moved / "mine.csv") and obj["bootstrap"]["n_items"] > 0
    assert obj["primary"]["comparisons"][0]["verdict"] == "holds"
    # the command line, the same
    r = subprocess.run([sys.executable, "-m", "mera", "report", str(scores), str(moved / "mine.csv"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bootstrap"] == obj["bootstrap"]
    # items that are not those of the scores: one line naming the file, exit 2
    text = (moved / "mine.csv").read_text().splitlines()
    bad = moved / "bad.csv"
    bad.write_text("\n".join(text[:1] + [text[1].rsplit(",", 1)[0] + ",49"] + text[2:]) + "\n")
    r = subprocess.run([sys.executable, "-m", "mera", "report", str(scores), str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{bad}, line 2" in r.stderr and "not the items of these scores" in r.stderr
    with pytest.raises(DataError, match="without their scores file"):
        report_command([str(moved / "mine.csv")])


def test_an_incomplete_items_csv_beside_the_scores_only_drops_the_bootstrap(tmp_path):
    items = two_method_items()
    scores, items_path = save(tmp_path, items)
    write_items(items_path, [it for it in items if not (it.method == FT and it.stage == 3)])  # a stage done before
    metrics = write_report([str(scores)], tmp_path / "r")
    assert metrics["bootstrap"]["missing"].startswith(f"no per-item scores: {scores}, line ")
    assert "no per-item scores for 6 of the" in metrics["bootstrap"]["missing"]
    assert metrics["cl_metrics"]["methods"][FT]["last"] is not None


def test_items_that_cannot_be_paired(tmp_path):
    """Items whose means match the scores but whose ids differ from the expert's: beside the scores the
    report goes without its bootstrap (saying why); given on the command line, it is an error."""
    items = [it if not (it.method == FT and it.stage == 2 and it.item == "q0") else
             ItemScore(it.seed, it.method, it.order, it.stage, it.modality, it.dataset, it.task, "other", it.score)
             for it in two_method_items()]
    scores, items_path = save(tmp_path, items)
    metrics = write_report([str(scores)], tmp_path / "r")
    assert metrics["bootstrap"]["missing"].startswith("no per-item scores: ")
    assert "pairing needs the same items everywhere" in metrics["bootstrap"]["missing"]
    with pytest.raises(DataError, match="pairing needs the same items everywhere"):
        report_command([str(scores), str(items_path)])


def test_hand_table_without_items_keeps_the_report(tmp_path, capsys):
    assert report_command([str(write(tmp_path, HAND))]) == 0
    md = capsys.readouterr().out
    assert "| M | 80.83 ± 20.05 | 82.50 |" in md  # the main table has no bootstrap column
    assert "## Continual-learning metrics" in md


# ----------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_micro_run_items_reproduce_its_scores(micro_assets, tmp_path, monkeypatch):
    from micro import micro_config

    from mera.config import load_config
    from mera.continual import checkpoint as ckpt
    from mera.eval.bootstrap import read_items
    from mera.runner.loop import StageLoop
    from mera.runner.run_config import RunConfig

    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    cfg_path = micro_config(micro_assets, tmp_path, methods=[{"name": "Fine-Tuning", "strategies": ["finetune"]}])
    cfg = load_config(cfg_path, ["report.bootstrap_samples=300"], RunConfig)
    out = tmp_path / "out"
    StageLoop(cfg, out, config_dir=tmp_path, progress=False, log=lambda m: None).run()
    rows = read_scores(out / "scores.csv")
    items = read_items(out / "items.csv")
    means: dict[tuple, list[float]] = {}
    for it in items:
        means.setdefault((it.method, it.order, it.seed, it.stage, it.modality, it.dataset), []).append(it.score)
    assert set(means) == {r.key for r in rows}
    for r in rows:  # each row's score is its items' mean, at scores.csv's 4 decimals
        assert round(sum(means[r.key]) / len(means[r.key]), 4) == pytest.approx(r.score, abs=1e-9), r.as_csv()
    n = {(it.task, it.modality) for it in items}
    assert n == {(t, m) for t in ("caption", "qa") for m in ("image", "point")}
    assert {it.score for it in items if it.task == "qa"} <= {0.0, 1.0}
    # each stage and expert folder has its own, recorded in its DONE like its other files
    for folder in ("experts/image", "experts/point", "sequential/fine-tuning/stage_1_image",
                   "sequential/fine-tuning/stage_2_point"):
        assert (out / folder / "items.csv").is_file()
        assert "items.csv" in json.loads((out / folder / "DONE").read_text())["files"]
        assert ckpt.done_problem(out / folder) is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bootstrap"]["B"] == 300 and "missing" not in metrics["bootstrap"]
    cell = metrics["bootstrap"]["methods"]["Fine-Tuning"]["last_stage_bw"]
    assert cell["point"] == pytest.approx(metrics["last_stage_bw"]["Fine-Tuning"], abs=1e-2)
    assert cell["low"] <= cell["point"] <= cell["high"]
