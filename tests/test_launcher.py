"""``mera run --launcher submitit`` (units as jobs: SLURM, or submitit's local executor) and ``mera run
--only`` (one unit by hand): the job graph, the sbatch scripts, the errors, and end to end on the
micro run: the same scores.csv, byte for byte, as one process."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from micro import micro_config

from mera.config import load_config
from mera.errors import ConfigError, MeraError
from mera.runner.launch import Launcher, describe_jobs, plan_jobs, select_units
from mera.runner.run_config import RunConfig
from mera.runner.rundir import RunDir, Unit, require_experts

METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "Replay (10%)", "strategies": ["replay"], "replay_ratio": 0.1}]


def _cfg(tmp_path, *overrides, assets=Path("/nonexistent-assets"), methods=METHODS):
    path = micro_config(assets, tmp_path, methods=methods)
    return path, load_config(path, list(overrides), RunConfig)


def _mera(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mera", *map(str, args)], capture_output=True, text=True, cwd=cwd)


# ---------------------------------------------------------------------- config and selection (no training)
def test_launcher_section_is_validated_with_clear_errors(tmp_path):
    path, cfg = _cfg(tmp_path)
    assert cfg.launcher is None
    _, cfg = _cfg(tmp_path, "launcher.partition=gpu", "launcher.gpus_per_node=4", "launcher.tasks_per_node=4",
                  "launcher.mem_gb=64", "launcher.slurm_additional_parameters.account=proj")
    lc = cfg.launcher
    assert (lc.cluster, lc.partition, lc.gpus_per_node, lc.tasks_per_node, lc.mem_gb, lc.timeout_min) == \
        ("slurm", "gpu", 4, 4, 64.0, 1440)
    assert lc.slurm_additional_parameters == {"account": "proj"} and lc.folder == ".submitit"
    for bad, needle in [("launcher.gpu_per_node=2", "launcher.gpu_per_node: unknown key (did you mean 'gpus_per_node'?"),
                        ("launcher.cluster=pbs", "launcher.cluster"),
                        ("launcher.gpus_per_node=-1", "launcher.gpus_per_node"),
                        ("launcher.timeout_min=0", "launcher.timeout_min"),
                        ("launcher.slurm_additional_parameters.dependency=afterok:1", "set by mera's launcher"),
                        ("launcher.slurm_additional_parameters.--qos=x", "not an sbatch option name")]:
        with pytest.raises(ConfigError) as e:
            _cfg(tmp_path, bad)
        assert str(path) in str(e.value) and needle in str(e.value), (bad, str(e.value))
    with pytest.raises(ConfigError, match="tasks_per_node 2 must equal gpus_per_node 4"):
        _cfg(tmp_path, "launcher.gpus_per_node=4", "launcher.tasks_per_node=2")


def test_a_resume_may_change_the_launcher_section_only(tmp_path):
    _, cfg = _cfg(tmp_path)
    out = tmp_path / "out"
    RunDir(out, cfg).prepare(resume=False)
    _, moved = _cfg(tmp_path, "launcher.partition=other", "launcher.timeout_min=30")
    RunDir(out, moved).prepare(resume=True)  # where jobs run is not what they compute
    _, changed = _cfg(tmp_path, "launcher.partition=other", "train.lora.r=2")
    with pytest.raises(ConfigError) as e:
        RunDir(out, changed).prepare(resume=True)
    assert "train.lora.r" in str(e.value) and "launcher" not in str(e.value)


def test_only_names_units_by_method_name_or_slug_and_refuses_unknown_ones(tmp_path):
    path, cfg = _cfg(tmp_path, "seeds=[0,1]")
    assert select_units(cfg, ["sequential/Replay (10%)"]) == select_units(cfg, ["sequential/replay-10"]) == \
        [Unit("chain", order="sequential", methods=(1,), seed=0), Unit("chain", order="sequential", methods=(1,), seed=1)]
    assert select_units(cfg, ["experts/point", "sequential/fine-tuning", "experts"]) == [
        Unit("expert", modality="point", seed=0), Unit("expert", modality="point", seed=1),
        Unit("expert", modality="image", seed=0), Unit("expert", modality="image", seed=1),
        Unit("chain", order="sequential", methods=(0,), seed=0), Unit("chain", order="sequential", methods=(0,), seed=1)]
    with pytest.raises(ConfigError) as e:
        select_units(cfg, ["sequential/MERA"], source=str(path))
    assert str(path) in str(e.value) and "no method 'MERA'" in str(e.value)
    assert "'Fine-Tuning' (fine-tuning), 'Replay (10%)' (replay-10)" in str(e.value)
    with pytest.raises(ConfigError, match="no order 'reverse'; its orders: sequential"):
        select_units(cfg, ["reverse/fine-tuning"])
    with pytest.raises(ConfigError, match="no expert 'audio'; its experts: image, point"):
        select_units(cfg, ["experts/audio"])
    with pytest.raises(ConfigError, match="expected 'experts', 'experts/MODALITY' or 'ORDER/METHOD'"):
        select_units(cfg, ["fine-tuning"])
    rd = RunDir(tmp_path / "out", cfg)
    with pytest.raises(MeraError) as e:
        require_experts(rd, select_units(cfg, ["sequential/fine-tuning"]))
    assert "seed_0/experts/image, seed_1/experts/image" in str(e.value)
    require_experts(rd, select_units(cfg, ["experts/image", "sequential/fine-tuning"]))  # chosen together: fine


def test_the_paper_grid_is_one_job_per_expert_and_per_family_chain(tmp_path):
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs/toy/paper_grid.yaml", [], RunConfig)
    rd = RunDir(tmp_path / "g", cfg)
    units = rd.units()
    jobs = plan_jobs(rd, units)
    experts = [j for j in jobs if j.kind == "expert"]
    chains = [j for j in jobs if j.kind == "chain"]
    n = len(cfg.run_seeds)
    assert len(experts) == 4 * n and all(j.after == [] for j in experts)
    assert [j.units for j in chains] == [[u] for u in units if u.kind == "chain"]
    # every method of every order exactly once, its family's chains in one job, after its order's first expert
    assert sorted((u.seed, u.order, k) for j in chains for u in j.units for k in u.methods) == \
        sorted((s, o, k) for s in cfg.run_seeds for o in cfg.orders for k in range(len(cfg.methods)))
    for j in chains:
        assert j.after == [Unit("expert", modality=cfg.orders[j.units[0].order][0], seed=j.units[0].seed)]
    assert len(chains) < n * len(cfg.orders) * len(cfg.methods)  # families share a job


def test_slurm_jobs_wait_for_their_expert_and_carry_the_config_resources(tmp_path):
    """Under submitit's mocked sbatch: the experts as one job array, each chain after its expert
    (afterok, cancelled if that fails), with --detach a last job after every other; the sbatch
    scripts hold the launcher section's resources."""
    from submitit.core.test_core import MockedSubprocess

    _, cfg = _cfg(tmp_path, "launcher.partition=gpu", "launcher.mem_gb=64", "launcher.cpus_per_task=8",
                  "launcher.timeout_min=600", "launcher.slurm_additional_parameters.account=proj",
                  "launcher.slurm_additional_parameters.qos=high")
    out = tmp_path / "out"
    lines = []
    mock = MockedSubprocess(known_cmds=["srun"])
    with mock.context():
        assert Launcher(cfg, out, tmp_path, log=lines.append).launch(RunDir(out, cfg).units(), detach=True) is None
    folder = out / ".submitit"

    def sbatch(jid):
        return [x.split(" ", 1)[1] for x in (folder / f"{jid}_submission.sh").read_text().splitlines()
                if x.startswith("#SBATCH")]

    common = {"--partition=gpu", "--account=proj", "--qos=high", "--nodes=1", "--ntasks-per-node=1"}
    experts = sbatch(12)  # mocked job ids count from 12
    assert common | {"--array=0-1%2", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=600",
                     "--job-name=mera-micro-experts"} <= set(experts)
    assert not [x for x in experts if x.startswith("--dependency")]
    for jid, name in ((13, "sequential-fine-tuning"), (14, "sequential-replay-10")):
        s = set(sbatch(jid))
        assert common | {"--dependency=afterok:12_0", "--kill-on-invalid-dep=yes", "--gpus-per-node=1",
                         f"--job-name=mera-micro-{name}", "--time=600"} <= s, s
    final = sbatch(15)
    assert {"--dependency=afterok:12_0:12_1:13:14", "--job-name=mera-micro-finish", "--time=60"} <= set(final)
    assert not [x for x in final if x.startswith(("--gpus", "--mem"))]
    assert "[sequential / Replay (10%)] job 14 after 12_0" in lines
    # a job's pickle is the unit job and its arguments: the resolved config and one unit
    import pickle

    fn, args = (lambda d: (d.function, d.args))(pickle.loads((folder / "13_submitted.pkl").read_bytes()))
    assert type(fn).__name__ == "UnitJob" and args[0] == cfg and Path(args[1]) == out.absolute()
    assert args[3] == [Unit("chain", order="sequential", methods=(0,), seed=0)]


