"""The statistics a reviewer asks for, added to metrics.json and the report beside the t-intervals over
seeds (:mod:`mera.eval.seeds`), computed from the scores table and, where the run recorded them, the
per-item scores of ``items.csv`` (pure Python + numpy/scipy, no torch):

- ``bootstrap``: the paired bootstrap over seeds, then test items (:mod:`mera.eval.bootstrap`): per
  method (and order) the point estimate and percentile interval of the last-stage backward RG, the mean
  backward RG and the per-stage backward / forward RG, and the interval and two-sided p-value of every
  difference the report compares (:func:`mera.eval.seeds.comparison_pairs`, on the last-stage BW over
  the orders and on each order's mean BW), each labelled primary or exploratory;
- ``primary``: the declared primary family (:class:`ReportSettings.primary`; by default MERA (10%)
  against each Table 2 baseline of the run on the last-stage BW over the orders), Holm-corrected
  (:mod:`mera.eval.multiple`); a comparison whose method or order is not in the run is dropped, with
  a note;
- ``cl_metrics``: Last, Avg, BWT and Forgetting of every run's accuracy matrix (:mod:`mera.eval.cl_metrics`),
  with their t-interval over the seeds when there are several;
- ``claims``: the paper's claims as a checklist (:mod:`mera.eval.claims`).

Without per-item scores (a run made before items.csv existed, a scores table written by hand) the
bootstrap, the primary family and the claims say so in one line (:data:`NO_ITEMS`); the CL metrics
need only the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from mera.config.base import StrictModel
from mera.errors import DataError
from mera.eval.bootstrap import Estimate, ItemScore, Replicates, bootstrap_cells, resample
from mera.eval.cl_metrics import cl_metrics_of_run
from mera.eval.claims import Claim, best_mera, checklist, find_method, stat_key
from mera.eval.multiple import PRIMARY, Label, label_comparisons
from mera.eval.runs import RunMetrics, _json_float, methods_and_orders, seed_order
from mera.eval.seeds import Interval, comparison_pairs

NO_ITEMS = ("no per-item scores: bootstrap intervals need items.csv (runs made before per-item scores were "
            "recorded, and scores tables without their items.csv, have none)")
LEVEL = 0.95
TABLE2_BASELINES = ("Fine-Tuning", "Replay (1%)", "Replay (10%)", "EWC", "PathWeave")
DEFAULT_A = "MERA (10%)"
CL_FIELDS = ("last", "avg", "bwt", "forgetting")
# a score of scores.csv is rounded to 4 decimals: its items' mean is within half a unit of the last one
TOLERANCE = 5e-5


class Comparison(StrictModel):
    """One member of the primary family: ``a - b`` of ``statistic`` (``last_stage_bw``: the last stage's
    backward RG; ``bw_mean``: the mean backward RG over the stages), on ``order`` (unset: the mean over
    the orders the method ran). Method names match as the report matches them (case and spacing ignored;
    any spelling of fine-tuning)."""

    a: str
    b: str
    statistic: Literal["last_stage_bw", "bw_mean"] = "last_stage_bw"
    order: str | None = None


class ReportSettings(StrictModel):
    """The ``report`` section of a run config: how the report's bootstrap and primary family are made."""

    # B, the bootstrap replicates, and the seed of their draws (same items, B and seed: same numbers)
    bootstrap_samples: int = Field(2000, ge=1, le=1_000_000)
    bootstrap_seed: int = Field(0, ge=0, lt=2**63)
    # the family-wise error rate of the primary family (Holm)
    alpha: float = Field(0.05, gt=0, lt=1)
    # the primary family, declared before the results are seen; unset: MERA (10%) against each Table 2
    # baseline present (Fine-Tuning, Replay (1%), Replay (10%), EWC, PathWeave) on the last-stage BW
    primary: list[Comparison] | None = None
    # the claim "MERA's plasticity is comparable to EWC's and PathWeave's": the margin, in points of
    # forward RG, within which the mean forward RGs must agree (docs/metrics.md)
    plasticity_margin: float = Field(5.0, gt=0, le=100)


# ----------------------------------------------------------------------------- items


