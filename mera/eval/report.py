"""Reports over scores tables: Markdown tables, metrics.json and PNG figures.

``mera report SCORES.csv [...] [--out DIR] [--json]`` calls :func:`report_command`; the
run command calls :func:`write_report` at the end of a run. Everything is computed
before anything is written, so a malformed input leaves an existing report untouched.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from mera.errors import DataError
from mera.eval.metrics import RunMetrics, ScoreRow, read_scores, run_metrics, summary_object
from mera.io import atomic_path, write_json, write_text

UP = "\u2191"  # ↑ positive backward transfer marker
DASH = "\u2013"  # – not seen yet / no run
PM = "\u00b1"  # ±

# ----------------------------------------------------------------------------- helpers


def slug(text: str) -> str:
    """File-name-safe slug: ``"MERA (10%)" -> "mera-10pct"``."""
    s = text.lower().replace("%", "pct").replace("+", "plus")
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "x"


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return f"{x:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rose(now: float, before: float) -> bool:
    """True if ``now`` is above ``before`` at the displayed precision (2 decimals)."""
    return round(now, 2) > round(before, 2)


def _methods_orders(runs: Sequence[RunMetrics]) -> tuple[list[str], list[str]]:
    methods: list[str] = []
    orders: list[str] = []
    for r in runs:
        if r.method not in methods:
            methods.append(r.method)
        if r.order not in orders:
            orders.append(r.order)
    return methods, orders


def _stage_means(runs: Sequence[RunMetrics], attr: str) -> dict[str, list[float]]:
    """Per method, the per-stage mean over its orders of ``attr`` (bw_rg / fw_rg).

    Stage i's denominator is the number of that method's orders that have a stage i.
    """
    out: dict[str, list[float]] = {}
    methods, _ = _methods_orders(runs)
    for m in methods:
        series = [getattr(r, attr) for r in runs if r.method == m]
        n = max(len(s) for s in series)
        out[m] = [
            sum(s[i] for s in series if len(s) > i) / sum(1 for s in series if len(s) > i) for i in range(n)
        ]
    return out


# ----------------------------------------------------------------------------- markdown


def render_markdown(runs: Sequence[RunMetrics], sources: Sequence[str] = ()) -> str:
    """The Markdown report: a Table-2-style summary, then each run's per-stage progression."""
    methods, orders = _methods_orders(runs)
    headline = summary_object(runs)["last_stage_bw"]
    lines: list[str] = ["# Continual-learning report", ""]
    if sources:
        lines += ["Scores: " + ", ".join(f"`{s}`" for s in sources), ""]
    lines += [
        "## Backward relative gain (%)",
        "",
        "| method | " + " | ".join(_cell(o) for o in orders) + " | last-stage BW (avg over orders) |",
        "|---" * (len(orders) + 2) + "|",
    ]
    by_key = {(r.method, r.order): r for r in runs}
    for m in methods:
        cells = []
        for o in orders:
            r = by_key.get((m, o))
            if r is None:
                cells.append(DASH)
            else:
                std = "n/a" if math.isnan(r.bw_std) else f"{r.bw_std:.2f}"
                cells.append(f"{r.bw_mean:.2f} {PM} {std}")
        lines.append(f"| {_cell(m)} | " + " | ".join(cells) + f" | {headline[m]:.2f} |")
    lines += [
        "",
        f"Each order's cell is the mean {PM} sample standard deviation (n-1) of the Backward "
        "Relative Gain over all stages, stage 1 (100% by definition) included. "
        "Last-stage BW: the last stage's Backward RG, averaged over the orders present.",
        "",
        "## Per-stage progression",
        "",
        "RG of a modality = mean over its datasets of score / expert score, in %. "
        "Backward RG = mean RG of the modalities seen before the stage; Forward RG = RG of the "
        "modality new at the stage; both are 100% at stage 1 by definition.",
        "",
    ]
    for r in runs:
        mods = r.modalities
        lines += [
            f"### {r.method}, order {r.order} ({' → '.join(mods)})",
            "",
            "| stage | new | " + " | ".join(_cell(m) for m in mods) + " | Backward RG | Forward RG |",
            "|---" * (len(mods) + 4) + "|",
        ]
        for i, stage_rg in enumerate(r.rg):
            cells = []
            for m in mods:
                if m not in stage_rg:
                    cells.append(DASH)
                    continue
                text = _fmt(stage_rg[m])
                if i > 0 and m in r.rg[i - 1] and _rose(stage_rg[m], r.rg[i - 1][m]):
                    text += f" {UP}"
                cells.append(text)
            bw = _fmt(r.bw_rg[i])
            if i > 0 and _rose(r.bw_rg[i], r.bw_rg[i - 1]):
                bw += f" {UP}"
            lines.append(
                f"| {i + 1} | {_cell(mods[i])} | " + " | ".join(cells) + f" | {bw} | {_fmt(r.fw_rg[i])} |"
            )
        lines.append("")
    lines += [
        f"{UP} marks positive backward transfer: a modality's RG (or the Backward RG) above its "
        "value at the previous stage. " + DASH + " marks a modality not seen yet.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _line_figure(series: dict[str, list[float]], ylabel: str, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = max(len(v) for v in series.values())
    for method, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=method)
    ax.axhline(100.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("stage")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _png(fig)


def _heatmap(run: RunMetrics) -> bytes:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.array([[np.nan if v is None else v for v in row] for row in run.accuracy_matrix()], dtype=float)
    n_stages, n_mods = matrix.shape
    fig = Figure(figsize=(1.3 * n_mods + 2.4, 0.7 * n_stages + 1.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(100.0, float(np.nanmax(matrix)))
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(n_stages):
        for j in range(n_mods):
            v = matrix[i, j]
            if not np.isnan(v):
                color = "black" if v > 0.6 * vmax else "white"
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(n_mods), run.modalities)
    ax.set_yticks(range(n_stages), [f"{i + 1} ({m})" for i, m in enumerate(run.modalities)])
    ax.set_xlabel("modality")
    ax.set_ylabel("stage (new modality)")
    ax.set_title(f"{run.method}, {run.order}: RG (% of expert)")
    fig.colorbar(image, ax=ax, label="RG %")
    return _png(fig)


def render_figures(runs: Sequence[RunMetrics]) -> dict[str, bytes]:
    """PNG bytes by file name: backward_rg.png, forward_rg.png (per method, averaged over
    orders) and accuracy_<method-slug>_<order-slug>.png per run."""
    _, orders = _methods_orders(runs)
    note = f" (mean over orders: {', '.join(orders)})" if len(orders) > 1 else f" (order: {orders[0]})"
    figures = {
        "backward_rg.png": _line_figure(_stage_means(runs, "bw_rg"), "Backward RG (%)", "Backward relative gain" + note),
        "forward_rg.png": _line_figure(_stage_means(runs, "fw_rg"), "Forward RG (%)", "Forward relative gain" + note),
    }
    for r in runs:
        base = f"accuracy_{slug(r.method)}_{slug(r.order)}"
        name, k = f"{base}.png", 2
        while name in figures:  # two method names with the same slug
            name, k = f"{base}-{k}.png", k + 1
        figures[name] = _heatmap(r)
    return figures


# ----------------------------------------------------------------------------- commands


def _load(rows_or_paths) -> tuple[list[ScoreRow], list[str]]:
    if isinstance(rows_or_paths, (str, os.PathLike)):
        rows_or_paths = [rows_or_paths]
    items = list(rows_or_paths)
    if items and all(isinstance(x, ScoreRow) for x in items):
        return items, sorted({r.source for r in items}, key=[r.source for r in items].index)
    paths = [os.fspath(p) for p in items]
    return read_scores(paths), paths


def _build(rows_or_paths) -> tuple[dict, str, list[RunMetrics], list[str]]:
    rows, sources = _load(rows_or_paths)
    runs = run_metrics(rows)
    if not runs:
        raise DataError(f"{', '.join(sources) or 'scores'}: no method rows (only experts or empty); nothing to report")
    return summary_object(runs), render_markdown(runs, sources), runs, sources


def _write(out_dir: str | os.PathLike, markdown: str, metrics: dict, figures: dict[str, bytes]) -> list[Path]:
    out = Path(out_dir)
    written = []
    for name, data in figures.items():
        path = out / "figures" / name
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
        written.append(path)
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", markdown)
    return [out / "report.md", out / "metrics.json"] + written


def write_report(rows_or_paths, out_dir: str | os.PathLike) -> dict:
    """Write ``report.md``, ``metrics.json`` and ``figures/*.png`` under ``out_dir`` (atomically,
    after everything is computed) and return the metrics object (the content of metrics.json).

    ``rows_or_paths``: a list of :class:`ScoreRow`, or one or several scores CSV paths.
    """
    metrics, markdown, runs, _ = _build(rows_or_paths)
    _write(out_dir, markdown, metrics, render_figures(runs))
    return metrics


def _emit(text: str, stream) -> None:
    try:
        print(text, file=stream)
    except UnicodeEncodeError:  # a non-UTF-8 terminal
        stream.flush()
        stream.buffer.write((text + "\n").encode("utf-8"))
        stream.flush()


def report_command(paths: list[str], out: str | None = None, as_json: bool = False) -> int:
    """``mera report``: print the Markdown report (or, with ``as_json``, only the metrics JSON),
    and with ``out`` also write report.md, metrics.json and figures/ there. Returns 0;
    raises DataError on malformed input (before writing anything)."""
    metrics, markdown, runs, _ = _build(paths)
    written: list[Path] = []
    if out is not None:
        written = _write(out, markdown, metrics, render_figures(runs))
    if as_json:
        _emit(json.dumps(metrics, indent=2, allow_nan=False), sys.stdout)
    else:
        _emit(markdown, sys.stdout)
    if written:
        n_fig = len(written) - 2
        message = f"wrote {written[0]}, {written[1]} and {n_fig} figures in {Path(out) / 'figures'}"
        _emit(message, sys.stderr if as_json else sys.stdout)
    return 0
