"""A plug-in package built and installed the real way (issue 22): tests/data/plugin_pkg declares an
entry point in group ``mera.plugins``; installed into a folder of its own (offline: pip without
build isolation, setuptools of the venv), a ``mera run`` that finds it on PYTHONPATH trains a
micro config with its strategy and merge rule."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from micro import micro_config

PACKAGE = Path(__file__).resolve().parent / "data" / "plugin_pkg"
METHOD = {"name": "Demo Plug-ins", "strategies": ["tag_along", "half_fold"]}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The package installed into a site folder of its own (PYTHONPATH makes it visible)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(PACKAGE, src)  # pip builds in the source folder: a copy keeps the repository clean
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "--target", str(site), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return site


def _env(site: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_the_installed_package_registers_its_plugins(plugin_site):
    code = ("from importlib.metadata import entry_points; from mera.config import registry; "
            "print([e.value for e in entry_points(group='mera.plugins')]); "
            "print(registry.lookup('strategy', 'tag_along').obj.name, registry.lookup('merge', 'half_fold').obj.name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(plugin_site))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["['mera_demo_plugins']", "tag_along half_fold"]
    # without the package on the path, the same names are unknown
    r = subprocess.run([sys.executable, "-c", code.split("print([e.value")[0] + "registry.lookup('merge', 'half_fold')"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown merge 'half_fold'" in r.stderr


@pytest.mark.slow
def test_a_run_trains_with_a_third_party_strategy_and_merge_rule(plugin_site, micro_assets, tmp_path):
    cfg = micro_config(micro_assets, tmp_path, methods=[METHOD])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(cfg), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=_env(plugin_site))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "scores.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["method"] == METHOD["name"]]
    assert {row["stage"] for row in rows} == {"1", "2"} and all(row["score"] for row in rows)
    resolved = yaml.safe_load((out / "config.yaml").read_text())["methods"]
    assert resolved == [{"name": METHOD["name"], "strategies": [{"name": "tag_along"}, {"name": "half_fold"}]}]
    manifest = json.loads((out / "sequential/demo-plug-ins/stage_2_point/manifest.json").read_text())
    assert manifest["log"]["tag_along"] == {"name": "tag_along", "stage": 2}  # the strategy ran, under its name
    assert manifest["log"]["merge_coef"] == 0.5  # the merge rule folded the stage's delta
