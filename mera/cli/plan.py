"""``mera plan CONFIG [key=value ...] [--preset P] [--gpus N] [--text-tokens T] [--json]``: for every phase
of a config, the parameters (trainable and frozen), the memory per GPU and the optimizer steps,
from the models' configs alone (meta device: no weights read, no GPU). The work:
:mod:`mera.runner.plan` (the run's phases) and :mod:`mera.train.plan` (models on the meta device,
formulas); docs/plan.md."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser("plan", help="parameters, memory per GPU and optimizer steps of every phase of a "
                                           "config, from the models' configs alone (before renting GPUs)")
    p.add_argument("config", help="YAML config (e.g. configs/paper/mera_sequential.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. paths.models=/models")
    p.add_argument("--preset", default="single",
                   help="single (default), ddp, fsdp (configs/accelerate/<name>.yaml) or the path "
                        "of an accelerate config file")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="number of GPUs (processes) of the preset (default: the preset file's num_processes)")
    p.add_argument("--text-tokens", type=int, default=128, metavar="T",
                   help="text tokens of a sample (chat template, prompt, answer) added to its media tokens "
                        "(default 128)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import json

    from mera.config import load_config
    from mera.errors import ConfigError
    from mera.runner.plan import plan, render
    from mera.runner.run_config import RunConfig
    from mera.train.plan import read_preset

    if args.text_tokens < 0:
        raise ConfigError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    cfg = load_config(args.config, args.overrides, RunConfig)
    preset = read_preset(args.preset, args.gpus)
    out = plan(cfg, Path(args.config).resolve().parent, preset, text_tokens=args.text_tokens)
    print(json.dumps(out, indent=1) if args.json else render(out))
    return 0
