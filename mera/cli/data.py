"""``mera data convert SET --src DIR --out DIR ...``: real data sets' official files converted to
mera's dataset JSON (the conversion itself: :mod:`mera.data.convert`)."""

from __future__ import annotations

import argparse


def add_convert_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``mera data convert`` on ``p``."""
    from mera.data.convert import KNOWN_SETS

    p.add_argument("set", metavar="SET", help=f"data set: {', '.join(KNOWN_SETS)}")
    p.add_argument("--src", required=True, help="folder holding the data set's official files")
    p.add_argument("--out", required=True, help="output folder for <set>_<split>.json and its reports")
    p.add_argument("--split", choices=("train", "test", "all"), default="all", help="split(s) to write (default: all)")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop samples whose media file is missing (listed in <set>_<split>.missing.txt) "
                        "instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default: 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="subset size of every split (overrides the paper's sizes; a seeded random subset)")
    p.add_argument("--media-dir", default=None, help="folder the media paths are relative to (default: --src)")
    p.add_argument("--media-pattern", default=None,
                   help="media file name template relative to --media-dir, e.g. '{youtube_id}_{start_time}.wav' "
                        "(fields per set: see the converter's documentation)")
    p.add_argument("--no-confidence-filter", dest="confidence_filter", action="store_false",
                   help="clotho_aqa: keep answers of every confidence (default: only 'yes')")
    return p


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``convert`` command to ``subparsers`` (e.g. those of ``mera data``)."""
    from mera.data.convert import CONVERTERS

    p = subparsers.add_parser("convert", help="convert a real data set's official files into mera's dataset JSON",
                              description="Convert a real data set's official files into mera's dataset JSON. "
                                          "Sets: " + ", ".join(f"{s.name} ({s.summary})" for s in CONVERTERS.values()))
    return add_convert_arguments(p)


def add_parser(subparsers):
    data = subparsers.add_parser("data", help="real data sets: convert the official files to mera's format")
    dsub = data.add_subparsers(dest="data_command", required=True)
    add_convert_parser(dsub)
    data.set_defaults(func=run)
    return data


def convert_command(args: argparse.Namespace) -> int:
    """Run ``mera data convert`` from parsed arguments; prints one line per written split."""
    from mera.data.convert import convert

    res = convert(args.set, args.src, args.out, split=args.split, skip_missing=args.skip_missing, seed=args.seed,
                  limit=args.limit, media_dir=args.media_dir, media_pattern=args.media_pattern,
                  confidence_filter=args.confidence_filter)
    for sp, r in res.items():
        miss = f", {r['missing']} missing media skipped (see {r['missing_report']})" if r["missing"] else ""
        print(f"{sp:5s} {r['samples']:7d} samples  {r['dataset']}{miss}")
    return 0


def run(args) -> int:
    return convert_command(args)