def test_slurm_needs_srun_and_detach_needs_slurm(tmp_path):
    _, cfg = _cfg(tmp_path)
    out = tmp_path / "out"
    if shutil.which("srun") is None:
        with pytest.raises(ConfigError, match="launcher.cluster is 'slurm' but .*srun.*launcher.cluster=local"):
            Launcher(cfg, out, tmp_path, log=lambda m: None).launch(RunDir(out, cfg).units())
    _, local = _cfg(tmp_path, "launcher.cluster=local")
    with pytest.raises(ConfigError, match="--detach needs SLURM"):
        Launcher(local, out, tmp_path).launch(RunDir(out, local).units(), detach=True)


def test_dry_run_lists_the_jobs_and_writes_nothing(tmp_path):
    path, cfg = _cfg(tmp_path)
    out = tmp_path / "x"
    r = _mera("run", path, "--dry-run", "--launcher", "submitit", "--out", out, "launcher.partition=gpu")
    assert r.returncode == 0, r.stderr
    assert "jobs to submit (--launcher submitit, cluster slurm; each: partition gpu, 1 GPU(s)" in r.stdout
    listed = r.stdout.split("jobs to submit")[1].splitlines()[1:]
    assert [x.strip().split("   ")[0] for x in listed[:4]] == [
        "1  expert image", "2  expert point", "3  sequential / Fine-Tuning", "4  sequential / Replay (10%)"]
    assert "after: expert image" in listed[2] and "after: expert image" in listed[3]
    assert "this process, once every job has ended" in listed[4]
    assert not out.exists()
    r = _mera("run", path, "--dry-run", "--only", "sequential/replay-10", "--out", out)
    assert r.returncode == 0 and "chosen with --only (every seed):\n  sequential / Replay (10%)\n" in r.stdout, r.stdout
    assert describe_jobs(cfg, out, [])[-1].startswith("  then:")