def items_for(rows: Sequence, items: Sequence[ItemScore]) -> list[ItemScore]:
    """The items of the scores ``rows`` (ScoreRows), checked against them: every row's (method, order,
    seed, stage, modality, dataset) has items, and their mean is the row's score to scores.csv's rounding
    (4 decimals). Items of other rows are left out (a scores file may hold part of a run). DataError
    names the file and line of the first problem."""
    groups: dict[tuple, list[ItemScore]] = {}
    for it in items:
        groups.setdefault((it.method, it.order, it.seed, it.stage, it.modality, it.dataset), []).append(it)
    keep, lacking = [], []
    for r in rows:
        g = groups.get(r.key)
        if g is None:
            lacking.append(r)
            continue
        mean = sum(i.score for i in g) / len(g)
        if abs(mean - r.score) > TOLERANCE + 1e-9 * max(1.0, abs(r.score)):
            raise DataError(f"{g[0].where}: the {len(g)} items of {r.as_csv()} average {mean:.6f}, but {r.where} "
                            f"gives {r.score:g}: these are not the items of these scores")
        keep += g
    if lacking:
        raise DataError(f"{lacking[0].where}: no per-item scores for {len(lacking)} of the {len(rows)} score rows "
                        f"(the first: {lacking[0].as_csv()}); stages done before items.csv existed have none")
    return keep


# ----------------------------------------------------------------------------- primary family


def declared_family(settings: ReportSettings, methods: Sequence[str], orders: Sequence[str]
                    ) -> tuple[list[tuple], list[dict], str]:
    """The primary family as keys ``(a, b, statistic, order)`` with the run's method names, the declared
    comparisons dropped (``{a, b, statistic, order, reason}``) and where the family was declared."""
    if settings.primary is None:
        declared = [Comparison(a=DEFAULT_A, b=b) for b in TABLE2_BASELINES]
        where = ("the default, MERA (10%) against each Table 2 baseline (Fine-Tuning, Replay (1%), Replay (10%), "
                 "EWC, PathWeave) on the last-stage BW averaged over the orders")
    else:
        declared, where = settings.primary, "report.primary in the run's config"
    family, dropped = [], []
    for c in declared:
        a, b = find_method(methods, c.a), find_method(methods, c.b)
        absent = [name for name, got in ((c.a, a), (c.b, b)) if got is None]
        reason = (f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not in this run" if absent
                  else f"the order {c.order} is not in this run" if c.order is not None and c.order not in orders
                  else "")
        key = (a, b, c.statistic, c.order)
        if reason:
            dropped.append({"a": c.a, "b": c.b, "statistic": c.statistic, "order": c.order, "reason": reason})
        elif key not in family:
            family.append(key)
    return family, dropped, where


# ----------------------------------------------------------------------------- the whole


@dataclass
class Difference:
    """``a - b`` of ``statistic`` on ``order`` (None: over the orders), its bootstrap estimate, the claims
    of :func:`~mera.eval.seeds.comparison_pairs` it tests, and how it is reported (``label``)."""

    a: str
    b: str
    statistic: str
    order: str | None
    estimate: Estimate
    claims: list[str] = field(default_factory=list)
    label: Label | None = None

    @property
    def key(self) -> tuple:
        return (self.a, self.b, self.statistic, self.order)

    @property
    def verdict(self) -> str:
        """For a primary comparison: ``holds`` (Holm rejects, A above B), ``reversed`` (rejects, B above
        A) or ``inconclusive``."""
        if self.label is None or self.label.kind != PRIMARY or not self.label.reject:
            return "inconclusive"
        return "holds" if self.estimate.point > 0 else "reversed"

    def as_json(self) -> dict:
        e = self.estimate.as_json()
        out = {"a": self.a, "b": self.b, "statistic": self.statistic, "order": self.order, "claims": list(self.claims),
               "difference": e["point"], "low": e["low"], "high": e["high"], "n": e["n"], "p": e["p"],
               "label": None if self.label is None else self.label.kind}
        if self.label is not None and self.label.kind == PRIMARY:
            out.update(p_holm=self.label.p_adjusted, reject=self.label.reject, verdict=self.verdict)
        return out


def _cell(e: Estimate) -> dict:
    return {k: v for k, v in e.as_json().items() if k != "p"}


