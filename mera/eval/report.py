"""Reports over scores tables: Markdown tables, metrics.json, PNG figures and one HTML page.

``mera report SCORES.csv [...] [--out DIR] [--json]`` calls :func:`report_command`; the
run command calls :func:`write_report` at the end of a run. Everything is computed
before anything is written, so a malformed input leaves an existing report untouched.

A table with one seed (or none) gives the report of the first release, unchanged. With two
seeds or more the main table shows mean +- std over the seeds with a t-interval of the
headline, followed by the paired differences and the verdicts on the paper's orderings
(:mod:`mera.eval.seeds`); the other tables, the per-stage progression and the heatmaps show
means over the seeds, and the Backward / Forward RG figures a mean +- std band.

Beside them (:mod:`mera.eval.stats`): the declared primary family of comparisons, Holm-corrected, the
paper's claims as a checklist and the continual-learning metrics (Last, Avg, BWT, Forgetting), and,
when the scores come with their per-item scores (``items.csv``: a run writes it next to scores.csv),
paired-bootstrap intervals beside the t-intervals; metrics.json gains ``bootstrap``, ``primary``,
``cl_metrics`` and ``claims`` and keeps every other key and value.

report.html (:mod:`mera.eval.html_report`) holds all of it in one self-contained page, with the
training loss and a gallery of predictions when the scores come from a run directory.
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
from mera.eval.metrics import (
    RunMetrics,
    ScoreRow,
    last_stage_bw,
    methods_and_orders,
    read_scores,
    run_metrics,
    seeds_of,
    summary_object,
)
from mera.eval.names import ablation_rows, realign_pairs
from mera.eval.stats import NO_ITEMS, ReportSettings, ReportStats, items_for, report_stats
from mera.faults import fault_point
from mera.io import atomic_path, write_json, write_text, writing

UP = "\u2191"  # ↑ positive backward transfer marker
DASH = "\u2013"  # – not seen yet / no run
PM = "\u00b1"  # ±
HTML_NAME = "report.html"

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


def _stage_means(runs: Sequence[RunMetrics], attr: str) -> dict[str, list[float]]:
    """Per method, the per-stage mean over its orders of ``attr`` (bw_rg / fw_rg).

    Stage i's denominator is the number of that method's orders that have a stage i.
    """
    out: dict[str, list[float]] = {}
    methods, _ = methods_and_orders(runs)
    for m in methods:
        series = [getattr(r, attr) for r in runs if r.method == m]
        n = max(len(s) for s in series)
        out[m] = [
            sum(s[i] for s in series if len(s) > i) / sum(1 for s in series if len(s) > i) for i in range(n)
        ]
    return out


# ----------------------------------------------------------------------------- markdown


def _title(sources: Sequence[str]) -> list[str]:
    """The report's first lines: its title, the scores files, the main table's heading."""
    lines = ["# Continual-learning report", ""]
    if sources:
        lines += ["Scores: " + ", ".join(f"`{s}`" for s in sources), ""]
    return lines + ["## Backward relative gain (%)", ""]


def _signed(x: float) -> str:
    return _fmt(x) if x < 0 or math.isnan(x) else "+" + _fmt(x)


def _extra_tables(runs: Sequence[RunMetrics], efficiency: dict | None, headline: dict[str, float] | None = None,
                  n_seeds: int = 1) -> list[str]:
    """The ablation, realign and efficiency tables. With several seeds ``runs`` are the means over
    the seeds (:func:`mera.eval.seeds.mean_runs`), ``headline`` the mean last-stage BW over the
    seeds and ``n_seeds`` their number (the notes under the tables say so)."""
    methods, orders = methods_and_orders(runs)
    by_key = {(r.method, r.order): r for r in runs}
    if headline is None:
        headline = summary_object(runs)["last_stage_bw"]
    seed_note = "" if n_seeds < 2 else f" Each number is the mean over the {n_seeds} seeds."

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
        lines += ["", f"Backward RG, mean {PM} std over the stages, as in the main table." + seed_note, ""]
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
                  "realign-only ablation." + seed_note, ""]
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
                         f"{_latency(e)} | {num('infer_peak_mib', '.0f')} | "
                         f"{num('llm_params_m', '.3f')} |")
        lines += ["", "Training: stages 2..m (stage 1 is the shared expert), summed per order and averaged over "
                  "the orders; peak memory is the largest over those stages. Inference: the final model of "
                  "the first order, batch size 1, a fixed number of new tokens per prompt (prefill included). "
                  "On a CPU the memory figures are the whole process's resident set, so only their "
                  "differences between methods mean something."
                  + ("" if n_seeds < 2 else " With several seeds, the training time is averaged over the seeds too, "
                     "the peak is the largest of all seeds, and inference is profiled on the first seed's model.")
                  + _latency_note([efficiency[m] for m in methods if efficiency.get(m)]), ""]
    return lines


def _latency(e: dict) -> str:
    """The inference ms / token cell: the median, with the min-max of its rounds when there were
    several, and "noisy" when other work ran in the run directory while it was measured."""
    if e.get("infer_ms_per_token") is None:
        return DASH
    cell = format(e["infer_ms_per_token"], ".2f")
    if (e.get("infer_rounds") or 1) > 1 and e.get("infer_ms_per_token_min") is not None \
            and e.get("infer_ms_per_token_max") is not None:
        cell += f" ({e['infer_ms_per_token_min']:.2f}\u2013{e['infer_ms_per_token_max']:.2f})"
    if e.get("infer_quiet") is False:
        cell += " noisy"
    return cell


def _latency_note(entries: list[dict]) -> str:
    """What the latency cells' additions mean (nothing when no entry has them: a run profiled before
    the rounds were recorded renders as it did)."""
    note = ""
    rounds = sorted({e["infer_rounds"] for e in entries if (e.get("infer_rounds") or 1) > 1
                     and e.get("infer_ms_per_token_min") is not None})
    if rounds:
        note += (f" Inference ms / token is the median of {'/'.join(map(str, rounds))} rounds, (min\u2013max) in "
                 "brackets, measured with no other process working in the run directory (with --workers, after "
                 "the pool of workers has ended).")
    if any(e.get("infer_quiet") is False for e in entries):
        note += (" \"noisy\": another process worked in the run directory while it was measured (mera profile "
                 "RUN_DIR measures it again, quietly).")
    return note


# ----------------------------------------------------------------------------- reviewer's statistics


def _pct(level: float) -> str:
    return f"{100 * level:g}%"


def _p(p: float | None) -> str:
    return DASH if p is None or math.isnan(p) else f"{p:.4f}"


def _boot_cell(stats: ReportStats, method: str) -> str:
    """The main table's bootstrap column: the interval of the method's headline."""
    e = stats.headline(method)
    return f" {DASH if e is None else _ci(e.low, e.high)} |"


def _boot_note(stats: ReportStats, level: float) -> str:
    s = stats.settings
    return (f" Bootstrap {_pct(level)} CI: the percentile interval of the headline over B = {s.bootstrap_samples} "
            f"paired bootstrap replicates (seed {s.bootstrap_seed}): the seeds, then each seed's test items, drawn with "
            "replacement, the same items for every method (docs/metrics.md).")


def _boot_pair_cells(stats: ReportStats, a: str, b: str, statistic: str, order: str | None) -> str:
    d = stats.difference(a, b, statistic, order)
    if d is None:
        return f" {DASH} | {DASH} | {DASH} |"
    e = d.estimate
    return f" {_ci(e.low, e.high, signed=True)} | {_p(e.p)} | {d.label.kind if d.label else DASH} |"


def _stat_words(statistic: str, order: str | None) -> str:
    name = "last-stage BW" if statistic == "last_stage_bw" else "mean BW"
    return f"{name}, " + ("mean over orders" if order is None else _cell(order))


def _stats_sections(stats: ReportStats, level: float = 0.95) -> list[str]:
    """The primary family (Holm-corrected), the claims checklist and the CL-metrics table."""
    pct, s = _pct(level), stats.settings
    lines = ["## Primary comparisons (Holm-corrected)", ""]
    if not stats.available:
        lines += [stats.missing[0].upper() + stats.missing[1:] + ".", ""]
    elif not stats.family:
        lines += ["The declared primary family has no comparison this run can make.", ""]
    else:
        lines += [f"| comparison (A − B) | statistic | difference | bootstrap {pct} CI | p | Holm p | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for d in stats.primary_results():
            e = d.estimate
            lines.append(f"| {_cell(d.a)} − {_cell(d.b)} | {_stat_words(d.statistic, d.order)} | {_signed(e.point)} | "
                         f"{_ci(e.low, e.high, signed=True)} | {_p(e.p)} | {_p(d.label.p_adjusted)} | {d.verdict} |")
        lines += ["", f"The primary family: {stats.declared_in}. Difference: A's value minus B's, in points of relative "
                  f"gain; its {pct} paired-bootstrap percentile interval and two-sided p-value (B = {s.bootstrap_samples}, "
                  f"seed {s.bootstrap_seed}); Holm p: Holm's step-down adjustment over the {len(stats.family)} comparisons "
                  f"of the family. holds: Holm p {chr(0x2264)} {s.alpha:g} with A above B; reversed: with B above A; "
                  "inconclusive: otherwise. Every other comparison of this report and of metrics.json is exploratory "
                  "(its raw p, no correction).", ""]
    if stats.dropped:
        lines += ["Declared but left out: " + "; ".join(f"{_cell(x['a'])} − {_cell(x['b'])} ({x['reason']})"
                                                       for x in stats.dropped) + ".", ""]
    lines += ["## The paper's claims on this run", "", "| claim | verdict | numbers |", "|---|---|---|"]
    for c in stats.claims:
        if c.numbers:
            nums = "; ".join(f"{_cell(n.what)}: "
                             + (f"{_signed(n.estimate.point)} {_ci(n.estimate.low, n.estimate.high, signed=True)}"
                                if n.kind == "difference" else f"{_fmt(n.estimate.point)} {_ci(n.estimate.low, n.estimate.high)}")
                             for n in c.numbers)
        else:
            nums = _cell(c.reason if stats.available else "needs per-item scores (items.csv): see above")
        lines.append(f"| {_cell(c.text)} | {c.verdict} | {nums} |")
    margin = next((c.extra["margin"] for c in stats.claims if "margin" in c.extra), s.plasticity_margin)
    lines += ["", f"Each claim is judged on {pct} paired-bootstrap intervals (point [low, high], in points of "
              "relative gain): holds: every interval on the claimed side (a difference above 0; plasticity: each "
              f"difference of mean forward RG inside {PM}{margin:g} points; forward transfer: some stage 2 or 3 forward "
              "RG above 100); does not hold: an interval wholly on the other side; inconclusive: neither; not testable "
              "in this run: the reason. MERA is MERA (10%), or else the run's best MERA method. The rules: "
              "docs/metrics.md.", ""]
    cl = stats.cl["methods"]
    lines += ["## Continual-learning metrics", "", "| method | Last | Avg | BWT | Forgetting |", "|---|---|---|---|---|"]
    for m, e in cl.items():
        lines.append(f"| {_cell(m)} | " + " | ".join(_fmt(e[f]) for f in ("last", "avg", "bwt", "forgetting")) + " |")
    several = any(len(e["seeds"]) > 1 for e in cl.values())
    lines += ["", "From the accuracy matrix A (A[i][j]: the relative gain of modality j after stage i, in percent of "
              "its expert): Last, the mean of the last row; Avg, the mean over the stages of each row's mean (average "
              "incremental accuracy); BWT, the mean over the old modalities of A[m][j] − A[j][j]; Forgetting, the mean "
              "of each old modality's largest drop from an earlier value. Each number is the mean over the orders"
              + (" of each seed, then over the seeds" if several else "") + f"; {DASH}: undefined (one stage). "
              "Formulas and sources: docs/metrics.md.", ""]
    return lines


def render_markdown(runs: Sequence[RunMetrics], sources: Sequence[str] = (), efficiency: dict | None = None,
                    level: float = 0.95, stats: ReportStats | None = None) -> str:
    """The Markdown report: a Table-2-style summary; the ablation, realign and efficiency tables
    when the run has them; then each run's per-stage progression.

    With two seeds or more: :func:`_render_seeds` (mean +- std over the seeds, ``level``
    t-intervals, paired differences and the paper's orderings).

    ``stats`` (:func:`mera.eval.stats.report_stats`): after the main table, the primary family, the
    claims and the CL metrics (:func:`_stats_sections`), and the bootstrap interval of the headline in
    the main table (a column of its own, when there are per-item scores); None: the report without them."""
    if len(seeds_of(runs)) > 1:
        return _render_seeds(runs, sources, efficiency, level, stats)
    methods, orders = methods_and_orders(runs)
    headline = summary_object(runs)["last_stage_bw"]
    boot = stats is not None and stats.available
    lines = _title(sources) + [
        "| method | " + " | ".join(_cell(o) for o in orders) + " | last-stage BW (avg over orders) |"
        + (f" bootstrap {_pct(level)} CI |" if boot else ""),
        "|---" * (len(orders) + 2 + boot) + "|",
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
        lines.append(f"| {_cell(m)} | " + " | ".join(cells) + f" | {headline[m]:.2f} |" + (_boot_cell(stats, m) if boot else ""))
    lines += [
        "",
        f"Each order's cell is the mean {PM} sample standard deviation (n-1) of the Backward "
        "Relative Gain over all stages, stage 1 (100% by definition) included. "
        "Last-stage BW: the last stage's Backward RG, averaged over the orders present."
        + (_boot_note(stats, level) if boot else ""),
        "",
        *(_stats_sections(stats, level) if stats is not None else []),
        *_extra_tables(runs, efficiency),
        *_progression(runs),
    ]
    return "\n".join(lines)


PROGRESSION_NOTE = ("RG of a modality = mean over its datasets of score / expert score, in %. "
                    "Backward RG = mean RG of the modalities seen before the stage; Forward RG = RG of the "
                    "modality new at the stage; both are 100% at stage 1 by definition.")


def _progression(runs: Sequence[RunMetrics], suffixes: dict[tuple[str, str], str] | None = None,
                 note: str = "") -> list[str]:
    """The "Per-stage progression" section: one table per run; ``suffixes[(method, order)]`` is
    appended to a run's heading, ``note`` to the section's first paragraph."""
    lines = ["## Per-stage progression", "", PROGRESSION_NOTE + note, ""]
    for r in runs:
        mods = r.modalities
        suffix = (suffixes or {}).get((r.method, r.order), "")
        lines += [
            f"### {r.method}, order {r.order} ({' → '.join(mods)}){suffix}",
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
    return lines


# ----------------------------------------------------------------------------- several seeds


VERDICT_WORDS = {
    "holds": "holds: the {pct} CI of the difference is above 0, so {a} is better with {pct} confidence",
    "reversed": "reversed: the {pct} CI of the difference is below 0, so {b} is better with {pct} confidence",
    "inconclusive": "inconclusive: the {pct} CI of the difference contains 0",
    "one seed": "one seed: fewer than 2 seeds ran both methods, so there is no interval",
}


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} {PM} {'n/a' if math.isnan(std) else f'{std:.2f}'}"


def _ci(lo: float, hi: float, signed: bool = False) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    f = _signed if signed else _fmt
    return f"[{f(lo)}, {f(hi)}]"


def _seeds_word(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _seed_list(seeds: Sequence) -> str:
    return ", ".join("none" if s is None else str(s) for s in seeds)


def _render_seeds(runs: Sequence[RunMetrics], sources: Sequence[str], efficiency: dict | None, level: float,
                  stats: ReportStats | None = None) -> str:
    """The report of a table with two seeds or more (see :func:`render_markdown`)."""
    from mera.eval.seeds import mean_runs, paired_differences, summarize_seeds

    methods, orders = methods_and_orders(runs)
    seeds = seeds_of(runs)
    pct = f"{100 * level:g}%"
    summaries = summarize_seeds(runs, level)
    boot = stats is not None and stats.available
    lines = _title(sources) + [
        "| method | seeds | " + " | ".join(_cell(o) for o in orders) + f" | last-stage BW (avg over orders) | {pct} CI |"
        + (f" bootstrap {pct} CI |" if boot else ""),
        "|---" * (len(orders) + 4 + boot) + "|",
    ]
    for m in methods:
        ms = summaries[m]
        cells = [DASH if o not in ms.orders else _pm(ms.orders[o].bw_mean.mean, ms.orders[o].bw_mean.std) for o in orders]
        h = ms.last_stage_bw
        lines.append(f"| {_cell(m)} | {len(ms.seeds)} | " + " | ".join(cells) + f" | {_pm(h.mean, h.std)} | {_ci(h.lo, h.hi)} |"
                     + (_boot_cell(stats, m) if boot else ""))
    lines += [
        "",
        f"{len(seeds)} seeds ({_seed_list(seeds)}); the seeds column counts those each method ran. Every number is "
        f"computed per seed, then given as mean {PM} sample standard deviation (n-1) over the n seeds. Each order's "
        "cell: the mean Backward Relative Gain over all stages, stage 1 (100% by definition) included. Last-stage BW: "
        f"the last stage's Backward RG, averaged over the orders present. {pct} CI: mean {PM} "
        f"t_{{{(1 + level) / 2:g}, n-1}} {chr(0xB7)} std / {chr(0x221A)}n, Student's t-distribution over the seeds."
        + (_boot_note(stats, level) if boot else ""),
        "",
        *(_stats_sections(stats, level) if stats is not None else []),
    ]
    paired = paired_differences(runs, level)
    lines += ["## Paired differences", ""]
    if paired:
        lines += ["| pair (A − B) | statistic | n | mean difference | " + pct + " CI | verdict |"
                  + (f" bootstrap {pct} CI | bootstrap p | family |" if boot else ""),
                  "|---|---|---|---|---|---|" + ("---|---|---|" if boot else "")]
        for p in paired:
            stat = "last-stage BW" if p.statistic == "last_stage_bw" else f"mean BW, {_cell(p.order)}"
            iv = p.interval
            lines.append(f"| {_cell(p.a)} − {_cell(p.b)} | {stat} | {p.n} | {_signed(iv.mean)} | "
                         f"{_ci(iv.lo, iv.hi, signed=True)} | {p.verdict} |"
                         + (_boot_pair_cells(stats, p.a, p.b, p.statistic, p.order) if boot else ""))
        lines += ["", "Per seed, A's value minus B's, on the seeds both methods ran (n), in points of relative gain; "
                  f"then the mean and the {pct} t-interval of those differences (a paired interval). "
                  f"holds: the CI is above 0 (A is better with {pct} confidence); reversed: it is below 0; "
                  "inconclusive: it contains 0; one seed: n < 2, no interval."
                  + (f" Bootstrap {pct} CI and p: the same difference, resampled over the seeds and the test items "
                     "(two-sided p); family: primary (in the declared family, Holm-corrected above) or exploratory "
                     "(no correction)." if boot else ""), ""]
    else:
        lines += ["None of the pairs the paper compares is present in this table.", ""]
    lines += ["## The paper's orderings on this run", ""]
    heads = [p for p in paired if p.statistic == "last_stage_bw"]
    if heads:
        lines += ["Each ordering the paper claims that these methods can form, judged on the last-stage BW "
                  "(the paper's headline), with the verdict on each order's mean BW after it.", ""]
        for p in heads:
            iv = p.interval
            words = VERDICT_WORDS[p.verdict].format(pct=pct, a=p.a, b=p.b)
            numbers = (f"{p.a} − {p.b} = {_signed(iv.mean)} points" +
                       ("" if p.verdict == "one seed" else f", {pct} CI {_ci(iv.lo, iv.hi, signed=True)}") +
                       f", n = {_seeds_word(p.n)}")
            by_order = [f"{q.order} {q.verdict}" for q in paired
                        if q.statistic == "bw_mean" and (q.a, q.b) == (p.a, p.b)]
            lines.append(f"- **{_cell(p.a)} above {_cell(p.b)}** ({'; '.join(p.claims)}): {words} ({numbers})."
                         + (f" Mean BW per order: {', '.join(by_order)}." if by_order else ""))
        lines.append("")
    else:
        lines += ["None of the orderings the paper claims can be formed from these methods.", ""]
    means = mean_runs(runs)
    counts: dict[tuple[str, str], int] = {}
    for r in runs:
        counts[(r.method, r.order)] = counts.get((r.method, r.order), 0) + 1
    suffixes = {k: f", mean over {_seeds_word(n)}" for k, n in counts.items()}
    lines += [
        *_extra_tables(means, efficiency, last_stage_bw(runs), len(seeds)),
        *_progression(means, suffixes, " With several seeds, each number is the mean over the seeds that ran the stage."),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _line_figure(series: dict[str, list[float]], ylabel: str, title: str,
                 bands: dict[str, list[float]] | None = None) -> bytes:
    """Lines per method; ``bands[method][i]``: half-width of a shaded band around stage i+1
    (mean +- std over the seeds; NaN: no band there)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = max(len(v) for v in series.values())
    markers = "osD^v<>ph*"
    for k, (method, values) in enumerate(series.items()):
        # matplotlib's 10 colours repeat: later series get another line style and marker
        (line,) = ax.plot(range(1, len(values) + 1), values, marker=markers[k % len(markers)],
                          linestyle=("-", "--", ":")[(k // 10) % 3], label=method)
        if bands is not None and method in bands:
            half = [0.0 if math.isnan(h) else h for h in bands[method]]
            ax.fill_between(range(1, len(values) + 1), [v - h for v, h in zip(values, half)],
                            [v + h for v, h in zip(values, half)], color=line.get_color(), alpha=0.2, linewidth=0)
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


def _heatmap(run: RunMetrics, suffix: str = "") -> bytes:
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
    ax.set_title(f"{run.method}, {run.order}: RG (% of expert){suffix}")
    fig.colorbar(image, ax=ax, label="RG %")
    return _png(fig)


def render_figures(runs: Sequence[RunMetrics], level: float = 0.95) -> dict[str, bytes]:
    """PNG bytes by file name: backward_rg.png, forward_rg.png (per method, averaged over
    orders) and accuracy_<method-slug>_<order-slug>.png per run.

    With two seeds or more each line is the mean over the seeds (of each seed's mean over its
    orders) with a mean +- std band, and the heatmaps are means over the seeds."""
    _, orders = methods_and_orders(runs)
    note = f" (mean over orders: {', '.join(orders)})" if len(orders) > 1 else f" (order: {orders[0]})"
    seeds = seeds_of(runs)
    if len(seeds) > 1:
        from mera.eval.seeds import mean_runs, stage_curves

        note = note[:-1] + f"; mean {PM} std over {len(seeds)} seeds)"
        figures = {}
        for attr, name, label in (("bw_rg", "backward_rg.png", "Backward"), ("fw_rg", "forward_rg.png", "Forward")):
            curves = stage_curves(runs, attr, level)
            figures[name] = _line_figure({m: [iv.mean for iv in c] for m, c in curves.items()}, f"{label} RG (%)",
                                         f"{label} relative gain" + note, {m: [iv.std for iv in c] for m, c in curves.items()})
        counts: dict[tuple[str, str], int] = {}
        for r in runs:
            counts[(r.method, r.order)] = counts.get((r.method, r.order), 0) + 1
        heatmaps = [(r, f", mean over {_seeds_word(counts[(r.method, r.order)])}") for r in mean_runs(runs)]
    else:
        figures = {
            "backward_rg.png": _line_figure(_stage_means(runs, "bw_rg"), "Backward RG (%)", "Backward relative gain" + note),
            "forward_rg.png": _line_figure(_stage_means(runs, "fw_rg"), "Forward RG (%)", "Forward relative gain" + note),
        }
        heatmaps = [(r, "") for r in runs]
    for r, suffix in heatmaps:
        base = f"accuracy_{slug(r.method)}_{slug(r.order)}"
        name, k = f"{base}.png", 2
        while name in figures:  # two method names with the same slug
            name, k = f"{base}-{k}.png", k + 1
        figures[name] = _heatmap(r, suffix)
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


def _build(rows_or_paths, efficiency: dict | None = None, items=None, settings: ReportSettings | None = None
           ) -> tuple[dict, str, list[RunMetrics], list[str]]:
    rows, sources = _load(rows_or_paths)
    runs = run_metrics(rows)
    if not runs:
        raise DataError(f"{', '.join(sources) or 'scores'}: no method rows (only experts or empty); nothing to report")
    if efficiency is None and len(sources) == 1:
        efficiency = _read_efficiency(Path(sources[0]).parent / "efficiency.json")
    if settings is None:
        settings = _run_settings(sources)
    found, where, missing = _items(rows, sources, items)
    try:
        stats = report_stats(runs, found, settings, missing, where)
    except DataError as e:  # items that cannot be paired (e.g. other test items than the expert's)
        if items is not None:
            raise
        stats = report_stats(runs, None, settings, f"no per-item scores: {e}", where)
    metrics = summary_object(runs)
    metrics.update(stats.as_json())
    return metrics, render_markdown(runs, sources, efficiency, stats=stats), runs, sources


ITEMS_NAME = "items.csv"


def _items(rows: Sequence[ScoreRow], sources: Sequence[str], items) -> tuple[list | None, str | None, str | None]:
    """(the items of ``rows``, where they came from, why there are none). ``items``: ItemScores, or items.csv
    paths (a malformed or mismatched one is a DataError); None: the items.csv next to the one scores file,
    when there is one (a malformed, mismatched or incomplete one only leaves the report without a bootstrap,
    saying why: a run made before per-item scores existed, or resumed across that change)."""
    from mera.eval.bootstrap import ItemScore, read_items

    if items is not None:
        if isinstance(items, (str, os.PathLike)):
            items = [items]
        items = list(items)
        if items and all(isinstance(x, ItemScore) for x in items):
            return items_for(rows, items), sorted({x.source for x in items})[0] if items else None, None
        paths = [os.fspath(p) for p in items]
        return items_for(rows, [it for p in paths for it in read_items(p)]), ", ".join(paths), None
    if len(sources) != 1 or not (path := Path(sources[0]).parent / ITEMS_NAME).is_file():
        return None, None, NO_ITEMS
    try:
        return items_for(rows, read_items(path)), str(path), None
    except DataError as e:
        return None, str(path), f"no per-item scores: {e}"


def _run_settings(sources: Sequence[str]) -> ReportSettings:
    """The ``report`` section of the run's config.yaml when the one scores file is a run directory's
    (a ConfigError names the file and the key); else the defaults."""
    from mera.config.loading import read_yaml, validate

    if len(sources) != 1 or not (cfg := Path(sources[0]).parent / "config.yaml").is_file():
        return ReportSettings()
    data = read_yaml(cfg)
    section = (data.get("report") if isinstance(data, dict) else None) or {}
    return validate(section, ReportSettings, f"{cfg}: report")


def split_inputs(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """``mera report``'s files as (scores files, items files): a file whose header is items.csv's
    columns is an items file; any other (a missing or unreadable one too) is a scores file, read and
    checked as one."""
    from mera.eval.bootstrap import COLUMNS

    scores, items = [], []
    for p in paths:
        try:
            with open(p, encoding="utf-8-sig", newline="") as f:
                head = f.readline()
        except (OSError, UnicodeDecodeError):
            head = ""
        is_items = sorted(h.strip() for h in head.strip().split(",")) == sorted(COLUMNS)
        (items if is_items else scores).append(os.fspath(p))
    return scores, items


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


def _write(out_dir: str | os.PathLike, markdown: str, metrics: dict, figures: dict[str, bytes],
           page: str | None = None) -> list[Path]:
    """Write the figures, metrics.json, report.md and (``page`` given) report.html; returns their
    paths: report.md, metrics.json, then report.html if written, then the figures."""
    out = Path(out_dir)
    written = []
    for name, data in figures.items():
        path = out / "figures" / name
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
            fault_point("write_report")
        written.append(path)
    for path, write in [(out / "metrics.json", lambda p: write_json(p, metrics)),
                        (out / "report.md", lambda p: write_text(p, markdown)),
                        *([(out / HTML_NAME, lambda p: write_text(p, page))] if page is not None else [])]:
        with writing(path):
            fault_point("write_report")
            write(path)
    return [out / "report.md", out / "metrics.json"] + ([out / HTML_NAME] if page is not None else []) + written


def _page(markdown: str, runs: Sequence[RunMetrics], figures: dict[str, bytes], sources: Sequence[str],
          gallery) -> str:
    from mera.eval.html_report import render_html

    seeds = seeds_of(runs)
    per_seed = {s: render_markdown([r for r in runs if r.seed == s]) for s in seeds} if len(seeds) > 1 else None
    return render_html(markdown, runs, figures, sources, gallery, per_seed)


def write_report(rows_or_paths, out_dir: str | os.PathLike, efficiency: dict | None = None, gallery=None,
                 items=None, settings: ReportSettings | None = None) -> dict:
    """Write ``report.md``, ``report.html``, ``metrics.json`` and ``figures/*.png`` under ``out_dir``
    (atomically, after everything is computed) and return the metrics object (the content of
    metrics.json).

    ``rows_or_paths``: a list of :class:`ScoreRow`, or one or several scores CSV paths.
    ``gallery``: the page's :class:`~mera.eval.gallery.Gallery` (collected from the run directory
    by :mod:`mera.runner.gallery`); None: the page says why it has none. ``items``: the per-item
    scores (ItemScores or items.csv paths); None: the items.csv next to the one scores file, if any.
    ``settings``: the bootstrap's and the primary family's; None: the ``report`` section of the run's
    config.yaml next to the one scores file, else the defaults.
    """
    metrics, markdown, runs, sources = _build(rows_or_paths, efficiency, items, settings)
    figures = render_figures(runs)
    _write(out_dir, markdown, metrics, figures, _page(markdown, runs, figures, sources, gallery))
    return metrics


def _emit(text: str, stream) -> None:
    try:
        print(text, file=stream)
    except UnicodeEncodeError:  # a non-UTF-8 terminal
        stream.flush()
        stream.buffer.write((text + "\n").encode("utf-8"))
        stream.flush()


def report_command(paths: list[str], out: str | None = None, as_json: bool = False, html: bool = False,
                   gallery=None, settings: ReportSettings | None = None) -> int:
    """``mera report``: print the Markdown report (or, with ``as_json``, only the metrics JSON),
    and with ``out`` also write report.md, metrics.json and figures/ there, and with ``html`` (the
    command line's choice) report.html too (``gallery``: its gallery, or a function of no argument
    giving it, called only then). ``paths``: scores files and, optionally, items.csv files (told apart
    by their header, :func:`split_inputs`); without one, the items.csv next to a single scores file is
    used when there is one. Returns 0; raises DataError on malformed input (before writing anything)."""
    scores, items = split_inputs(paths)
    if not scores:
        raise DataError(f"{', '.join(items)}: per-item scores without their scores file; give the scores.csv too")
    metrics, markdown, runs, sources = _build(scores, items=items or None, settings=settings)
    written: list[Path] = []
    if out is not None:
        figures = render_figures(runs)
        page = _page(markdown, runs, figures, sources, gallery() if callable(gallery) else gallery) if html else None
        written = _write(out, markdown, metrics, figures, page)
    if as_json:
        _emit(json.dumps(metrics, indent=2, allow_nan=False), sys.stdout)
    else:
        _emit(markdown, sys.stdout)
    if written:
        n_fig = len(written) - (3 if html else 2)
        message = f"wrote {written[0]}, {written[1]} and {n_fig} figures in {Path(out) / 'figures'}"
        if html:
            message += f"; the whole report in one page: {written[2]}"
        _emit(message, sys.stderr if as_json else sys.stdout)
    return 0
