"""``mera run CONFIG [key=value ...]``: train and evaluate experts and methods through the
modality orders of a config."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers):
    r = subparsers.add_parser("run", help="train and evaluate experts and methods through the modality orders of a config")
    r.add_argument("config", help="YAML config (e.g. configs/toy/demo.yaml)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.instruct.lr_lora=1e-3")
    r.add_argument("--out", help="run directory (default: runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue a run directory, skipping finished stages")
    r.add_argument("--dry-run", action="store_true", help="list the experts and (order, method, stage) to train")
    r.add_argument("--quiet", action="store_true", help="no progress bars (nor the live board of --workers)")
    r.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train independent experts and (order, method) chains in N processes on CPU, "
                        "sharing the config's threads (default 1)")
    r.add_argument("--launcher", choices=["submitit"],
                   help="run the experts and every (order, method) chain as jobs of a cluster (SLURM, or local "
                        "processes), with the resources of the config's launcher: section (docs/launcher.md)")
    r.add_argument("--detach", action="store_true",
                   help="with --launcher submitit on SLURM: submit every job and a last one that writes the scores "
                        "and the report, then return at once")
    r.add_argument("--only", action="append", metavar="UNIT",
                   help="run only this unit, by hand: 'experts', 'experts/MODALITY' or 'ORDER/METHOD' (the method's "
                        "name or slug, e.g. sequential/mera-10); repeatable; implies --resume")
    r.set_defaults(func=run)
    return r


def run(args) -> int:
    from mera.config import load_config
    from mera.errors import ConfigError
    from mera.runner.run_config import RunConfig

    cfg = load_config(args.config, args.overrides, RunConfig)
    out = Path(args.out or Path("runs") / cfg.name)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.launcher and args.workers > 1:
        raise ConfigError("--launcher submitit runs every unit as a job of its own; leave out --workers")
    if args.detach and not args.launcher:
        raise ConfigError("--detach goes with --launcher submitit")
    only = None
    if args.only:
        from mera.runner.launch import select_units

        only = select_units(cfg, args.only, source=args.config)
        args.resume = True  # a unit chosen by hand belongs to a run: continue it (or start it)
    if args.dry_run:
        from mera.runner.rundir import RunDir

        rd = RunDir(out, cfg)
        plan = rd.plan()
        print(f"run directory: {out}")
        if cfg.seeds:
            print(f"seeds: {', '.join(map(str, cfg.seeds))} (everything below runs once per seed, in "
                  f"{out}/seed_<s>/)")
        print("methods (plug-ins with their parameters; the combinations are checked):")
        for meth in cfg.methods:
            items = ", ".join(x["name"] + (f"({', '.join(f'{k}={v}' for k, v in x.items() if k != 'name')})"
                                           if len(x) > 1 else "") for x in meth.strategies)
            print(f"  {meth.name:24s} {items}")
        print("experts (trained once, reused by every method and order):")
        for m in plan["experts"]:
            print(f"  experts/{m}")
        print("stages:")
        for s in plan["stages"]:
            print(f"  {s['order']:12s} {s['method']:24s} stage {s['stage']} {s['modality']:6s} {s['what']:16s} {s['dir']}")
        chains = [u for u in rd.units() if u.kind == "chain" and u.seed == cfg.run_seeds[0]]
        print("units of work per seed (the chains of a family run one after another; a step that another "
              f"method already trained is reused{'' if cfg.share else ': off, share is false'}):")
        for u in chains:
            print(f"  {u.order:12s} {' + '.join(cfg.methods[k].name for k in u.methods)}")
        if only is not None:
            print("chosen with --only (every seed):")
            for u in only:
                print(f"  {u.name(cfg)}")
        if args.launcher:
            from mera.runner.launch import describe_jobs

            print("\n".join(describe_jobs(cfg, out, only if only is not None else rd.units(), args.detach)))
        n = len(cfg.run_seeds)
        per = f"{len(plan['experts'])} experts, {len(plan['stages']) // n} stages"
        print(per if n == 1 else f"{per} per seed; {n} seeds: {len(plan['experts']) * n} experts, "
                                 f"{len(plan['stages'])} stages")
        return 0
    if args.launcher:
        scores = _launch(cfg, out, Path(args.config).resolve().parent, args.resume, only, args.detach)
        if scores is None:  # --detach: the jobs write the scores and the report
            return 0
    else:
        from mera.runner.loop import StageLoop

        # on a terminal: progress bars with one process; with --workers, a live board of the workers
        loop = StageLoop(cfg, out, config_dir=Path(args.config).resolve().parent, resume=args.resume,
                         progress=not args.quiet and sys.stderr.isatty(), workers=args.workers, only=only)
        scores = loop.run()
    from mera import dist

    if not dist.is_main():  # under a distributed launch only the main process prints the report
        return 0
    if (out / "report.md").is_file():
        print((out / "report.md").read_text())
    print(f"run directory: {out}\n  scores:  {scores}\n  report:  {out / 'report.md'}\n  figures: {out / 'figures'}")
    return 0


def _launch(cfg, out: Path, config_dir: Path, resume: bool, only, detach: bool):
    """``--launcher submitit``: check the run directory and the config's files here (as ``mera run``
    does, before anything is written), then submit the units as jobs (mera.runner.launch)."""
    from mera import dist
    from mera.continual.assets import load_assets
    from mera.errors import ConfigError
    from mera.runner.launch import Launcher
    from mera.runner.rundir import RunDir, require_experts

    if dist.world_size() > 1:
        raise ConfigError("--launcher submitit starts its own processes; run it once, not under torchrun / "
                          "accelerate launch")
    rd = RunDir(out, cfg)
    rd.prepare(resume, write=False)
    if only is not None:
        require_experts(rd, only)
    # bad paths or files fail here, before any job is submitted; the toy zoo and data are built once
    assets = load_assets(cfg, config_dir, cache_dir=rd.features_dir, judge=False)
    rd.prepare(resume)
    return Launcher(cfg, out, config_dir, assets=assets).launch(only if only is not None else rd.units(), detach=detach)