def test_bad_only_and_launcher_arguments_are_one_line_errors(tmp_path):
    path, _ = _cfg(tmp_path)
    out = tmp_path / "never"
    for args, needle in [(["--only", "sequential/MERA"], "no method 'MERA'"),
                         (["--launcher", "submitit", "--workers", "2"], "leave out --workers"),
                         (["--detach"], "--detach goes with --launcher submitit"),
                         (["--only", "sequential/fine-tuning"], "experts/image")]:
        r = _mera("run", path, "--out", out, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, (args, r.stderr)
    assert not out.exists()


# ---------------------------------------------------------------------- end to end (training)
@pytest.fixture(scope="module")
def reference(micro_assets, tmp_path_factory):
    """The micro config (2 modalities, Fine-Tuning and Replay: two families, so two chain jobs), run
    in one process with ``--workers 1``."""
    tmp = tmp_path_factory.mktemp("launch")
    mp = pytest.MonkeyPatch()
    mp.setenv("MERA_HOME", str(tmp / "home"))
    path = micro_config(micro_assets, tmp, methods=METHODS)
    out = tmp / "one"
    r = _mera("run", path, "--out", out, "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    yield path, out
    mp.undo()


@pytest.mark.slow
def test_local_submitit_jobs_give_the_scores_of_one_process(reference, tmp_path):
    path, one = reference
    cfg = yaml.safe_load(path.read_text())
    cfg["launcher"] = {"cluster": "local", "gpus_per_node": 0, "timeout_min": 30}
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "jobs"
    r = _mera("run", local, "--out", out, "--launcher", "submitit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
    assert (out / "report.md").is_file() and (out / "efficiency.json").is_file()
    assert "submitit (local): 4 jobs" in r.stdout and "job" in r.stdout
    logs = sorted(p.name for p in (out / ".submitit").glob("*_log.out"))
    assert len(logs) == 4, logs  # one job per expert and per chain
    ran = "".join((out / ".submitit" / n).read_text() for n in logs)
    assert "[expert image] training" in ran and "[sequential / Replay (10%)] stage 2 point" in ran
    # resumed with everything done: nothing submitted, the same scores
    r = _mera("run", local, "--out", out, "--launcher", "submitit", "--resume")
    assert r.returncode == 0 and "submitit (local): 0 jobs" in r.stdout, r.stdout + r.stderr
    assert (out / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()


@pytest.mark.slow
def test_only_runs_one_unit_by_hand(reference, tmp_path):
    path, one = reference
    # the experts alone, on a fresh run directory: only their rows
    fresh = tmp_path / "fresh"
    r = _mera("run", path, "--out", fresh, "--only", "experts", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not (fresh / "sequential").exists()
    rows = (one / "scores.csv").read_text().splitlines()
    assert (fresh / "scores.csv").read_text().splitlines() == [x for x in rows if x.startswith("expert,") or x == rows[0]]
    # one chain of a finished run removed, then run by hand (by its slug): the same scores again
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    shutil.rmtree(copy / "sequential" / "replay-10")
    (copy / "scores.csv").unlink()
    r = _mera("run", path, "--out", copy, "--only", "sequential/replay-10", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (copy / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
    assert "[sequential / Fine-Tuning]" not in r.stdout and "[sequential / Replay (10%)] stage 2 point" in r.stdout


@pytest.mark.slow
def test_a_failing_job_is_named_with_its_log_and_its_chains_are_not_started(reference, tmp_path):
    path, _ = reference
    cfg = yaml.safe_load(path.read_text())
    cfg["launcher"] = {"cluster": "local", "gpus_per_node": 0, "timeout_min": 30}
    cfg["orders"] = {"sequential": ["image"]}  # one expert, one chain of each method
    cfg["train"]["instruct"]["lr_lora"] = 1e30
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bad"
    r = _mera("run", bad, "--out", out, "--launcher", "submitit")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: ")
    assert "3 job(s) did not end well" in line and "(expert image) failed: expert s" in line
    assert "the training loss is nan" in line and "_0_log.err)" in line
    assert "not submitted: sequential / Fine-Tuning: the job of its expert failed" in line
    assert not list(out.rglob("DONE"))


@pytest.mark.slow
def test_the_detach_job_writes_the_scores_and_the_report(reference, tmp_path):
    """--detach's last job (run here in-process): the scores, efficiency table and report of a finished
    run directory, as `mera run` writes them."""
    import time

    from mera.runner.launch import FinishJob

    path, one = reference
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    for name in ("scores.csv", "report.md", "efficiency.json"):
        (copy / name).unlink()
    cfg = load_config(path, [], RunConfig)
    res = FinishJob()(cfg, str(copy), str(path.parent), time.time())
    assert res == {"scores": str(copy / "scores.csv")}
    assert (copy / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
    assert (copy / "efficiency.json").is_file()
    assert (copy / "report.md").read_text().replace(str(copy), str(one)) == (one / "report.md").read_text()
