"""Choosing hyper-parameters on the validation split: eval.split=val runs and `mera sweep`."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from micro import micro_config

from mera.cli import main
from mera.config import load_config
from mera.errors import ConfigError
from mera.eval.metrics import format_rows
from mera.runner.run_config import RunConfig
from mera.runner.sweep import SweepParam, analyse, format_markdown, parse_values, plan_sweep

SMALL_VAL = ["data.toy.n_val_caption=8", "data.toy.n_val_qa=16"]


def _cfg(tmp_path, methods=None, **over):
    path = micro_config(Path("/nowhere/assets"), tmp_path, methods=methods)  # never loaded: config checks only
    return path, load_config(path, [f"{k}={v}" for k, v in over.items()], RunConfig)


# ---------------------------------------------------------------------------- the plan (no training)


def test_plan_is_one_run_of_copies_on_val(tmp_path):
    _, cfg = _cfg(tmp_path)
    assert cfg.eval.split == "test"
    plan = plan_sweep(cfg, "EWC", [SweepParam("ewc.lam", ["0.5", "2"])], tmp_path / "sw")
    assert len(plan.runs) == 1 and plan.runs[0].dir == tmp_path / "sw"
    run = plan.runs[0].cfg
    assert run.eval.split == "val"
    assert [m.name for m in run.methods] == ["EWC [ewc.lam=0.5]", "EWC [ewc.lam=2]"]
    # only the parameter changes; the method's other parameters (from a legacy shorthand here) stay
    ewc = next(m for m in cfg.methods if m.name == "EWC").strategies[0]
    assert ewc["lam"] == 1.0 and ewc["fisher_ratio"] == 0.05
    assert [m.strategies for m in run.methods] == [[{**ewc, "lam": 0.5}], [{**ewc, "lam": 2.0}]]
    assert run.train == cfg.train and run.model == cfg.model and run.orders == cfg.orders
    assert [c.values for c in plan.runs[0].copies] == [{"ewc.lam": 0.5}, {"ewc.lam": 2.0}]


def test_plan_grid_and_train_keys_give_one_run_per_train_value(tmp_path):
    _, cfg = _cfg(tmp_path)
    plan = plan_sweep(cfg, "MERA (10%)", [SweepParam("train.realign.lr_connector", ["1e-3", "1e-2"]),
                                          SweepParam("realign.ratio", ["0.05", "0.2"])], tmp_path / "sw")
    assert [r.dir.name for r in plan.runs] == ["train.realign.lr_connector=1e-3", "train.realign.lr_connector=1e-2"]
    assert [r.cfg.train.realign.lr_connector for r in plan.runs] == [1e-3, 1e-2]
    assert [m.name for m in plan.runs[1].cfg.methods] == [
        "MERA (10%) [train.realign.lr_connector=1e-2, realign.ratio=0.05]",
        "MERA (10%) [train.realign.lr_connector=1e-2, realign.ratio=0.2]"]
    assert [m.strategies[1] for m in plan.runs[0].cfg.methods] == [{"name": "realign", "ratio": 0.05},
                                                                  {"name": "realign", "ratio": 0.2}]
    assert plan.runs[0].cfg.train.instruct == cfg.train.instruct


def _scores(path: Path, table: dict, orders=("sequential", "reverse")) -> None:
    """A scores.csv of 2-modality orders: experts at 50 / 0.5, each method's stage 2 as given."""
    rows = []
    for o in orders:
        rows += [{"method": "expert", "order": o, "modality": "image", "dataset": "toy-image-caption-val",
                  "task": "caption", "score": 50},
                 {"method": "expert", "order": o, "modality": "point", "dataset": "toy-point-qa-val",
                  "task": "qa", "score": 0.5}]
    for name, per_order in table.items():
        for o, old_score in zip(orders, per_order):
            first, second = ("image", "point") if o == orders[0] else ("point", "image")
            score = {"image": 50, "point": 0.5}
            rows += [{"method": name, "order": o, "stage": 1, "modality": first,
                      "dataset": f"toy-{first}-{'caption' if first == 'image' else 'qa'}-val",
                      "task": "caption" if first == "image" else "qa", "score": score[first]}]
            for m in (first, second):
                s = old_score * score[m] if m == first else score[m]
                rows += [{"method": name, "order": o, "stage": 2, "modality": m,
                          "dataset": f"toy-{m}-{'caption' if m == 'image' else 'qa'}-val",
                          "task": "caption" if m == "image" else "qa", "score": s}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_rows(rows))


