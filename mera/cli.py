"""The ``mera`` command: run | report | toy.

Every user-facing error (bad config, malformed scores or dataset file, missing media,
bad checkpoint) is printed as one line, with a non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch is imported anywhere: OpenMP busy-waiting slows training ~20x on a loaded
# 2-core machine; passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mera.errors import MeraError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mera", description="Modality-incremental continual learning for multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and evaluate experts and methods through the modality orders of a config")
    r.add_argument("config", help="YAML config (e.g. configs/toy/demo.yaml)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.instruct.lr_lora=1e-3")
    r.add_argument("--out", help="run directory (default: runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue a run directory, skipping finished stages")
    r.add_argument("--dry-run", action="store_true", help="list the experts and (order, method, stage) to train")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train independent experts and (order, method) chains in N processes on CPU, "
                        "sharing the config's threads (default 1)")

    rep = sub.add_parser("report", help="tables and figures from one or more scores.csv files")
    rep.add_argument("scores", nargs="+", help="scores files (columns method,order,stage,modality,dataset,task,score)")
    rep.add_argument("--out", help="folder for report.md, metrics.json and figures/")
    rep.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown")

    from mera.export import add_export_parser, add_import_llava_parser
    from mera.generate import add_generate_parser

    add_generate_parser(sub)
    add_export_parser(sub)
    add_import_llava_parser(sub)
    from mera.eval.profile_run import add_profile_parser

    add_profile_parser(sub)
    from mera.data.convert import add_convert_parser

    data = sub.add_parser("data", help="real data sets: convert the official files to mera's format")
    dsub = data.add_subparsers(dest="data_command", required=True)
    add_convert_parser(dsub)
    toy = sub.add_parser("toy", help="the toy world and its model zoo")
    tsub = toy.add_subparsers(dest="toy_command", required=True)
    b = tsub.add_parser("build", help="build the toy model zoo (tokenizer, tiny LLM, encoders) into the cache")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    b.add_argument("--home", help="cache folder (default: $MERA_HOME or ~/.cache/mera)")
    s = tsub.add_parser("show", help="print a few samples per modality and save a PNG sheet of them")
    s.add_argument("--out", default="toy_show", help="folder for the PNG sheet (default: toy_show)")
    s.add_argument("--seed", type=int, default=0)
    d = tsub.add_parser("data", help="write the toy data sets (LLaVA-style JSON + media files)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=0)
    return p


def cmd_run(args) -> int:
    from mera.errors import ConfigError
    from mera.config import load_config
    from mera.run_config import RunConfig

    cfg = load_config(args.config, args.overrides, RunConfig)
    out = Path(args.out or Path("runs") / cfg.name)
    from mera.continual.runner import Runner

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    runner = Runner(cfg, out, config_dir=Path(args.config).resolve().parent, resume=args.resume,
                    progress=not args.quiet and sys.stderr.isatty() and args.workers == 1,
                    workers=args.workers)
    if args.dry_run:
        plan = runner.plan()
        print(f"run directory: {out}")
        print("experts (trained once, reused by every method and order):")
        for m in plan["experts"]:
            print(f"  experts/{m}")
        print("stages:")
        for s in plan["stages"]:
            print(f"  {s['order']:12s} {s['method']:24s} stage {s['stage']} {s['modality']:6s} {s['what']:16s} {s['dir']}")
        print(f"{len(plan['experts'])} experts, {len(plan['stages'])} stages")
        return 0
    scores = runner.run()
    from mera import dist

    if not dist.is_main():  # under a distributed launch only the main process prints the report
        return 0
    if (out / "report.md").is_file():
        print((out / "report.md").read_text())
    print(f"run directory: {out}\n  scores:  {scores}\n  report:  {out / 'report.md'}\n  figures: {out / 'figures'}")
    return 0


def cmd_report(args) -> int:
    from mera.eval.report import report_command

    return report_command(args.scores, out=args.out, as_json=args.json)


def cmd_data(args) -> int:
    from mera.data.convert import convert_command

    return convert_command(args)


def cmd_toy(args) -> int:
    if args.toy_command == "build":
        from mera.zoo.build import ZooConfig, build_zoo, format_build_summary

        manifest = build_zoo(ZooConfig(home=args.home), force=args.force, progress=sys.stderr.isatty())
        print(format_build_summary(manifest))
        return 0
    from mera.data.toy_world import ToyWorldConfig

    wcfg = ToyWorldConfig(seed=args.seed)
    if args.toy_command == "show":
        from mera.data.show import show

        text, png = show(args.out, wcfg)
        print(text)
        print(f"sheet: {png}")
        return 0
    from mera.data.toy_world import write_world

    paths = write_world(args.out, wcfg)
    for m, tasks in paths.items():
        for t, splits in tasks.items():
            for split, p in splits.items():
                print(f"{m:6s} {t:8s} {split:5s} {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may come before or after options (argparse stops positionals at options)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "run" or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no per-load "Loading weights" bars
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b.*")
    try:
        return {"run": cmd_run, "report": cmd_report, "data": cmd_data, "toy": cmd_toy}.get(
            args.command, getattr(args, "func", None))(args)
    except MeraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. disk full or a read-only folder while writing run files
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
