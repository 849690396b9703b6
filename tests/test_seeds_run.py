"""Several seeds in one run: every seed trains its own experts and chains in <out>/seed_<s>/, with the
loaded assets shared; a seed of a multi-seed run is exactly the single-seed run with that seed."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from micro import micro_config

pytestmark = pytest.mark.slow

METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "MERA (10%)", "strategies": ["merge", {"name": "realign", "ratio": 0.1}]}]


def _run(micro_assets, tmp_path, name, **top):
    cfg = micro_config(micro_assets, tmp_path, methods=METHODS)
    data = yaml.safe_load(cfg.read_text())
    # image -> video, both with MLP connectors: the micro point Q-Former's expert can score 0 on a
    # seed, and an expert's 0 leaves the relative gains undefined
    data["model"]["branches"] = {"image": data["model"]["branches"]["image"],
                                 "video": {"encoder": {"family": "toy_video", "path": str(micro_assets / "image")}}}
    data["orders"] = {"sequential": ["image", "video"]}
    data.update(top)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / name
    env = {**os.environ, "MERA_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(path), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "scores.csv", newline="") as f:
        return out, list(csv.DictReader(f))


def test_each_seed_of_a_multi_seed_run_is_the_single_seed_run(micro_assets, tmp_path):
    out, rows = _run(micro_assets, tmp_path, "two", seeds=[0, 1])
    _, one = _run(micro_assets, tmp_path, "one", seed=1)
    for s in (0, 1):
        assert (out / f"seed_{s}" / "experts" / "image" / "DONE").is_file()
        assert (out / f"seed_{s}" / "sequential" / "mera-10" / "stage_2_video" / "DONE").is_file()
        assert (out / f"seed_{s}" / "replay_memory").is_dir()
    assert not (out / "experts").exists()
    assert {r["seed"] for r in rows} == {"0", "1"}
    by_seed = {s: [r for r in rows if r["seed"] == s] for s in ("0", "1")}
    assert len(by_seed["0"]) == len(by_seed["1"]) == len(rows) // 2
    # seed 1 of the two-seed run is the run with seed: 1 (its own layout, same numbers)
    assert by_seed["1"] == one
    # and the seeds do differ (experts too): seed 0 is not seed 1 under another label
    strip = [{k: v for k, v in r.items() if k != "seed"} for r in by_seed["0"]]
    assert strip != [{k: v for k, v in r.items() if k != "seed"} for r in by_seed["1"]]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1]
    assert set(metrics["per_seed"]) == {"0", "1"}
    # the report's over-seed summary is made of the per-seed values
    lsb = [metrics["per_seed"][s]["last_stage_bw"]["MERA (10%)"] for s in ("0", "1")]
    assert metrics["last_stage_bw"]["MERA (10%)"] == pytest.approx(sum(lsb) / 2)
