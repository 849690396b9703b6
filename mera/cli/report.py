"""``mera report SCORES...``: tables and figures from one or more scores.csv files."""

from __future__ import annotations


def add_parser(subparsers):
    rep = subparsers.add_parser("report", help="tables and figures from one or more scores.csv files")
    rep.add_argument("scores", nargs="+", help="scores files (columns method,order,stage,modality,dataset,task,score)")
    rep.add_argument("--out", help="folder for report.md, metrics.json and figures/")
    rep.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown")
    rep.set_defaults(func=run)
    return rep


def run(args) -> int:
    from mera.eval.report import report_command

    return report_command(args.scores, out=args.out, as_json=args.json)