def test_choice_is_the_best_metric_and_ties_go_to_the_smaller_value(tmp_path):
    _, cfg = _cfg(tmp_path, orders={"sequential": ["image", "point"], "reverse": ["point", "image"]})
    plan = plan_sweep(cfg, "EWC", [SweepParam("ewc.lam", ["10", "0.1", "1"])], tmp_path / "sw")
    # the old modality keeps this share of its expert's score at stage 2, per order
    _scores(tmp_path / "sw" / "scores.csv", {"EWC [ewc.lam=10]": (0.9, 0.7), "EWC [ewc.lam=0.1]": (0.6, 0.8),
                                             "EWC [ewc.lam=1]": (0.7, 0.8)})
    res = analyse(plan, "last_bw")
    assert [r["last_bw"] for r in res["table"]] == pytest.approx([80.0, 70.0, 75.0])
    assert res["chosen"]["text"] == {"ewc.lam": "10"} and res["chosen"]["values"] == {"ewc.lam": 10.0}
    assert res["table"][0]["orders"]["sequential"] == {"last_bw": pytest.approx(90.0),
                                                       "bw_mean": pytest.approx(95.0),
                                                       "bw_std": pytest.approx(7.0710678)}
    # mean_bw = (100 + last) / 2 here: the same order of the values
    assert analyse(plan, "mean_bw")["chosen"]["text"] == {"ewc.lam": "10"}
    # a tie: 10 and 1 both at 80 -> the smaller value (1), though given later
    _scores(tmp_path / "sw" / "scores.csv", {"EWC [ewc.lam=10]": (0.9, 0.7), "EWC [ewc.lam=0.1]": (0.6, 0.8),
                                             "EWC [ewc.lam=1]": (0.7, 0.9)})
    res = analyse(plan, "last_bw")
    assert res["chosen"]["text"] == {"ewc.lam": "1"} and set(res["chosen"]["tied"]) == {"EWC [ewc.lam=10]",
                                                                                         "EWC [ewc.lam=1]"}
    md = format_markdown(res)
    assert "| ewc.lam | sequential: last BW | reverse: last BW |" in md
    assert "| **1** | **70.00** | **90.00** |" in md and "Chosen: **ewc.lam=1**" in md and "smaller value" in md


def test_parse_values():
    assert parse_values("k", " 0.1, 1,10") == ["0.1", "1", "10"]
    for bad, what in (("", "no values"), (" , ", "no values"), ("1,,2", "empty value"), ("1,2,1", "given twice")):
        with pytest.raises(ConfigError, match=what):
            parse_values("k", bad)


