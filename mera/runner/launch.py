"""A run's units of work chosen by hand (``mera run --only``) or run as jobs of a cluster
(``mera run --launcher submitit``): docs/launcher.md.

A grid's units are independent (mera.runner.rundir.Unit): each seed's experts, then the (order,
method) chains of one family (methods whose stages train the same steps, run one after another so
that the later ones reuse the first one's training). The launcher submits, through submitit:

1. the experts, one job each (one SLURM job array);
2. every chain unit, one job each, after the job of the expert its order starts from (SLURM:
   ``--dependency=afterok:<expert>``, with ``--kill-on-invalid-dep=yes`` so that a failed expert
   cancels its chains; the local executor has no dependencies: the launcher waits for the expert,
   then submits);
3. then it waits for every job and assembles scores.csv, efficiency.json and the report as ``mera
   run`` does; with ``--detach`` (SLURM only) a last small job does that after the others, and the
   command returns at once.

Every job runs :meth:`StageLoop.run_unit` on the one run directory, as ``--workers`` does: a unit is
locked while a process works on it (mera.io.UnitLock; a unit held by a live process is skipped), each
unit writes only its own folders, DONE last, and shared steps are renamed into place whole. A job
cut by its time limit (or pre-empted) is requeued by submitit up to 3 times and resumes: finished
stages are kept, an unfinished one restarts from its last step checkpoint (``train.checkpoint_every``).

submitit hands a job its arguments and the launcher its result as pickles in ``launcher.folder``
(inside the run directory by default): the only pickles mera reads, written by this user's own jobs,
never downloaded. The job's arguments are the resolved config, paths and units; its result is a
plain dict.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mera.errors import ConfigError, MeraError
from mera.runner.names import slug
from mera.runner.rundir import RunDir, Unit, start_expert

try:  # a job requeued after its time limit resumes (submitit calls checkpoint() on the signal)
    from submitit.helpers import Checkpointable as _Requeueable
except ImportError:  # submitit is the optional extra mera[slurm]; without it nothing here is submitted
    _Requeueable = object


# ---------------------------------------------------------------------- --only: units chosen by hand
def select_units(cfg, specs: list[str], source: str = "the config") -> list[Unit]:
    """The units named by ``--only`` values, every seed of the run, experts first: ``experts`` (all),
    ``experts/MODALITY``, or ``ORDER/METHOD`` (the method by its name in the config or its folder's
    slug, e.g. ``sequential/mera-10`` or ``"sequential/MERA (10%)"``). One chain per method: a family's
    other methods are not run."""
    rd = RunDir(".", cfg)
    experts, chains = [], []
    for spec in specs:
        what = spec.strip()
        head, _, rest = what.partition("/")
        if head == "experts":
            mods = rd.experts()
            if rest and rest not in mods:
                raise ConfigError(f"--only {spec!r}: {source} has no expert {rest!r}; its experts: "
                                  f"{', '.join(mods)}")
            experts += [Unit("expert", modality=m, seed=s) for s in cfg.run_seeds for m in ([rest] if rest else mods)]
            continue
        if not rest:
            raise ConfigError(f"--only {spec!r}: expected 'experts', 'experts/MODALITY' or 'ORDER/METHOD' "
                              f"(orders of {source}: {', '.join(cfg.orders)})")
        if head not in cfg.orders:
            raise ConfigError(f"--only {spec!r}: {source} has no order {head!r}; its orders: {', '.join(cfg.orders)}")
        k = next((i for i, m in enumerate(cfg.methods) if rest == m.name or slug(rest) == slug(m.name)), None)
        if k is None:
            valid = ", ".join(f"{m.name!r} ({slug(m.name)})" for m in cfg.methods)
            raise ConfigError(f"--only {spec!r}: {source} has no method {rest!r}; its methods (name, or the slug "
                              f"in brackets): {valid}")
        chains += [Unit("chain", order=head, methods=(k,), seed=s) for s in cfg.run_seeds]
    return list(dict.fromkeys(experts + chains))  # each once, in the order given


# ---------------------------------------------------------------------- the jobs
@dataclass
class JobSpec:
    """One job: its units (run one after the other in one process) and the jobs it waits for."""

    name: str
    units: list[Unit]
    after: list[Unit] = field(default_factory=list)  # expert units whose jobs must end well first

    @property
    def kind(self) -> str:
        return self.units[0].kind


def plan_jobs(rd: RunDir, units: list[Unit]) -> list[JobSpec]:
    """The jobs of ``units`` that are not done yet: one per expert, then one per chain unit, each after
    the expert job it starts from (none when that expert is already done)."""
    cfg = rd.cfg
    todo = [u for u in units if not rd.unit_done(u)]
    experts = [u for u in todo if u.kind == "expert"]
    jobs = [JobSpec(u.name(cfg), [u]) for u in experts]
    for u in todo:
        if u.kind == "chain":
            e = start_expert(cfg, u)
            jobs.append(JobSpec(u.name(cfg), [u], [e] if e in experts else []))
    return jobs


def executor_parameters(lc, name: str, *, after: list[str] = (), final: bool = False) -> dict:
    """submitit's AutoExecutor parameters of one job (``after``: SLURM job ids it waits for;
    ``final``: the small job that assembles the scores, without GPUs)."""
    p = {"name": name, "timeout_min": lc.timeout_min, "nodes": 1, "gpus_per_node": lc.gpus_per_node,
         "tasks_per_node": lc.tasks_per_node}
    if lc.cpus_per_task:
        p["cpus_per_task"] = lc.cpus_per_task
    if lc.mem_gb:
        p["mem_gb"] = lc.mem_gb
    if final:
        p.update(tasks_per_node=1, timeout_min=min(60, lc.timeout_min))
        p.pop("mem_gb", None)
    if final or not lc.gpus_per_node:
        p.pop("gpus_per_node")  # no GPU line at all (some SLURM versions refuse --gpus-per-node=0)
    if lc.partition:
        p["slurm_partition"] = lc.partition
    extra = dict(lc.slurm_additional_parameters)
    if after:
        p["slurm_dependency"] = "afterok:" + ":".join(after)
        extra["kill-on-invalid-dep"] = "yes"  # a failed expert cancels its chains (never pending forever)
    if extra:
        p["slurm_additional_parameters"] = extra
    return p


def submitit_folder(lc, out: Path) -> Path:
    f = Path(lc.folder).expanduser()
    return f if f.is_absolute() else out / f


def _executor(lc, folder: Path, params: dict):
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs the submitit package: pip install 'mera[slurm]' "
                          "(or submitit==1.5.4)") from None
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=lc.cluster)
    except RuntimeError as e:  # SlurmExecutor: no srun here
        raise ConfigError(f"launcher.cluster is {lc.cluster!r} but {e} (run from a SLURM login node, or set "
                          "launcher.cluster=local to run the jobs as processes of this machine)") from None
    try:
        ex.update_parameters(**params)
    except (ValueError, NameError, AssertionError) as e:  # submitit's own checks of sbatch parameters
        raise ConfigError(f"launcher: submitit refuses the job parameters: {str(e).splitlines()[0]}") from None
    return ex


class UnitJob(_Requeueable):
    """A job's work: set up the run's assets once, then run each unit (StageLoop.run_unit: locked,
    resumable). Returns which units are done. Requeued by submitit after a timeout or pre-emption."""

    def __call__(self, cfg, out: str, config_dir: str, units: list[Unit]) -> dict:
        t0 = time.perf_counter()
        _distributed_env()
        from mera.runner.loop import StageLoop

        loop = StageLoop(cfg, out, config_dir=Path(config_dir), resume=True, progress=False)
        loop.setup()
        for u in units:
            loop.run_unit(u)
        if not loop.main:
            return {}
        return {"done": [u.name(cfg) for u in units if loop.dir.unit_done(u)],
                "not_done": [u.name(cfg) for u in units if not loop.dir.unit_done(u)],
                "seconds": round(time.perf_counter() - t0, 1)}


class FinishJob(_Requeueable):
    """The last job of ``--detach``: scores.csv, efficiency.json and the report."""

    def __call__(self, cfg, out: str, config_dir: str, submitted_at: float) -> dict:
        t0 = time.perf_counter() - (time.time() - submitted_at)  # "all stages done in" counts from submission
        return {"scores": str(finish(cfg, Path(out), Path(config_dir), t0))}


def finish(cfg, out: Path, config_dir: Path, t0: float, assets=None, log=None) -> Path:
    """scores.csv, efficiency.json and the report, as at the end of ``mera run`` (StageLoop.finish); the
    report's gallery reads the evaluation sets, from ``assets`` (load_assets) or loaded here without the
    judge (nothing is trained or evaluated)."""
    from mera.continual.assets import load_assets
    from mera.runner.loop import StageLoop

    loop = StageLoop(cfg, out, config_dir=config_dir, resume=True, progress=False, log=log)
    if assets is None:
        assets = load_assets(cfg, config_dir, cache_dir=loop.dir.features_dir, judge=False)
    loop.attach_assets(assets)  # finish() reads the evaluation sets and may profile the final models
    return loop.finish(t0)


def _distributed_env() -> None:
    """In a job of several tasks (``tasks_per_node`` > 1), the variables torchrun would set (rank, world
    size, master address), so that the loop's processes form one group (mera.dist); every task sees
    every GPU of the job and takes the one of its local rank."""
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    try:
        n = JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (e.g. called directly)
        return
    if n > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# ---------------------------------------------------------------------- the launcher
class Launcher:
    """Submits the jobs of ``units`` to run in ``out`` and (unless ``detach``) waits for them."""

    def __init__(self, cfg, out: Path, config_dir: Path, *, log=None, poll_s: float | None = None, assets=None):
        from mera.runner.run_config import LauncherConfig

        self.assets = assets  # the config's assets, when the caller loaded them (for the report's gallery)
        self.cfg, self.out, self.config_dir = cfg, Path(out).absolute(), Path(config_dir).absolute()
        self.lc = cfg.launcher or LauncherConfig()
        self.rd = RunDir(self.out, cfg)
        self.folder = submitit_folder(self.lc, self.out)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.deps = self.lc.cluster == "slurm"  # SLURM orders jobs itself; the local executor cannot
        self.poll_s = poll_s if poll_s is not None else (30.0 if self.deps else 1.0)
        self.jobs: dict[Unit, object] = {}  # unit -> its submitit job
        self.outcome: dict[str, str | None] = {}  # job id -> None (ended well) or why not

    def _name(self, what: str) -> str:
        return f"mera-{slug(self.cfg.name)}-{slug(what)}"

    # ---------------------------------------------------------------- one job
    def _submit(self, spec: JobSpec):
        after = [self.jobs[e] for e in spec.after if e in self.jobs]
        if not self.deps:  # the local executor: wait here for what the job needs
            bad = [self._wait(j) for j in after]
            bad = [b for b in bad if b]
            if bad:
                self.log(f"[{spec.name}] not submitted: the job of its expert failed")
                self.outcome[f"not submitted: {spec.name}"] = "the job of its expert failed"
                return None
        params = executor_parameters(self.lc, self._name(spec.name),
                                     after=[str(j.job_id) for j in after] if self.deps else ())
        ex = _executor(self.lc, self.folder, params)
        job = ex.submit(UnitJob(), self.cfg, str(self.out), str(self.config_dir), spec.units)
        for u in spec.units:
            self.jobs[u] = job
        self.log(f"[{spec.name}] job {job.job_id}" + (f" after {', '.join(str(j.job_id) for j in after)}"
                                                        if after else ""))
        return job

    def _wait(self, job) -> str | None:
        """None when ``job`` ended well, else one line saying why not (its log file named); logged once."""
        jid = str(job.job_id)
        if jid not in self.outcome:
            what = ", ".join(u.name(self.cfg) for u, j in self.jobs.items() if j is job)
            try:
                res = job.result()
                self.outcome[jid] = None
                self.log(f"[{what}] job {jid} done" + (f" in {res['seconds']:.0f}s" if isinstance(res, dict)
                                                       and "seconds" in res else ""))
                if isinstance(res, dict) and res.get("not_done"):
                    self.log(f"[{what}] job {jid}: not done, held by another process (see its log "
                             f"{job.paths.stdout}): {', '.join(res['not_done'])}")
            except Exception as e:  # submitit's FailedJobError / UncompletedJobError: the job's own error
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                last = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
                last = re.sub(r"^[\w.]*(Error|Exception): ", "", last)  # mera.errors.MeraError: ... -> ...
                self.outcome[jid] = f"job {jid} ({what}) failed: {last[:300]} (log: {job.paths.stderr})"
                self.log(f"[{what}] {self.outcome[jid]}")
        return self.outcome[jid]

    # ---------------------------------------------------------------- the whole launch
    def launch(self, units: list[Unit], *, detach: bool = False) -> Path | None:
        """Submit the jobs; without ``detach`` wait for them and assemble the scores and the report
        (returns scores.csv); with it, submit the assembling job too and return None."""
        if detach and not self.deps:
            raise ConfigError("--detach needs SLURM's job dependencies; with launcher.cluster local the launcher "
                              "waits for its jobs (leave out --detach)")
        t0 = time.perf_counter()
        specs = plan_jobs(self.rd, units)
        skipped = [u for u in units if u not in {x for s in specs for x in s.units}]
        for u in skipped:
            self.log(f"[{u.name(self.cfg)}] done, skipped")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log(f"submitit ({self.lc.cluster}): {len(specs)} jobs, logs in {self.folder}")
        try:
            experts = [s for s in specs if s.kind == "expert"]
            if experts:  # one SLURM job array (separate processes on the local executor)
                ex = _executor(self.lc, self.folder, executor_parameters(self.lc, self._name("experts")))
                with ex.batch():
                    pending = [ex.submit(UnitJob(), self.cfg, str(self.out), str(self.config_dir), s.units)
                               for s in experts]
                for s, job in zip(experts, pending):
                    self.jobs[s.units[0]] = job
                    self.log(f"[{s.name}] job {job.job_id}")
            for s in specs:
                if s.kind == "chain":
                    self._submit(s)
            all_jobs = list(dict.fromkeys(self.jobs.values()))
            if detach:
                ids = [str(j.job_id) for j in all_jobs]
                params = executor_parameters(self.lc, self._name("finish"), after=ids, final=True)
                job = _executor(self.lc, self.folder, params).submit(FinishJob(), self.cfg, str(self.out),
                                                                     str(self.config_dir), time.time())
                self.log(f"[scores and report] job {job.job_id} after every other job; then: {self.out / 'report.md'}")
                return None
            self._wait_all(all_jobs)
        except KeyboardInterrupt:
            if self.deps:
                self.log("interrupted: the SLURM jobs go on (squeue, scancel); once they end, "
                         "`mera run CONFIG --resume --launcher submitit` assembles the scores and the report")
            else:  # the local jobs are this process's children: stop them (their unfinished stages are redone)
                for job in dict.fromkeys(self.jobs.values()):
                    job.cancel(check=False)
            raise
        scores = finish(self.cfg, self.out, self.config_dir, t0, assets=self.assets, log=self.log)
        bad = [f"{k}: {v}" if k.startswith("not submitted") else v for k, v in self.outcome.items() if v]
        if bad:
            raise MeraError(f"{self.out}: {len(bad)} job(s) did not end well: {'; '.join(bad)}; the finished units are "
                            "in scores.csv; fix the cause and run the same command with --resume")
        return scores

    def _wait_all(self, jobs: list) -> None:
        from submitit.helpers import as_completed

        for job in as_completed(jobs, poll_frequency=self.poll_s):
            self._wait(job)


def describe_jobs(cfg, out: Path, units: list[Unit], detach: bool = False) -> list[str]:
    """``--dry-run --launcher submitit``: the lines listing the jobs it would submit and their resources."""
    from mera.runner.run_config import LauncherConfig

    lc = cfg.launcher or LauncherConfig()
    rd = RunDir(out, cfg)
    specs = plan_jobs(rd, units)
    res = [f"partition {lc.partition}" if lc.partition else "the default partition",
           f"{lc.gpus_per_node} GPU(s)", f"{lc.tasks_per_node} task(s)"]
    if lc.cpus_per_task:
        res.append(f"{lc.cpus_per_task} CPUs")
    if lc.mem_gb:
        res.append(f"{lc.mem_gb:g} GB")
    res += [f"{lc.timeout_min} min"] + [f"{k}={v}" for k, v in lc.slurm_additional_parameters.items()]
    lines = [f"jobs to submit (--launcher submitit, cluster {lc.cluster}; each: {', '.join(res)}; "
             f"logs in {submitit_folder(lc, Path(out))}):"]
    n_exp = sum(s.kind == "expert" for s in specs)
    for i, s in enumerate(specs, 1):
        if s.kind == "expert":
            lines.append(f"  {i:3d}  {s.name}" + (f"   (job array, task {i - 1} of 0-{n_exp - 1})" if lc.cluster == "slurm"
                                                 and n_exp > 1 else ""))
        else:
            after = f"   after: {', '.join(e.name(cfg) for e in s.after)}" if s.after else ""
            lines.append(f"  {i:3d}  {s.name}{after}")
    done = len([u for u in units if rd.unit_done(u)])
    if done:
        lines.append(f"  ({done} unit(s) already done: not submitted)")
    lines.append("  then: scores.csv, efficiency.json and the report "
                 + ("(a last job, after every other: --detach)" if detach else "(this process, once every job has ended)"))
    return lines
