"""``mera toy build | show | data``: the toy world and its model zoo."""

from __future__ import annotations

import sys


def add_parser(subparsers):
    toy = subparsers.add_parser("toy", help="the toy world and its model zoo")
    tsub = toy.add_subparsers(dest="toy_command", required=True)
    b = tsub.add_parser("build", help="build the toy model zoo (tokenizer, tiny LLM, encoders) into the cache")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    b.add_argument("--home", help="cache folder (default: $MERA_HOME or ~/.cache/mera)")
    b.add_argument("--world-version", type=int, choices=(1, 2), default=1,
                   help="the toy world whose zoo to build (2: toy-world-2, docs/calibration.md)")
    s = tsub.add_parser("show", help="print a few samples per modality and save a PNG sheet of them")
    s.add_argument("--out", default="toy_show", help="folder for the PNG sheet (default: toy_show)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--world-version", type=int, choices=(1, 2), default=1, help="the toy world (2: toy-world-2)")
    d = tsub.add_parser("data", help="write the toy data sets (LLaVA-style JSON + media files)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--world-version", type=int, choices=(1, 2), default=1, help="the toy world (2: toy-world-2)")
    toy.set_defaults(func=run)
    return toy


def run(args) -> int:
    if args.toy_command == "build":
        from mera.zoo.build import ZooConfig, build_zoo, format_build_summary

        zcfg = ZooConfig(home=args.home, world={"version": args.world_version})
        manifest = build_zoo(zcfg, force=args.force, progress=sys.stderr.isatty())
        print(format_build_summary(manifest))
        return 0
    from mera.data.toy_world import ToyWorldConfig

    wcfg = ToyWorldConfig(seed=args.seed, version=args.world_version)
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
