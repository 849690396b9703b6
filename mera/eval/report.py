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


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


FINETUNE_NAMES = ("fine-tuning", "finetune", "fine tuning", "ft")


def realign_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """``(X, X + realign)`` for each method X whose name followed by "+ realign" is also a method
    (case and spacing ignored), (fine-tuning, "Realign only") and ("Merge only", "MERA (10%)") when
    both are present: realign added to fine-tuning is the realign-only ablation, and added to the
    merge it is MERA (the paper's Table 5 pairs realign on 10% with each method)."""
    def key(name: str) -> str:  # case and the spacing around "+" ignored
        return _norm(name).replace(" +", "+").replace("+ ", "+")

    by = {key(m): m for m in methods}
    pairs = []
    for m in methods:
        with_realign = key(m) + "+realign"
        if with_realign in by:
            pairs.append((m, by[with_realign]))
    ro = by.get("realign only")
    ft = next((by[n] for n in FINETUNE_NAMES if n in by), None)
    if ro and ft and not any(a == ft for a, _ in pairs):
        pairs.insert(0, (ft, ro))
    mo, mera10 = by.get("merge only"), by.get("mera (10%)")
    if mo and mera10 and not any(a == mo for a, _ in pairs):
        pairs.append((mo, mera10))
    return pairs


def ablation_rows(methods: Sequence[str]) -> list[tuple[str, bool, bool]]:
    """The paper's Table 4 rows present in ``methods``: (name, merge?, realign?) for fine-tuning,
    "Merge only", "Realign only" and every "MERA ..." method; empty when neither ablation ran."""
    norms = {_norm(m): m for m in methods}
    if "merge only" not in norms and "realign only" not in norms:
        return []
    rows = []
    for m in methods:
        n = _norm(m)
        if n in FINETUNE_NAMES:
            rows.append((m, False, False))
        elif n == "merge only":
            rows.append((m, True, False))
        elif n == "realign only":
            rows.append((m, False, True))
        elif n.startswith("mera"):
            rows.append((m, True, True))
    return rows


def _signed(x: float) -> str:
    return _fmt(x) if x < 0 or math.isnan(x) else "+" + _fmt(x)


