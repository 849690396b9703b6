"""``mera sweep CONFIG --method NAME --param KEY --values V1,V2,...``: choose a hyper-parameter of one
method on the validation split (see mera.runner.sweep)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers):
    s = subparsers.add_parser(
        "sweep", help="choose a method's hyper-parameter on the validation split (one run, every value)",
        description="Runs ONE config holding only --method, copied once per value of --param (a grid for several "
                    "--param/--values pairs), evaluated on the validation sets (eval.split=val; the test sets are "
                    "never read), and writes sweep.md and sweep.json in the run folder with the chosen value.")
    s.add_argument("config", help="YAML config (e.g. configs/toy/demo.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. orders.reverse=null")
    s.add_argument("--method", required=True, metavar="NAME", help="the method to tune (its name in the config)")
    s.add_argument("--param", action="append", default=[], metavar="KEY",
                   help="<plug-in>.<parameter> of one of the method's plug-ins (e.g. ewc.lam, realign.ratio), or a "
                        "train.* config key (one run per value); repeat with --values for a grid")
    s.add_argument("--values", action="append", default=[], metavar="V1,V2,...",
                   help="comma-separated values of the --param before it (read as YAML)")
    s.add_argument("--out", help="run folder (default: runs/<name>-sweep-<method>)")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train independent experts and (order, value) chains in N processes (as mera run)")
    s.add_argument("--metric", default="last_bw", choices=("last_bw", "mean_bw"),
                   help="what to maximise: last-stage backward RG (default) or mean backward RG, both averaged "
                        "over the orders")
    s.add_argument("--resume", action="store_true", help="continue the sweep's run(s), skipping finished stages")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    from mera.config import load_config
    from mera.errors import ConfigError
    from mera.runner.names import slug
    from mera.runner.run_config import RunConfig
    from mera.runner.sweep import SweepParam, format_markdown, parse_values, plan_sweep, run_sweep

    if len(args.param) != len(args.values):
        raise ConfigError(f"give one --values after each --param (got {len(args.param)} --param and "
                          f"{len(args.values)} --values)")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    params = [SweepParam(k, parse_values(k, v)) for k, v in zip(args.param, args.values)]
    cfg = load_config(args.config, args.overrides, RunConfig)
    out = Path(args.out or Path("runs") / f"{cfg.name}-sweep-{slug(args.method)}")
    plan = plan_sweep(cfg, args.method, params, out, source=str(args.config))
    result = run_sweep(plan, config_dir=Path(args.config).resolve().parent, resume=args.resume,
                       workers=args.workers, metric=args.metric,
                       progress=not args.quiet and sys.stderr.isatty() and args.workers == 1)
    from mera import dist

    if dist.is_main():
        print(format_markdown(result))
        print(f"sweep folder: {out}\n  table: {out / 'sweep.md'}\n  json:  {out / 'sweep.json'}")
    return 0