def _with_fw_means(rep: Replicates, methods: Sequence[str]) -> Replicates:
    """``rep`` with ``("fw_mean", method, None)``: the mean over the orders of the mean forward RG over
    stages 2..m (stage 1's 100 is a definition, not a measurement), for every method with a stage 2."""
    keys, cols = list(rep.keys), []
    for m in methods:
        per_order: dict[str, list[int]] = {}
        for q, k in enumerate(rep.keys):
            if isinstance(k, tuple) and k[0] == "fw" and k[1] == m and k[3] >= 2:
                per_order.setdefault(k[2], []).append(q)
        if not per_order:
            continue
        w = np.zeros(len(rep.keys))
        for qs in per_order.values():
            w[qs] += 1.0 / (len(qs) * len(per_order))
        keys.append(("fw_mean", m, None))
        cols.append(w)
    if not cols:
        return rep
    weights = np.column_stack(cols)
    with np.errstate(invalid="ignore"):
        extra_point = np.nan_to_num(rep.point, nan=0.0) @ weights
        extra_draws = np.where(np.isnan(rep.draws), 0.0, rep.draws) @ weights
        # a replicate where a statistic the mean needs is undefined leaves the mean undefined
        extra_draws[(np.isnan(rep.draws).astype(float) @ (weights > 0)) > 0] = np.nan
        extra_point[(np.isnan(rep.point).astype(float) @ (weights > 0)) > 0] = np.nan
    return Replicates(keys, np.concatenate([rep.point, extra_point]), np.column_stack([rep.draws, extra_draws]),
                      rep.level)


@dataclass
class ReportStats:
    """Everything this module adds to metrics.json (:meth:`as_json`) and to the report."""

    settings: ReportSettings
    cl: dict
    family: list[tuple]
    dropped: list[dict]
    declared_in: str
    claims: list[Claim]
    missing: str | None = None  # why there is no bootstrap (None: there is one)
    items_source: str | None = None
    n_items: int = 0
    replicates: Replicates | None = None
    cells: dict = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.missing is None

    def headline(self, method: str) -> Estimate | None:
        """The bootstrap estimate of ``method``'s last-stage BW over the orders (None: no bootstrap)."""
        cell = self.cells.get(method)
        return None if cell is None else cell["last_bw"]

    def difference(self, a: str, b: str, statistic: str, order: str | None) -> Difference | None:
        return next((d for d in self.differences if d.key == (a, b, statistic, order)), None)

    def primary_results(self) -> list[Difference]:
        return [d for k in self.family if (d := self.difference(*k)) is not None]

    def as_json(self) -> dict:
        s = self.settings
        head = {"B": s.bootstrap_samples, "seed": s.bootstrap_seed, "level": LEVEL}
        if not self.available:
            boot = {"missing": self.missing, **head}
        else:
            methods = {}
            for m, c in self.cells.items():
                fw = self.replicates.estimate(("fw_mean", m, None)) if ("fw_mean", m, None) in self.replicates.keys else None
                methods[m] = {"last_stage_bw": _cell(c["last_bw"]), "bw_mean": _cell(c["bw_mean"]),
                              "fw_mean": None if fw is None else _cell(fw),
                              "orders": {o: {"last_stage_bw": _cell(oc["last_bw"]), "bw_mean": _cell(oc["bw_mean"]),
                                             "bw_rg": [_cell(e) for e in oc["bw_rg"]],
                                             "fw_rg": [_cell(e) for e in oc["fw_rg"]]}
                                         for o, oc in c["orders"].items()}}
            boot = {**head, "items": self.items_source, "n_items": self.n_items,
                    "procedure": "paired percentile bootstrap: each replicate draws the seeds with replacement, then "
                                 "each seed's test items with replacement, the same items for every method, stage and "
                                 "expert of the seed (mera.eval.bootstrap; docs/metrics.md)",
                    "methods": methods, "differences": [d.as_json() for d in self.differences]}
        primary = {"declared_in": self.declared_in, "alpha": s.alpha,
                   "correction": "Holm (1979) step-down over the family; every other comparison is exploratory",
                   "family": [{"a": a, "b": b, "statistic": st, "order": o} for a, b, st, o in self.family],
                   "dropped": list(self.dropped)}
        if self.available:
            primary["comparisons"] = [d.as_json() for d in self.primary_results()]
        else:
            primary["missing"] = self.missing
        return {"bootstrap": boot, "primary": primary, "cl_metrics": self.cl,
                "claims": [c.as_json() for c in self.claims]}


