"""A micro run killed with SIGKILL during training, during a merge, during evaluation and while
writing a file, resumed each time, ends with the scores of an uninterrupted run."""

import os
import signal
import subprocess
import sys

import pytest
from micro import micro_config  # noqa: E402

from mera.config import load_config
from mera.runner.loop import StageLoop
from mera.runner.run_config import RunConfig

pytestmark = pytest.mark.slow

METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1}]


def test_sigkill_at_any_moment_then_resume_gives_identical_scores(micro_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    cfg_path = micro_config(micro_assets, tmp_path, methods=METHODS, train={"checkpoint_every": 3, "cache_features": "disk"})
    cfg = load_config(cfg_path, [], RunConfig)
    ref = tmp_path / "ref"
    StageLoop(cfg, ref, config_dir=tmp_path, progress=False, log=lambda m: None).run()

    out = tmp_path / "crashy"
    cmd = [sys.executable, "-m", "mera", "run", str(cfg_path), "--out", str(out), "--resume", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERA_FAULT")}
    # each run dies at one point; the next resumes from what the previous one left
    for fault in ("train_step:10", "merge:2", "eval:3", "write:7", "train_step:25"):
        r = subprocess.run(cmd, env={**env, "MERA_FAULT": fault}, capture_output=True, text=True)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
    steps = list((out / ".steps").rglob("*.safetensors"))
    assert steps, "step checkpoints of the unfinished stage are kept for the resume"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "scores.csv").read_text() == (ref / "scores.csv").read_text()
    assert not list((out / ".steps").rglob("*.safetensors"))  # removed once every stage is DONE
    assert len(list((out / ".features").rglob("*.safetensors"))) > 100  # the disk feature cache was used