def _extra_tables(runs: Sequence[RunMetrics], efficiency: dict | None) -> list[str]:
    methods, orders = _methods_orders(runs)
    by_key = {(r.method, r.order): r for r in runs}
    headline = summary_object(runs)["last_stage_bw"]

    def cell(m, o):
        r = by_key.get((m, o))
        if r is None:
            return DASH
        return f"{r.bw_mean:.2f} {PM} {'n/a' if math.isnan(r.bw_std) else f'{r.bw_std:.2f}'}"

    lines: list[str] = []
    rows = ablation_rows(methods)
    if rows:
        lines += ["## Ablation: merge and realign (like the paper's Table 4)", "",
                  "| method | merge | realign | " + " | ".join(_cell(o) for o in orders) + " | last-stage BW |",
                  "|---" * (len(orders) + 4) + "|"]
        for m, mg, ra in rows:
            mark = lambda b: "\u2713" if b else "\u2717"  # noqa: E731
            lines.append(f"| {_cell(m)} | {mark(mg)} | {mark(ra)} | "
                         + " | ".join(cell(m, o) for o in orders) + f" | {headline[m]:.2f} |")
        lines += ["", f"Backward RG, mean {PM} std over the stages, as in the main table.", ""]
    pairs = realign_pairs(methods)
    if pairs:
        lines += ["## What realign adds to each method (like the paper's Table 5)", "",
                  "| method | with realign | " + " | ".join(f"{_cell(o)}: \u0394mean / \u0394std" for o in orders) + " |",
                  "|---" * (len(orders) + 2) + "|"]
        for a, b in pairs:
            cells = []
            for o in orders:
                ra, rb = by_key.get((a, o)), by_key.get((b, o))
                if ra is None or rb is None:
                    cells.append(DASH)
                else:
                    cells.append(f"{_signed(rb.bw_mean - ra.bw_mean)} / {_signed(rb.bw_std - ra.bw_std)}")
            lines.append(f"| {_cell(a)} | {_cell(b)} | " + " | ".join(cells) + " |")
        lines += ["", "\u0394mean / \u0394std: the method with realign minus the method alone, in points of "
                  f"Backward RG (mean {PM} std over the stages). Realign added to fine-tuning is the "
                  "realign-only ablation.", ""]
    if efficiency:
        kinds = {e.get("memory_kind") for e in efficiency.values() if e.get("memory_kind")}
        mem = "GPU peak allocated" if kinds == {"cuda"} else "process peak RSS"
        lines += ["## Efficiency (like the paper's Table 3), measured on this run", "",
                  f"| method | training time (s) | training peak memory (MiB, {mem}) | inference ms / token "
                  f"| inference peak memory (MiB, {mem}) | LLM parameters at inference (M) |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            e = efficiency.get(m)
            if not e:
                continue
            num = lambda k, f: DASH if e.get(k) is None else format(e[k], f)  # noqa: E731, B023 (used in this iteration)
            lines.append(f"| {_cell(m)} | {num('train_seconds', '.1f')} | {num('train_peak_mib', '.0f')} | "
                         f"{num('infer_ms_per_token', '.2f')} | {num('infer_peak_mib', '.0f')} | "
                         f"{num('llm_params_m', '.3f')} |")
        lines += ["", "Training: stages 2..m (stage 1 is the shared expert), summed per order and averaged over "
                  "the orders; peak memory is the largest over those stages. Inference: the final model of "
                  "the first order, batch size 1, a fixed number of new tokens per prompt (prefill included). "
                  "On a CPU the memory figures are the whole process's resident set, so only their "
                  "differences between methods mean something.", ""]
    return lines


def render_markdown(runs: Sequence[RunMetrics], sources: Sequence[str] = (), efficiency: dict | None = None) -> str:
    """The Markdown report: a Table-2-style summary; the ablation, realign and efficiency tables
    when the run has them; then each run's per-stage progression."""
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
        *_extra_tables(runs, efficiency),
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
    markers = "osD^v<>ph*"
    for k, (method, values) in enumerate(series.items()):
        # matplotlib's 10 colours repeat: later series get another line style and marker
        ax.plot(range(1, len(values) + 1), values, marker=markers[k % len(markers)],
                linestyle=("-", "--", ":")[(k // 10) % 3], label=method)
    ax.axhline(100.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("stage")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 6:  # many methods: the legend goes beside the axes, not over the lines
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
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


def _build(rows_or_paths, efficiency: dict | None = None) -> tuple[dict, str, list[RunMetrics], list[str]]:
    rows, sources = _load(rows_or_paths)
    runs = run_metrics(rows)
    if not runs:
        raise DataError(f"{', '.join(sources) or 'scores'}: no method rows (only experts or empty); nothing to report")
    if efficiency is None and len(sources) == 1:
        efficiency = _read_efficiency(Path(sources[0]).parent / "efficiency.json")
    return summary_object(runs), render_markdown(runs, sources, efficiency), runs, sources


def _read_efficiency(path: Path) -> dict | None:
    """A run's efficiency.json (written by ``mera run`` next to its scores.csv), if there is one."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable efficiency table ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: expected an object of per-method objects")
    return data


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


def write_report(rows_or_paths, out_dir: str | os.PathLike, efficiency: dict | None = None) -> dict:
    """Write ``report.md``, ``metrics.json`` and ``figures/*.png`` under ``out_dir`` (atomically,
    after everything is computed) and return the metrics object (the content of metrics.json).

    ``rows_or_paths``: a list of :class:`ScoreRow`, or one or several scores CSV paths.
    """
    metrics, markdown, runs, _ = _build(rows_or_paths, efficiency)
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