def cl_section(runs: Sequence[RunMetrics], level: float = LEVEL) -> dict:
    """``{"scale", "methods": {method: {"last", "avg", "bwt", "forgetting" (each seed's mean over its
    orders, then the mean over the seeds), "seeds", "over_seeds" (two seeds or more: each as {mean, std,
    ci_low, ci_high, n}), "orders": {order: {"runs": [{"seed", "last", "avg", "bwt", "forgetting",
    "modalities", "matrix"}], "over_seeds": (two seeds or more)}}}}}``."""
    methods, _ = methods_and_orders(runs)
    out = {}
    for m in methods:
        mine = [r for r in runs if r.method == m]
        per_order: dict[str, list] = {}
        per_seed: dict = {}
        for r in mine:
            c = cl_metrics_of_run(r)
            per_order.setdefault(r.order, []).append((r.seed, c))
            per_seed.setdefault(r.seed, []).append(c)
        seed_means = {s: {f: float(np.mean([getattr(c, f) for c in cs])) for f in CL_FIELDS}
                      for s, cs in sorted(per_seed.items(), key=lambda kv: seed_order(kv[0]))}
        entry: dict = {f: _json_float(float(np.mean([v[f] for v in seed_means.values()]))) for f in CL_FIELDS}
        entry["seeds"] = list(seed_means)
        if len(seed_means) > 1:
            entry["over_seeds"] = {f: Interval.of([v[f] for v in seed_means.values()], level).as_json() for f in CL_FIELDS}
        entry["orders"] = {}
        for o, lst in per_order.items():
            e: dict = {"runs": [{"seed": s, **c.as_json()} for s, c in lst]}
            if len(lst) > 1:
                e["over_seeds"] = {f: Interval.of([getattr(c, f) for _, c in lst], level).as_json() for f in CL_FIELDS}
            entry["orders"][o] = e
        out[m] = entry
    return {"scale": "percent of the expert: A[i][j] is the relative gain of modality j after stage i; Last, Avg "
                     "(Rebuffi et al. 2017), BWT (Lopez-Paz & Ranzato 2017), Forgetting (Chaudhry et al. 2018) as in "
                     "docs/metrics.md",
            "methods": out}


def report_stats(runs: Sequence[RunMetrics], items: Sequence[ItemScore] | None = None,
                 settings: ReportSettings | None = None, missing: str | None = None,
                 items_source: str | None = None) -> ReportStats:
    """All of it for ``runs`` (:func:`mera.eval.metrics.run_metrics`) and their ``items`` (checked with
    :func:`items_for`; None: no bootstrap, ``missing`` saying why, :data:`NO_ITEMS` by default)."""
    settings = settings or ReportSettings()
    methods, orders = methods_and_orders(runs)
    family, dropped, where = declared_family(settings, methods, orders)
    stats = ReportStats(settings, cl_section(runs), family, dropped, where, [])
    if items is None:
        stats.missing = missing or NO_ITEMS
        stats.claims = checklist(None, methods, orders, settings.plasticity_margin, stats.missing)
        return stats
    rep = _with_fw_means(resample(items, settings.bootstrap_samples, settings.bootstrap_seed, LEVEL), methods)
    stats.replicates, stats.items_source, stats.n_items = rep, items_source, len(items)
    stats.cells = bootstrap_cells(rep)["methods"]
    keys = set(rep.keys)
    wanted: list[tuple[tuple, list[str]]] = []
    for a, b, claims in comparison_pairs(methods):
        for statistic, order in [("last_stage_bw", None)] + [("bw_mean", o) for o in orders]:
            wanted.append(((a, b, statistic, order), list(claims)))
    wanted += [(k, []) for k in family if k not in [w for w, _ in wanted]]
    for (a, b, statistic, order), claims in wanted:
        ka, kb = stat_key(statistic, a, order), stat_key(statistic, b, order)
        if ka in keys and kb in keys:
            stats.differences.append(Difference(a, b, statistic, order, rep.estimate(ka, minus=kb), claims))
    defined = {d.key: d.estimate.p for d in stats.differences if d.estimate.n > 0 and d.estimate.p is not None
               and math.isfinite(d.estimate.p)}
    for k in [k for k in family if k not in defined]:
        family.remove(k)
        dropped.append({"a": k[0], "b": k[1], "statistic": k[2], "order": k[3],
                        "reason": "undefined: the two methods share no order, or no replicate defines the difference"})
    labels = label_comparisons(defined, family, settings.alpha)
    for d in stats.differences:
        d.label = labels.get(d.key)
    stats.claims = checklist(rep, methods, orders, settings.plasticity_margin)
    return stats


__all__ = ["NO_ITEMS", "Comparison", "ReportSettings", "ReportStats", "Difference", "items_for", "declared_family",
           "cl_section", "report_stats", "best_mera"]