BAD = {
    "unknown method": (["--method", "EWX", "--param", "ewc.lam", "--values", "1,2"],
                       "--method: {cfg} has no method 'EWX' (did you mean 'EWC'?"),
    "plug-in not in the method": (["--method", "EWC", "--param", "realign.ratio", "--values", "0.1"],
                                  "--param realign.ratio: method 'EWC' has no plug-in 'realign' (its plug-ins: ewc)"),
    "unknown plug-in": (["--method", "EWC", "--param", "ewk.lam", "--values", "1"],
                        "--param ewk.lam: unknown strategy 'ewk' (did you mean 'ewc'?"),
    "unknown parameter": (["--method", "EWC", "--param", "ewc.lamda", "--values", "1"],
                          "--param ewc.lamda: plug-in 'ewc' has no parameter 'lamda' (did you mean 'lam'?"),
    "a plug-in without parameters": (["--method", "MERA (10%)", "--param", "merge.x", "--values", "1"],
                                     "plug-in 'cma' has no parameter 'x' (it has no parameters)"),
    "malformed key": (["--method", "EWC", "--param", "lam", "--values", "1"],
                      "--param 'lam': expected <plug-in>.<parameter>"),
    "empty values": (["--method", "EWC", "--param", "ewc.lam", "--values", ""], "--values for ewc.lam: no values"),
    "empty item": (["--method", "EWC", "--param", "ewc.lam", "--values", "1,,3"], "--values for ewc.lam: an empty"),
    "same value twice": (["--method", "EWC", "--param", "ewc.lam", "--values", "1,1.0"],
                         "--values for ewc.lam: 1 and 1.0 are the same value"),
    "value out of range": (["--method", "MERA (10%)", "--param", "realign.ratio", "--values", "0.1,2"],
                           "realign.ratio=2"),
    "unknown train key": (["--method", "EWC", "--param", "train.realign.lrr", "--values", "1"],
                          "train.realign.lrr: unknown key (did you mean 'lr_lora'?"),
    "no --values": (["--method", "EWC", "--param", "ewc.lam"], "give one --values after each --param"),
    "no --param": (["--method", "EWC"], "give at least one --param"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    path, _ = _cfg(tmp_path)
    args, expected = BAD[case]
    out = tmp_path / "sw"
    rc = main(["sweep", str(path), *args, "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 2, cap
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert expected.format(cfg=path) in lines[0], lines[0]
    assert not out.exists() and cap.out == ""


def test_val_without_validation_sets_fails_at_set_up_naming_the_modality(tmp_path, micro_assets, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    path = micro_config(micro_assets, tmp_path, methods=[{"name": "Fine-Tuning", "strategies": ["finetune"]}])
    data = yaml.safe_load(path.read_text())
    world = tmp_path / "world"
    from mera.data.toy_world import ToyWorldConfig, write_world

    p = write_world(world, ToyWorldConfig(n_train_caption=4, n_train_qa=4, n_test_caption=2, n_test_qa=2,
                                          n_val_caption=2, n_val_qa=2))
    data["data"]["sets"] = {"point": {f"{t}_{s}": p["point"][t][s] for t in ("caption", "qa")
                                      for s in ("train", "test")}}
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    assert main(["run", str(path), "eval.split=val", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.sets.point: eval.split is 'val' but modality 'point' has no validation sets" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------------------- training


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_val_run_writes_val_datasets_and_never_reads_test_sets(tmp_path, micro_assets, monkeypatch):
    import mera.data.pipeline as pipeline

    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    read = []
    real = pipeline.load_dataset
    monkeypatch.setattr(pipeline, "load_dataset", lambda p, *a, **k: read.append(str(p)) or real(p, *a, **k))
    path = micro_config(micro_assets, tmp_path, methods=[{"name": "Fine-Tuning", "strategies": ["finetune"]}])
    out = tmp_path / "run"
    assert main(["run", str(path), "eval.split=val", *SMALL_VAL, "--out", str(out), "--quiet"]) == 0
    assert read and not [p for p in read if "_test" in Path(p).name], read
    assert {Path(p).name for p in read} >= {"caption_val.json", "qa_val.json", "caption_train.json"}
    rows = _read(out / "scores.csv")
    assert {r["dataset"] for r in rows} == {"toy-image-caption-val", "toy-image-qa-val", "toy-point-caption-val",
                                            "toy-point-qa-val"}
    preds = [json.loads(x) for f in out.rglob("predictions.jsonl") for x in f.read_text().splitlines()]
    assert preds and all("_val_" in p["id"] for p in preds)
    expert = (out / "experts" / "point" / "predictions.jsonl").read_text().splitlines()
    assert len(expert) == 8 + 16  # the val sets (n_val_caption + n_val_qa)
    assert (out / "report.md").is_file()


def _hand_metrics(rows: list[dict]) -> dict:
    """{method: {order: (last-stage BW, mean BW)}} computed from the CSV rows by the paper's formulas."""
    expert = {(r["modality"], r["dataset"]): float(r["score"]) for r in rows if r["method"] == "expert"}
    out: dict = {}
    for (method, order) in {(r["method"], r["order"]) for r in rows if r["method"] != "expert"}:
        mine = [r for r in rows if (r["method"], r["order"]) == (method, order)]
        stages = sorted({int(r["stage"]) for r in mine})
        first_seen = {}
        for s in stages:
            for r in mine:
                if int(r["stage"]) == s:
                    first_seen.setdefault(r["modality"], s)
        bws = []
        for s in stages:
            rg = {}
            for m in {r["modality"] for r in mine if int(r["stage"]) == s}:
                ratios = [float(r["score"]) / expert[(m, r["dataset"])] for r in mine
                          if int(r["stage"]) == s and r["modality"] == m]
                rg[m] = 100 * sum(ratios) / len(ratios)
            old = [m for m in rg if first_seen[m] < s]
            bws.append(sum(rg[m] for m in old) / len(old) if old else 100.0)
        out.setdefault(method, {})[order] = (bws[-1], sum(bws) / len(bws))
    return out


@pytest.mark.slow
def test_sweep_end_to_end_picks_the_best_value_on_val(tmp_path, micro_assets, monkeypatch, capsys):
    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    path = micro_config(micro_assets, tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", str(path), "--method", "Replay (10%)", "--param", "replay.ratio", "--values", "0.5,0.05",
            "--out", str(out), "--quiet", "orders.reverse=[point, image]", *SMALL_VAL]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["eval"]["split"] == "val"
    assert [m["name"] for m in cfg["methods"]] == ["Replay (10%) [replay.ratio=0.5]", "Replay (10%) [replay.ratio=0.05]"]
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["image", "point"]  # trained once for both
    rows = _read(out / "scores.csv")
    assert rows and all(r["dataset"].endswith("-val") for r in rows)
    hand = _hand_metrics(rows)
    assert set(hand) == {"Replay (10%) [replay.ratio=0.5]", "Replay (10%) [replay.ratio=0.05]"}
    res = json.loads((out / "sweep.json").read_text())
    assert res["split"] == "val" and res["metric"] == "last_bw" and res["params"] == ["replay.ratio"]
    assert [r["text"]["replay.ratio"] for r in res["table"]] == ["0.5", "0.05"]
    for r in res["table"]:
        for o in ("sequential", "reverse"):
            assert r["orders"][o]["last_bw"] == pytest.approx(hand[r["method"]][o][0])
            assert r["orders"][o]["bw_mean"] == pytest.approx(hand[r["method"]][o][1])
        assert r["last_bw"] == pytest.approx(sum(v[0] for v in hand[r["method"]].values()) / 2)

    def best(i):  # highest average over the orders; a tie goes to the smaller ratio (0.05)
        avg = {m: sum(v[i] for v in per.values()) / len(per) for m, per in hand.items()}
        top = max(avg.values())
        tied = [m for m, a in avg.items() if top - a <= 1e-9 * max(1, abs(top))]
        return min(tied, key=lambda m: float(m.split("=")[1].rstrip("]")))

    assert res["chosen"]["method"] == best(0)
    md = (out / "sweep.md").read_text()
    assert md.strip() in printed and f"Chosen: **replay.ratio={res['chosen']['text']['replay.ratio']}**" in md
    assert md.count("\n| 0.5 |") + md.count("\n| **0.5** |") == 1
    # a resumed sweep trains nothing more and can rank by the other metric
    before = sorted(p for p in out.rglob("DONE"))
    assert main(argv + ["--resume", "--metric", "mean_bw"]) == 0
    assert sorted(p for p in out.rglob("DONE")) == before
    res2 = json.loads((out / "sweep.json").read_text())
    assert res2["metric"] == "mean_bw" and res2["chosen"]["method"] == best(1)


def test_with_several_seeds_the_choice_uses_the_mean_over_the_seeds(tmp_path):
    """A sweep over a config with seeds: each value's metrics are the means over the seeds (two seeds
    here, one favouring each value, so that only the mean decides)."""
    _, cfg = _cfg(tmp_path, orders={"sequential": ["image", "point"], "reverse": ["point", "image"]})
    plan = plan_sweep(cfg, "EWC", [SweepParam("ewc.lam", ["10", "1"])], tmp_path / "sw")
    texts = []
    for seed, table in ((0, {"EWC [ewc.lam=10]": (0.9, 0.9), "EWC [ewc.lam=1]": (0.5, 0.5)}),
                        (1, {"EWC [ewc.lam=10]": (0.4, 0.4), "EWC [ewc.lam=1]": (0.7, 0.7)})):
        _scores(tmp_path / f"s{seed}.csv", table)
        lines = (tmp_path / f"s{seed}.csv").read_text().splitlines()
        head, cols = lines[0], lines[0].split(",")
        i = cols.index("seed")
        texts += [",".join(c if k != i else str(seed) for k, c in enumerate(line.split(","))) for line in lines[1:]]
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "scores.csv").write_text("\n".join([head] + texts) + "\n")
    res = analyse(plan, "last_bw")
    # last BW per seed: lam=10: 90 and 40 -> 65; lam=1: 50 and 70 -> 60 (seed 1 alone would choose lam=1)
    assert [r["last_bw"] for r in res["table"]] == pytest.approx([65.0, 60.0])
    assert res["chosen"]["text"] == {"ewc.lam": "10"}
