"""``mera report SCORES... [ITEMS...]``: tables and figures from one or more scores.csv files (and, for
the bootstrap intervals, their per-item scores: items.csv, given or found next to the scores.csv)."""

from __future__ import annotations


def add_parser(subparsers):
    rep = subparsers.add_parser("report", help="tables and figures from one or more scores.csv files")
    rep.add_argument("scores", nargs="+", help="scores files (columns method,order,stage,modality,dataset,task,score), "
                     "and optionally their per-item scores (items.csv, told apart by its header; by default the "
                     "items.csv next to a single scores file)")
    rep.add_argument("--out", help="folder for report.md, report.html, metrics.json and figures/")
    rep.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown")
    rep.add_argument("--config-dir", help="the folder that relative data paths of the run's config are relative to "
                     "(for report.html's gallery; default: guessed as mera export does)")
    rep.set_defaults(func=run)
    return rep


def gallery_for(scores: list[str], config_dir: str | None = None):
    """report.html's gallery when ``scores`` is one run directory's scores.csv; None otherwise (the
    page then says why it has none)."""
    from mera.eval.html_report import run_dir_of

    run = run_dir_of(scores)
    if run is None:
        return None
    from mera.config import load_config
    from mera.errors import MeraError
    from mera.eval.gallery import Gallery
    from mera.interop.export import guess_config_dir
    from mera.runner.gallery import gallery_of_run
    from mera.runner.run_config import RunConfig

    try:
        cfg = load_config(run / "config.yaml", [], RunConfig)
    except MeraError as e:
        return Gallery(missing=f"no gallery: the run's config cannot be read ({e})")
    return gallery_of_run(run, cfg, guess_config_dir(cfg, run, config_dir))


def run(args) -> int:
    from mera.eval.report import report_command, split_inputs

    scores, _ = split_inputs(args.scores)
    return report_command(args.scores, out=args.out, as_json=args.json, html=True,
                          gallery=lambda: gallery_for(scores, args.config_dir))
