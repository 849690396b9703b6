"""FSDP on 2 CPU processes (gloo): a training phase sharded by mera/train/fsdp.py takes the steps
one process takes, leaves whole weights in the model's own parameters, and resumes from a step
checkpoint written whole. The full run under the FSDP preset is in test_distributed.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mera.errors import MeraError

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("fsdp_phase.py")
TOL = 1e-6  # float summation order only (each process computes half a micro-batch)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MERA_FAULT", "WORLD_SIZE", "RANK", "LOCAL_", "ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)
    return env


def _run(out: Path, ck: Path | None = None, processes: int = 1, policy: str = "NO_WRAP", fault: str = "",
         **env_extra) -> int:
    cmd = [str(SCRIPT), str(out)] + ([str(ck)] if ck else [])
    env = _env()
    if processes == 1:
        cmd = [sys.executable] + cmd
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] + cmd
        env.update(ACCELERATE_USE_FSDP="true", FSDP_SHARDING_STRATEGY="FULL_SHARD", FSDP_AUTO_WRAP_POLICY=policy,
                   FSDP_USE_ORIG_PARAMS="true", FSDP_VERSION="1")
    if fault:
        env["MERA_FAULT"] = fault
    env.update(env_extra)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and not fault:
        print(r.stderr[-3000:])
    return r.returncode


def _close(a: dict, b: dict) -> None:
    assert len(a["losses"]) == len(b["losses"]) == 12 + 6
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < TOL
    assert a["shapes"] == b["shapes"]  # whole parameters again after the phase
    for k in a["weights"]:
        assert max(abs(x - y) for x, y in zip(a["weights"][k], b["weights"][k])) < TOL, k


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.json"
    assert _run(out) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("policy", ["NO_WRAP", "TRANSFORMER_BASED_WRAP"])
def test_a_sharded_phase_takes_the_steps_of_one_process(one, tmp_path, policy):
    assert _run(tmp_path / "two.json", processes=2, policy=policy) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    _close(one, two)
    assert "FullyShardedDataParallel" not in two["modules"]  # the wrappers are gone
    # both phases changed the weights they trained (else equal weights would prove nothing)
    for k in ("inp.weight", "blocks.1.lin.weight", "out.bias"):
        assert max(abs(x - y) for x, y in zip(one["init"][k], one["weights"][k])) > 1e-3, k


def test_a_resumed_sharded_phase_continues_from_its_whole_checkpoint(one, tmp_path):
    from safetensors.torch import load_file

    ck1, ck2 = tmp_path / "ck1", tmp_path / "ck2"
    assert _run(tmp_path / "a.json", ck1) == 0  # one process, uninterrupted: its final checkpoint
    # two processes killed at the 5th optimizer step (after the checkpoint of step 4), then resumed
    assert _run(tmp_path / "b.json", ck2, processes=2, fault="train_step:5") != 0
    assert json.loads(ck2.with_suffix(".json").read_text())["steps"] == 4
    assert not (tmp_path / "b.json").exists()
    assert _run(tmp_path / "b.json", ck2, processes=2) == 0
    _close(one, json.loads((tmp_path / "b.json").read_text()))
    # the final step checkpoints hold the same whole parameters and AdamW state (each state its own)
    a, b = load_file(str(ck1.with_suffix(".safetensors"))), load_file(str(ck2.with_suffix(".safetensors")))
    assert a.keys() == b.keys() and any(k.endswith("exp_avg") for k in a)
    for k in a:
        if not k.startswith("rng."):
            assert a[k].shape == b[k].shape, k
            assert (a[k].float() - b[k].float()).abs().max().item() < TOL, k
    assert (b["opt.0.exp_avg"] - b["opt.0.exp_avg_sq"]).abs().max().item() > 0


def test_unknown_fsdp_settings_are_refused_in_one_line(monkeypatch):
    from mera.train import fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    with pytest.raises(MeraError, match="FSDP_AUTO_WRAP_POLICY='SIZE_BASED_WRAP'"):
        fsdp.settings()
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    with pytest.raises(MeraError, match="fsdp_use_orig_params: true"):
        fsdp.settings()
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "1")  # older accelerate configs: the enum's number
    assert fsdp.settings() == fsdp.FsdpSettings("FULL_SHARD", "NO_WRAP", 1)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert fsdp.settings() is None


def test_a_penalty_on_the_parameters_is_refused_under_fsdp(tmp_path, capsys):
    # EWC's penalty reads the parameters outside the forward pass, where each process holds a shard
    assert _run(tmp_path / "p.json", processes=2, FSDP_PHASE_PENALTY="1") != 0
    assert "cannot run under FSDP" in capsys.readouterr().out
    assert _run(tmp_path / "p1.json", FSDP_PHASE_PENALTY="1") == 0  # one process: fine
