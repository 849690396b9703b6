"""Several seeds: the seed column, per-seed metrics, t-intervals over seeds, paired differences,
the paper's orderings, and the report / metrics.json that present them. Every number is by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mera.errors import DataError
from mera.eval.metrics import (
    COLUMNS,
    ScoreRow,
    format_rows,
    last_stage_bw,
    parse_scores,
    read_rows,
    read_scores,
    run_metrics,
    summarize,
)
from mera.eval.report import render_figures, render_markdown, write_report
from mera.eval.seeds import (
    Interval,
    comparison_pairs,
    mean_runs,
    paired_differences,
    per_seed_stats,
    stage_curves,
    summarize_seeds,
    t_interval,
    verdict,
)

DATA = Path(__file__).parent / "data"
from hand_tables import HAND, write  # noqa: E402

SEED_HEADER = ",".join(COLUMNS)
# t_{0.975, 2}: for 2 degrees of freedom the quantile has the closed form (2p-1) * sqrt(2 / (4p(1-p))),
# p = 0.975: 0.95 * sqrt(2 / 0.0975) = 0.95 * 4.5291081366 = 4.3026527297 (scipy: 4.302652729749462)
T2 = 4.302652729911275
SQRT3 = math.sqrt(3)

# ----------------------------------------------------------------------------- the 3-seed table
# Seeds 1, 2, 3; one order "o"; two stages (image, then video); one data set per modality.
# Every seed has its own experts: image I = 100, video V = 50 (the same numbers, so RG = score %).
# Every method: stage 1 image 100 -> RG 100, BW 100 by definition; stage 2: image x, video 40.
#   stage 2: BW = RG_image = x / 100 * 100 = x; FW = RG_video = 40 / 50 = 80.
#   per seed: bw_rg = [100, x]; bw_mean = (100 + x) / 2; bw_std = |100 - x| / sqrt(2); last-stage BW = x.
X = {  # method: stage-2 image score x per seed (Merge only ran seed 1 only)
    "Fine-Tuning": {1: 60, 2: 70, 3: 65},
    "Realign only": {1: 70, 2: 62, 3: 66},
    "Replay": {1: 80, 2: 82, 3: 84},
    "Replay + Realign": {1: 70, 2: 71, 3: 75},
    "Merge only": {1: 80},
    "MERA (10%)": {1: 90, 2: 96, 3: 93},
}


def seed_table() -> str:
    lines = [SEED_HEADER]
    for seed in (1, 2, 3):
        lines += [f"expert,o,{seed},,image,I,caption,100", f"expert,o,{seed},,video,V,caption,50"]
        for method, xs in X.items():
            if seed in xs:
                lines += [f"{method},o,{seed},1,image,I,caption,100", f"{method},o,{seed},2,image,I,caption,{xs[seed]}",
                          f"{method},o,{seed},2,video,V,caption,40"]
    return "\n".join(lines) + "\n"


def rows_of(text: str, source: str = "t.csv") -> list[ScoreRow]:
    return parse_scores(text.splitlines(keepends=True), source=source)


@pytest.fixture(scope="module")
def runs():
    return run_metrics(rows_of(seed_table()))


# ----------------------------------------------------------------------------- t_interval


def test_t_interval_three_seeds_by_hand():
    # [90, 96, 93]: mean 279/3 = 93; deviations -3, 3, 0; squares 9 + 9 + 0 = 18; / (3-1) = 9; std = 3
    # half-width t_{0.975,2} * 3 / sqrt(3) = 4.3026527 * 1.7320508 = 7.4524131 -> [85.547587, 100.452413]
    mean, std, lo, hi = t_interval([90, 96, 93])
    assert mean == pytest.approx(93.0) and std == pytest.approx(3.0)
    assert lo == pytest.approx(93 - T2 * 3 / SQRT3, rel=1e-9) and hi == pytest.approx(93 + T2 * 3 / SQRT3, rel=1e-9)
    assert (lo, hi) == pytest.approx((85.547587, 100.452413), abs=1e-6)


def test_t_interval_two_seeds_other_level_and_one_seed():
    # [1, 3]: mean 2, std sqrt((1 + 1)/1) = sqrt(2); t_{0.975,1} = tan(pi * (0.975 - 0.5)) = 12.7062047
    # half = 12.7062047 * sqrt(2) / sqrt(2) = 12.7062047
    t1 = math.tan(math.pi * 0.475)
    assert t_interval([1, 3]) == pytest.approx((2.0, math.sqrt(2), 2 - t1, 2 + t1))
    # level 0.90 on [90, 96, 93]: t_{0.95,2} = 0.9 * sqrt(2 / (4 * 0.95 * 0.05)) = 0.9 * 3.2444284 = 2.9199856
    # half = 2.9199856 * 3 / sqrt(3) = 5.0575669
    t90 = 0.9 * math.sqrt(2 / (4 * 0.95 * 0.05))
    _, _, lo, hi = t_interval([90, 96, 93], level=0.90)
    assert (lo, hi) == pytest.approx((93 - t90 * SQRT3, 93 + t90 * SQRT3))
    mean, std, lo, hi = t_interval([42.0])  # one seed: no spread, no interval
    assert mean == 42.0 and math.isnan(std) and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        t_interval([])
    with pytest.raises(ValueError):
        t_interval([1.0, 2.0], level=1.5)


def test_verdicts():
    assert verdict(Interval.of([30, 26, 28])) == "holds"  # [23.03, 32.97] above 0
    assert verdict(Interval.of([-10, -11, -9])) == "reversed"  # [-12.48, -7.52] below 0
    assert verdict(Interval.of([10, -8, 1])) == "inconclusive"  # [-21.36, 23.36] contains 0
    assert verdict(Interval.of([20])) == "one seed"
    assert verdict(Interval.of([0, 0])) == "inconclusive"  # [0, 0] contains 0


# ----------------------------------------------------------------------------- reading


def test_columns_and_format_rows_write_the_seed():
    assert COLUMNS == ("method", "order", "seed", "stage", "modality", "dataset", "task", "score")
    text = format_rows([{"method": "M", "order": "o", "stage": 1, "modality": "image", "dataset": "I", "task": "caption",
                         "score": 5}, {"method": "M", "order": "o", "seed": 3, "stage": 1, "modality": "image",
                                       "dataset": "I", "task": "caption", "score": 5}])
    assert text.splitlines() == ["method,order,seed,stage,modality,dataset,task,score",
                                 "M,o,,1,image,I,caption,5", "M,o,3,1,image,I,caption,5"]  # no seed: empty cell
    a, b = rows_of(text)
    assert a.seed is None and b.seed == 3 and a.key != b.key
    assert b.as_csv() == "M,o,3,1,image,I,caption,5" and a.as_csv() == "M,o,,1,image,I,caption,5"


def test_old_seven_column_file_reads_as_one_seed(tmp_path):
    path = write(tmp_path, HAND)  # header method,order,stage,modality,dataset,task,score
    rows = read_scores(path)
    assert len(rows) == 13 and all(r.seed is None for r in rows)
    (run,) = run_metrics(rows)
    assert run.seed is None and run.bw_rg == pytest.approx([100.0, 60.0, 82.5])
    assert set(summarize(rows)) == {"summary", "last_stage_bw"}
    assert read_rows(path)[0]["method"] == "expert"  # plain dicts, no checks


def test_new_header_any_column_order_and_empty_seed(tmp_path):
    text = "score,seed,task,dataset,modality,stage,order,method\n10,,caption,I,image,,o,expert\n5,,caption,I,image,1,o,M\n"
    (run,) = run_metrics(read_scores(write(tmp_path, text)))
    assert run.seed is None and run.rg[0] == pytest.approx({"image": 50.0})  # 5 / 10


@pytest.mark.parametrize("cell", ["x", "-1", "1.5", "²"])
def test_bad_seed_names_file_and_line(tmp_path, cell):
    text = seed_table().replace("MERA (10%),o,2,2,image,I,caption,96", f"MERA (10%),o,{cell},2,image,I,caption,96")
    path = write(tmp_path, text, "bad.csv")
    line = text.splitlines().index(f"MERA (10%),o,{cell},2,image,I,caption,96") + 1
    with pytest.raises(DataError) as info:
        read_scores(path)
    message = str(info.value)
    assert f"{path}, line {line}: seed {cell!r} is not a non-negative integer" in message


def test_wrong_header_with_seed(tmp_path):
    path = write(tmp_path, "method,order,seed,stage,modality,dataset,score\n", "bad.csv")
    with pytest.raises(DataError) as info:
        read_scores(path)
    assert "line 1: wrong header (missing task)" in str(info.value)
    assert "expected exactly method,order,seed,stage,modality,dataset,task,score" in str(info.value)


def test_experts_are_per_seed():
    # seed 1's image expert is 100, seed 2's is 50: the same score 40 is RG 40% for seed 1, 80% for seed 2.
    # Seed 3 has no expert of its own: it uses the experts without seed (shared), 40 / 80 = 50%.
    text = f"""{SEED_HEADER}
expert,o,1,,image,I,caption,100
expert,o,2,,image,I,caption,50
expert,o,,,image,I,caption,80
M,o,1,1,image,I,caption,40
M,o,2,1,image,I,caption,40
M,o,3,1,image,I,caption,40
M,o,,1,image,I,caption,40
"""
    runs = run_metrics(rows_of(text))
    assert [(r.seed, round(r.rg[0]["image"], 6)) for r in runs] == [(None, 50.0), (1, 40.0), (2, 80.0), (3, 50.0)]


def test_missing_expert_of_a_seed_and_duplicates():
    text = f"{SEED_HEADER}\nexpert,o,1,,image,I,caption,100\nM,o,2,1,image,I,caption,40\n"
    with pytest.raises(DataError) as info:
        run_metrics(rows_of(text))
    assert "t.csv, line 3: no expert row" in str(info.value) and "seed 2" in str(info.value)
    assert "'expert,o,2,,image,I,caption,<score>'" in str(info.value)
    # the same row under two seeds is no duplicate; under the same seed it is
    ok = f"{SEED_HEADER}\nexpert,o,1,,image,I,caption,100\nexpert,o,2,,image,I,caption,100\n"
    run_metrics(rows_of(ok + "M,o,1,1,image,I,caption,40\nM,o,2,1,image,I,caption,40\n"))
    with pytest.raises(DataError, match=r"line 4: duplicated row .*seed 1.* line 3"):
        run_metrics(rows_of(f"{SEED_HEADER}\nexpert,o,1,,image,I,caption,100\nM,o,1,1,image,I,caption,40\n"
                            "M,o,1,1,image,I,caption,41\n"))


# ----------------------------------------------------------------------------- per seed


def test_runs_grouped_by_method_order_seed(runs):
    assert [(r.method, r.seed) for r in runs][:4] == [("Fine-Tuning", 1), ("Fine-Tuning", 2), ("Fine-Tuning", 3),
                                                      ("Realign only", 1)]
    mera = [r for r in runs if r.method == "MERA (10%)"]
    # seed 2: bw_rg = [100, 96]; mean 98; std = |100 - 96| / sqrt(2) = 2.828427; FW = [100, 80]
    assert mera[1].seed == 2 and mera[1].bw_rg == pytest.approx([100, 96]) and mera[1].fw_rg == pytest.approx([100, 80])
    assert mera[1].bw_mean == pytest.approx(98.0) and mera[1].bw_std == pytest.approx(4 / math.sqrt(2))
    # headline: per seed x, then the mean over the seeds: (90 + 96 + 93) / 3 = 93; FT (60 + 70 + 65) / 3 = 65
    assert last_stage_bw(runs) == pytest.approx({"Fine-Tuning": 65, "Realign only": 66, "Replay": 82,
                                                 "Replay + Realign": 72, "Merge only": 80, "MERA (10%)": 93})


def test_per_seed_stats(runs):
    stats = per_seed_stats(runs)
    assert list(stats["MERA (10%)"]) == [1, 2, 3] and list(stats["Merge only"]) == [1]
    s3 = stats["MERA (10%)"][3]
    assert s3.last_stage_bw == pytest.approx(93.0)  # x of seed 3, the one order
    assert s3.bw_mean == pytest.approx({"o": 96.5})  # (100 + 93) / 2
    assert s3.bw_rg["o"] == pytest.approx([100, 93]) and s3.fw_rg["o"] == pytest.approx([100, 80])


def test_summaries_over_seeds(runs):
    ms = summarize_seeds(runs)["MERA (10%)"]
    # headline [90, 96, 93]: 93 +- 3, CI 93 -+ 7.4524
    h = ms.last_stage_bw
    assert (h.mean, h.std, h.n) == pytest.approx((93.0, 3.0, 3))
    assert (h.lo, h.hi) == pytest.approx((93 - T2 * SQRT3, 93 + T2 * SQRT3), rel=1e-9)
    # per-order mean BW [95, 98, 96.5]: mean 96.5; deviations -1.5, 1.5, 0 -> (2.25 + 2.25)/2 = 2.25; std 1.5
    # CI half-width 4.3026527 * 1.5 / sqrt(3) = 3.7262066
    o = ms.orders["o"]
    assert (o.bw_mean.mean, o.bw_mean.std) == pytest.approx((96.5, 1.5))
    assert o.bw_mean.hi - o.bw_mean.mean == pytest.approx(T2 * 1.5 / SQRT3, rel=1e-9)
    # stage std per seed |100 - x| / sqrt(2): mean over seeds (10 + 4 + 7) / 3 / sqrt(2) = 7 / sqrt(2)
    assert o.bw_std == pytest.approx(7 / math.sqrt(2))
    # per stage: stage 1 all 100 (std 0, CI [100, 100]); stage 2 = the headline here
    assert (o.bw_rg[0].mean, o.bw_rg[0].std, o.bw_rg[0].lo) == pytest.approx((100, 0, 100))
    assert (o.bw_rg[1].mean, o.bw_rg[1].std) == pytest.approx((93, 3))
    one = summarize_seeds(runs)["Merge only"].last_stage_bw
    assert one.n == 1 and one.mean == 80 and math.isnan(one.std) and math.isnan(one.lo)


def test_mean_runs_and_stage_curves(runs):
    means = {r.method: r for r in mean_runs(runs)}
    ft = means["Fine-Tuning"]
    # FT: x = 60, 70, 65 -> stage-2 BW mean 65; bw_mean mean of (80, 85, 82.5) = 82.5;
    # bw_std mean of (40, 30, 35)/sqrt(2) = 35/sqrt(2) = 24.7487
    assert ft.seed is None and ft.bw_rg == pytest.approx([100, 65]) and ft.rg[1] == pytest.approx({"image": 65, "video": 80})
    assert ft.bw_mean == pytest.approx(82.5) and ft.bw_std == pytest.approx(35 / math.sqrt(2))
    curve = stage_curves(runs, "bw_rg")["MERA (10%)"]
    assert [iv.mean for iv in curve] == pytest.approx([100, 93]) and [iv.std for iv in curve] == pytest.approx([0, 3])


# ----------------------------------------------------------------------------- pairs


def test_comparison_pairs_are_the_papers_orderings():
    methods = list(X)
    got = [(a, b) for a, b, _ in comparison_pairs(methods)]
    assert got == [
        ("MERA (10%)", "Fine-Tuning"), ("MERA (10%)", "Realign only"), ("MERA (10%)", "Replay"),
        ("MERA (10%)", "Replay + Realign"), ("MERA (10%)", "Merge only"),  # MERA above every non-MERA method
        ("Realign only", "Fine-Tuning"), ("Replay + Realign", "Replay"),  # realign helps (Table 5)
        ("Merge only", "Fine-Tuning"),  # Table 4 ablation
    ]
    claims = {(a, b): c for a, b, c in comparison_pairs(methods)}
    assert len(claims[("MERA (10%)", "Merge only")]) == 2  # Table 4 and Table 5 (realign added to the merge)
    assert len(claims[("Realign only", "Fine-Tuning")]) == 2  # Table 5 and Table 4
    # two MERA methods are not compared with each other
    assert [(a, b) for a, b, _ in comparison_pairs(["MERA (1%)", "MERA (10%)", "EWC"])] == [
        ("MERA (1%)", "EWC"), ("MERA (10%)", "EWC")]
    assert comparison_pairs(["EWC", "Replay"]) == []


def test_paired_differences_by_hand(runs):
    paired = {(p.a, p.b, p.statistic): p for p in paired_differences(runs)}
    p = paired[("MERA (10%)", "Fine-Tuning", "last_stage_bw")]
    # per seed 90-60 = 30, 96-70 = 26, 93-65 = 28: mean 28; deviations 2, -2, 0 -> 8/2 = 4, std 2
    # half-width 4.3026527 * 2 / sqrt(3) = 4.9682754 -> [23.03, 32.97]: above 0, holds
    assert p.seeds == [1, 2, 3] and p.differences == pytest.approx([30, 26, 28])
    assert (p.interval.mean, p.interval.std) == pytest.approx((28, 2))
    assert (p.interval.lo, p.interval.hi) == pytest.approx((28 - T2 * 2 / SQRT3, 28 + T2 * 2 / SQRT3), rel=1e-9)
    assert p.verdict == "holds"
    # the per-order mean BW halves every difference: (100 + x)/2 - (100 + y)/2 = (x - y)/2 -> 15, 13, 14
    q = paired[("MERA (10%)", "Fine-Tuning", "bw_mean")]
    assert q.order == "o" and q.differences == pytest.approx([15, 13, 14]) and q.verdict == "holds"
    # Realign only - FT: 70-60 = 10, 62-70 = -8, 66-65 = 1: mean 1; deviations 9, -9, 0 -> 162/2 = 81, std 9
    # half-width 4.3026527 * 9 / sqrt(3) = 22.357239 -> [-21.36, 23.36] contains 0: inconclusive
    r = paired[("Realign only", "Fine-Tuning", "last_stage_bw")]
    assert (r.interval.mean, r.interval.std) == pytest.approx((1, 9))
    assert r.interval.lo == pytest.approx(1 - T2 * 9 / SQRT3, rel=1e-9) and r.verdict == "inconclusive"
    # Replay + Realign - Replay: 70-80, 71-82, 75-84 = -10, -11, -9: mean -10, std 1; [-12.48, -7.52]: reversed
    s = paired[("Replay + Realign", "Replay", "last_stage_bw")]
    assert s.interval.mean == pytest.approx(-10) and s.interval.hi == pytest.approx(-10 + T2 / SQRT3, rel=1e-9)
    assert s.verdict == "reversed"
    # Merge only ran seed 1 only: paired on that seed alone, 90 - 80 = 10, n = 1
    t = paired[("MERA (10%)", "Merge only", "last_stage_bw")]
    assert t.seeds == [1] and t.differences == pytest.approx([10]) and t.verdict == "one seed"


# ----------------------------------------------------------------------------- metrics.json


def test_single_seed_json_keeps_todays_keys_and_values():
    # tests/data/single_seed_metrics.json: summarize() of the fixture by the code before the seed column
    expected = json.loads((DATA / "single_seed_metrics.json").read_text())
    got = summarize(read_scores(DATA / "single_seed_scores.csv"))
    assert set(got) == {"summary", "last_stage_bw"}
    assert all(e.pop("seed") is None for e in got["summary"])
    assert json.loads(json.dumps(got)) == expected
    # the same table with one seed written in it: the same numbers, each entry's seed 7
    seeded = summarize(rows_of(with_seed((DATA / "single_seed_scores.csv").read_text(), 7)))
    assert set(seeded) == {"summary", "last_stage_bw"} and all(e.pop("seed") == 7 for e in seeded["summary"])
    assert json.loads(json.dumps(seeded)) == expected


def test_several_seeds_json(runs, tmp_path):
    obj = summarize(rows_of(seed_table()))
    assert list(obj) == ["summary", "last_stage_bw", "seeds", "per_seed", "over_seeds", "paired", "orderings"]
    assert obj["seeds"] == [1, 2, 3] and len(obj["summary"]) == 3 * 5 + 1
    assert obj["last_stage_bw"]["MERA (10%)"] == pytest.approx(93.0)  # the mean over the seeds
    # per_seed: today's summary object of each seed's rows alone
    only2 = [r for r in rows_of(seed_table()) if r.seed == 2]
    assert obj["per_seed"]["2"] == summarize(only2)
    assert obj["per_seed"]["2"]["last_stage_bw"]["MERA (10%)"] == 96.0
    m = obj["over_seeds"]["methods"]["MERA (10%)"]
    assert m["seeds"] == [1, 2, 3] and m["n"] == 3
    assert m["last_stage_bw"]["mean"] == pytest.approx(93) and m["last_stage_bw"]["std"] == pytest.approx(3)
    assert m["last_stage_bw"]["ci_low"] == pytest.approx(93 - T2 * SQRT3, rel=1e-9) and m["last_stage_bw"]["n"] == 3
    assert m["orders"]["o"]["bw_mean"]["mean"] == pytest.approx(96.5) and m["orders"]["o"]["bw_mean"]["std"] == pytest.approx(1.5)
    one = obj["over_seeds"]["methods"]["Merge only"]["last_stage_bw"]
    assert one == {"mean": 80.0, "std": None, "ci_low": None, "ci_high": None, "n": 1}  # NaN written as null
    first = obj["paired"][0]
    assert (first["a"], first["b"], first["statistic"], first["n"], first["verdict"]) == (
        "MERA (10%)", "Fine-Tuning", "last_stage_bw", 3, "holds")
    assert first["mean"] == pytest.approx(28) and first["differences"] == pytest.approx([30, 26, 28])
    verdicts = {o["claim"]: o["verdict"] for o in obj["orderings"]}
    assert verdicts == {"MERA (10%) above Fine-Tuning": "holds", "MERA (10%) above Realign only": "holds",
                        "MERA (10%) above Replay": "holds", "MERA (10%) above Replay + Realign": "holds",
                        "MERA (10%) above Merge only": "one seed", "Realign only above Fine-Tuning": "inconclusive",
                        "Replay + Realign above Replay": "reversed", "Merge only above Fine-Tuning": "one seed"}
    assert obj["orderings"][0]["by_order"] == {"o": "holds"}
    json.dumps(obj, allow_nan=False)  # strict JSON
    written = write_report(rows_of(seed_table()), tmp_path / "r")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == json.loads(json.dumps(written))


# ----------------------------------------------------------------------------- report


EFFICIENCY = {"Fine-Tuning": {"train_seconds": 12.345, "train_peak_mib": 700.4, "infer_ms_per_token": 1.234,
                              "infer_peak_mib": 650.0, "llm_params_m": 1.5, "memory_kind": "rss"},
              "MERA (10%)": {"train_seconds": 13.5, "memory_kind": "rss"}}


def with_seed(text: str, seed: int) -> str:
    """The 7-column table ``text`` with a seed column holding ``seed`` on every row."""
    lines = text.splitlines()
    out = [SEED_HEADER]
    for line in lines[1:]:
        cells = line.split(",")
        out.append(",".join(cells[:2] + [str(seed)] + cells[2:]))
    return "\n".join(out) + "\n"


def test_single_seed_markdown_is_byte_identical_to_before():
    # tests/data/single_seed_report.md: render_markdown() of the fixture by the code before the seed column
    expected = (DATA / "single_seed_report.md").read_text(encoding="utf-8")
    runs = run_metrics(read_scores(DATA / "single_seed_scores.csv"))
    assert render_markdown(runs, ["single_seed_scores.csv"], EFFICIENCY) == expected
    seeded = run_metrics(rows_of(with_seed((DATA / "single_seed_scores.csv").read_text(), 7)))
    assert {r.seed for r in seeded} == {7}
    assert render_markdown(seeded, ["single_seed_scores.csv"], EFFICIENCY) == expected


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(heading))
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif in_table:
            break
    return rows


def test_several_seeds_markdown(runs):
    md = render_markdown(runs)
    main = table_rows(md, "## Backward relative gain")
    assert main[0] == ["method", "seeds", "o", "last-stage BW (avg over orders)", "95% CI"]
    by = {r[0]: r for r in main[2:]}
    # MERA: order cell [95, 98, 96.5] -> 96.50 +- 1.50; headline [90, 96, 93] -> 93.00 +- 3.00,
    # CI 93 -+ 7.4524 = [85.55, 100.45]
    assert by["MERA (10%)"] == ["MERA (10%)", "3", "96.50 ± 1.50", "93.00 ± 3.00", "[85.55, 100.45]"]
    # FT: [80, 85, 82.5] -> 82.50 +- 2.50; [60, 70, 65] -> 65 +- 5; CI 65 -+ 4.3027 * 5 / sqrt(3) = 65 -+ 12.42
    assert by["Fine-Tuning"] == ["Fine-Tuning", "3", "82.50 ± 2.50", "65.00 ± 5.00", "[52.58, 77.42]"]
    assert by["Merge only"] == ["Merge only", "1", "90.00 ± n/a", "80.00 ± n/a", "n/a"]
    assert "3 seeds (1, 2, 3)" in md and "Student's t-distribution" in md and "sample standard deviation (n-1)" in md
    paired = table_rows(md, "## Paired differences")
    assert paired[0] == ["pair (A − B)", "statistic", "n", "mean difference", "95% CI", "verdict"]
    # MERA - FT: 28 -+ 4.9683 = [23.03, 32.97]; per order 14 -+ 2.4841 = [11.52, 16.48]
    assert paired[2] == ["MERA (10%) − Fine-Tuning", "last-stage BW", "3", "+28.00", "[+23.03, +32.97]", "holds"]
    assert paired[3] == ["MERA (10%) − Fine-Tuning", "mean BW, o", "3", "+14.00", "[+11.52, +16.48]", "holds"]
    # Realign only - FT: 1 -+ 22.357 = [-21.36, +23.36]
    assert ["Realign only − Fine-Tuning", "last-stage BW", "3", "+1.00", "[-21.36, +23.36]", "inconclusive"] in paired
    assert ["MERA (10%) − Merge only", "last-stage BW", "1", "+10.00", "n/a", "one seed"] in paired
    orderings = md.split("## The paper's orderings on this run")[1].split("\n## ")[0]
    bullets = [l for l in orderings.splitlines() if l.startswith("- ")]
    assert len(bullets) == 8
    assert bullets[0].startswith("- **MERA (10%) above Fine-Tuning** (the paper's Table 2: MERA above every baseline): "
                                 "holds: the 95% CI of the difference is above 0, so MERA (10%) is better with 95% confidence")
    assert "(MERA (10%) − Fine-Tuning = +28.00 points, 95% CI [+23.03, +32.97], n = 3 seeds)" in bullets[0]
    assert "**Replay + Realign above Replay**" in bullets[6] and "reversed" in bullets[6]
    assert "**Realign only above Fine-Tuning**" in bullets[5]
    assert "inconclusive: the 95% CI of the difference contains 0" in bullets[5]
    assert "one seed: fewer than 2 seeds" in bullets[4] and "n = 1 seed)" in bullets[4]
    # the ablation table shows means over the seeds: FT 82.50 +- 35/sqrt(2) = 24.75 (mean stage std), headline 65
    assert "| Fine-Tuning | ✗ | ✗ | 82.50 ± 24.75 | 65.00 |" in md
    # MERA: bw_mean 96.5, stage std (10 + 4 + 7)/3/sqrt(2) = 4.95
    assert "| MERA (10%) | ✓ | ✓ | 96.50 ± 4.95 | 93.00 |" in md
    # realign table: Realign only bw_mean (85 + 81 + 83)/3 = 83 vs FT 82.5: +0.50;
    # stage std 34/sqrt(2) vs 35/sqrt(2): -1/sqrt(2) = -0.71
    assert "| Fine-Tuning | Realign only | +0.50 / -0.71 |" in md
    assert "Each number is the mean over the 3 seeds." in md
    # per-stage progression of the means: FT stage 2 image (60 + 70 + 65)/3 = 65
    assert "### Fine-Tuning, order o (image → video), mean over 3 seeds" in md
    assert table_rows(md, "### Fine-Tuning, order o")[3] == ["2", "video", "65.00", "80.00", "65.00", "80.00"]
    assert "### Merge only, order o (image → video), mean over 1 seed" in md


def test_several_seeds_figures_have_bands(runs, monkeypatch):
    from matplotlib.axes import Axes

    calls = []
    original = Axes.fill_between

    def record(self, x, y1, y2=0, **kw):
        calls.append((list(x), list(y1), list(y2)))
        return original(self, x, y1, y2, **kw)

    monkeypatch.setattr(Axes, "fill_between", record)
    figures = render_figures(runs)
    assert sorted(figures) == ["accuracy_fine-tuning_o.png", "accuracy_mera-10pct_o.png", "accuracy_merge-only_o.png",
                               "accuracy_realign-only_o.png", "accuracy_replay-plus-realign_o.png", "accuracy_replay_o.png",
                               "backward_rg.png", "forward_rg.png"]
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in figures.values())
    assert len(calls) == 2 * 6  # one band per method, on each of the two line figures
    # backward, MERA (the 6th method): stage 1 100 +- 0, stage 2 93 +- 3
    assert calls[5] == ([1, 2], pytest.approx([100, 90]), pytest.approx([100, 96]))
    # Merge only has one seed: no spread, the band is the line itself
    assert calls[4] == ([1, 2], pytest.approx([100, 80]), pytest.approx([100, 80]))
    calls.clear()
    render_figures(run_metrics(rows_of(HAND)))  # one seed: no band
    assert calls == []
