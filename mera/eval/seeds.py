"""Statistics over training seeds (pure Python + numpy/scipy, no torch).

A scores table may hold several training seeds of the same runs (the ``seed`` column of
:mod:`mera.eval.metrics`). Each seed is one independent repetition of the whole experiment
(experts included), so the seeds are the sample and every statistic below is computed per
seed first, then summarised over the seeds:

- per seed and method: the mean Backward RG over the stages of each order (the main table's
  cell, :attr:`RunMetrics.bw_mean`), the headline last-stage BW (the last stage's Backward RG
  averaged over the orders that seed ran) and the per-stage Backward / Forward RG per order;
- over the seeds: mean, sample std (ddof=1) and a confidence interval from Student's
  t-distribution with n-1 degrees of freedom (:func:`t_interval`);
- paired differences: per seed, method A's value minus method B's on the seeds both ran,
  then the t-interval of those differences (a paired t-interval: the seed's shared data
  draws and experts cancel out);
- the paper's orderings (MERA above every other method, realign helping every method, the
  Table 4 ablation), each with a verdict: ``holds`` (the CI of A - B is above 0), ``reversed``
  (below 0), ``inconclusive`` (it contains 0) or ``one seed`` (fewer than 2 paired seeds).

See docs/seeds.md for the reasoning and the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from mera.errors import DataError
from mera.eval.names import FINETUNE_NAMES, realign_pairs
from mera.eval.runs import (
    RunMetrics,
    _json_float,
    _one_seed_summary,
    last_stage_bw,
    last_stage_bw_by_seed,
    mean_std,
    methods_and_orders,
    seed_order,
    seeds_of,
)

LEVEL = 0.95
HOLDS, REVERSED, INCONCLUSIVE, ONE_SEED = "holds", "reversed", "inconclusive", "one seed"
VERDICTS = (HOLDS, REVERSED, INCONCLUSIVE, ONE_SEED)


# ----------------------------------------------------------------------------- intervals


def t_quantile(level: float, dof: int) -> float:
    """``t_{(1+level)/2, dof}``: the two-sided quantile of Student's t-distribution (scipy)."""
    from scipy.stats import t

    return float(t.ppf((1.0 + level) / 2.0, dof))


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """``(mean, std, lo, hi)`` of ``values`` (one per seed): the t-distribution over seeds.

    ``mean = sum(v)/n``; ``std`` is the sample standard deviation (ddof=1, denominator n-1);
    the interval is ``mean -+ t_{(1+level)/2, n-1} * std / sqrt(n)``, the two-sided ``level``
    confidence interval of the mean from Student's t-distribution with n-1 degrees of freedom
    (the seeds taken as independent draws). With n == 1, std, lo and hi are NaN (no spread
    can be estimated from one seed).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level} is not in (0, 1)")
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("t_interval of no values")
    mean, std = mean_std(values)
    if n == 1:
        nan = float("nan")
        return mean, nan, nan, nan
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


@dataclass(frozen=True)
class Interval:
    """Mean, sample std and ``level`` t-interval of ``n`` per-seed values (NaN where undefined)."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    @classmethod
    def of(cls, values: Sequence[float], level: float = LEVEL) -> Interval:
        return cls(*t_interval(values, level), n=len(values), level=level)

    def as_json(self) -> dict:
        return {"mean": _json_float(self.mean), "std": _json_float(self.std), "ci_low": _json_float(self.lo),
                "ci_high": _json_float(self.hi), "n": self.n}


def verdict(interval: Interval) -> str:
    """``holds`` (lo > 0), ``reversed`` (hi < 0), ``inconclusive`` (the CI contains 0), or
    ``one seed`` (n < 2: no interval) for an interval of differences A - B."""
    if interval.n < 2 or math.isnan(interval.lo):
        return ONE_SEED
    if interval.lo > 0:
        return HOLDS
    if interval.hi < 0:
        return REVERSED
    return INCONCLUSIVE


# ----------------------------------------------------------------------------- per seed


def _nanmean(values: Iterable[float]) -> float:
    """Mean of ``values``; NaN if any is NaN (e.g. the stage std of a one-stage run)."""
    values = list(values)
    if not values or any(math.isnan(v) for v in values):
        return float("nan")
    return sum(values) / len(values)


@dataclass
class SeedStats:
    """One method's statistics for one seed (percent).

    ``bw_mean[o]``: the mean over the stages of order o's Backward RG (stage 1's 100 included);
    ``bw_std[o]``: their sample std; ``last_stage_bw``: the last stage's Backward RG averaged over
    the orders this seed ran; ``bw_rg[o]`` / ``fw_rg[o]``: per stage, for figures.
    """

    method: str
    seed: int | None
    last_stage_bw: float
    bw_mean: dict[str, float] = field(default_factory=dict)
    bw_std: dict[str, float] = field(default_factory=dict)
    bw_rg: dict[str, list[float]] = field(default_factory=dict)
    fw_rg: dict[str, list[float]] = field(default_factory=dict)


def per_seed_stats(runs: Sequence[RunMetrics]) -> dict[str, dict[int | None, SeedStats]]:
    """``{method: {seed: SeedStats}}``: methods in the runs' order, seeds sorted (None first)."""
    headline = last_stage_bw_by_seed(runs)
    out: dict[str, dict[int | None, SeedStats]] = {}
    for m, by_seed in headline.items():
        out[m] = {s: SeedStats(m, s, v) for s, v in by_seed.items()}
    for r in runs:
        st = out[r.method][r.seed]
        st.bw_mean[r.order] = r.bw_mean
        st.bw_std[r.order] = r.bw_std
        st.bw_rg[r.order] = list(r.bw_rg)
        st.fw_rg[r.order] = list(r.fw_rg)
    return out


def _per_stage(series: Sequence[Sequence[float]], level: float) -> list[Interval]:
    """Stage by stage, the interval over the series that reach that stage."""
    n = max((len(s) for s in series), default=0)
    return [Interval.of([s[i] for s in series if len(s) > i], level) for i in range(n)]


@dataclass
class OrderSummary:
    """One (method, order) over its seeds: intervals of the per-seed values."""

    order: str
    seeds: list
    bw_mean: Interval
    bw_std: float  # the mean over the seeds of the stage std (NaN for one-stage runs)
    bw_rg: list[Interval]
    fw_rg: list[Interval]


@dataclass
class MethodSummary:
    """One method over its seeds: the headline's interval and each order's."""

    method: str
    seeds: list
    last_stage_bw: Interval
    orders: dict[str, OrderSummary]


def summarize_seeds(runs: Sequence[RunMetrics], level: float = LEVEL) -> dict[str, MethodSummary]:
    """``{method: MethodSummary}``: every per-seed statistic as mean, sample std and ``level``
    t-interval over the seeds (each over the seeds that have it: an order or a stage a seed
    did not run does not count)."""
    stats = per_seed_stats(runs)
    _, orders = methods_and_orders(runs)
    out: dict[str, MethodSummary] = {}
    for m, by_seed in stats.items():
        seeds = list(by_seed)
        per_order: dict[str, OrderSummary] = {}
        for o in orders:
            have = [s for s in seeds if o in by_seed[s].bw_mean]
            if not have:
                continue
            per_order[o] = OrderSummary(
                o, have,
                Interval.of([by_seed[s].bw_mean[o] for s in have], level),
                _nanmean(by_seed[s].bw_std[o] for s in have),
                _per_stage([by_seed[s].bw_rg[o] for s in have], level),
                _per_stage([by_seed[s].fw_rg[o] for s in have], level),
            )
        out[m] = MethodSummary(m, seeds, Interval.of([by_seed[s].last_stage_bw for s in seeds], level), per_order)
    return out


def mean_runs(runs: Sequence[RunMetrics]) -> list[RunMetrics]:
    """One :class:`RunMetrics` per (method, order), each number the mean over its seeds (seed None).

    Stage i's RG, Backward and Forward RG average the seeds that reached stage i; ``bw_mean``
    and ``bw_std`` average the seeds' own (the std is NaN if one seed's is). For the tables and
    figures that show means over seeds. Raises DataError if two seeds of one (method, order)
    introduce the modalities in different orders.
    """
    groups: dict[tuple[str, str], list[RunMetrics]] = {}
    for r in runs:
        groups.setdefault((r.method, r.order), []).append(r)
    out = []
    for (m, o), group in groups.items():
        longest = max(group, key=lambda r: r.num_stages)
        for r in group:
            if r.modalities != longest.modalities[: r.num_stages]:
                raise DataError(
                    f"{r.source}: method {m!r}, order {o!r}: seed {r.seed} introduces the modalities as "
                    f"{' -> '.join(r.modalities)}, seed {longest.seed} as {' -> '.join(longest.modalities)}"
                )
        rg = []
        for i in range(longest.num_stages):
            reach = [r for r in group if r.num_stages > i]
            rg.append({mod: sum(r.rg[i][mod] for r in reach) / len(reach) for mod in longest.rg[i]})
        bw = [iv.mean for iv in _per_stage([r.bw_rg for r in group], LEVEL)]
        fw = [iv.mean for iv in _per_stage([r.fw_rg for r in group], LEVEL)]
        datasets: dict[str, list[str]] = {}
        for r in group:
            for mod, ds in r.datasets.items():
                datasets.setdefault(mod, [])
                datasets[mod] += [d for d in ds if d not in datasets[mod]]
        out.append(RunMetrics(m, o, list(longest.modalities), rg, bw, fw,
                              sum(r.bw_mean for r in group) / len(group), _nanmean(r.bw_std for r in group),
                              group[0].source, datasets, None))
    return out


def stage_curves(runs: Sequence[RunMetrics], attr: str = "bw_rg", level: float = LEVEL) -> dict[str, list[Interval]]:
    """Per method, per stage: the interval over the seeds of the seed's per-stage mean over its
    orders of ``attr`` (``bw_rg`` / ``fw_rg``), the curve the figures draw with a band."""
    methods, _ = methods_and_orders(runs)
    out: dict[str, list[Interval]] = {}
    for m in methods:
        curves = []
        for s in seeds_of(r for r in runs if r.method == m):
            series = [getattr(r, attr) for r in runs if r.method == m and r.seed == s]
            n = max(len(x) for x in series)
            curves.append([sum(x[i] for x in series if len(x) > i) / sum(1 for x in series if len(x) > i)
                           for i in range(n)])
        out[m] = _per_stage(curves, level)
    return out


# ----------------------------------------------------------------------------- pairs


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().split())


def is_mera(method: str) -> bool:
    """A MERA method: its name starts with "MERA" (case ignored)."""
    return _norm(method).startswith("mera")


CLAIM_MERA = "the paper's Table 2: MERA above every baseline"
CLAIM_MERA_ABLATION = "the paper's Table 4: MERA above each ablation"
CLAIM_REALIGN = "the paper's Table 5: realign helps every method"
CLAIM_ABLATION = "the paper's Table 4: each ablation above Fine-Tuning"
ABLATIONS = ("merge only", "realign only")


def comparison_pairs(methods: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """The orderings the paper claims that ``methods`` can form, as ``(A, B, claims)``: A is
    expected above B. (i) each MERA method above every non-MERA method (the baselines and
    the ablations); (ii) each "X + Realign" above X, by :func:`mera.eval.names.realign_pairs`
    (which also pairs "Realign only" with Fine-Tuning and "MERA (10%)" with "Merge only");
    (iii) the Table 4 ablation: "Merge only" and "Realign only" above Fine-Tuning. A pair met
    twice is listed once, with every claim it supports."""
    pairs: dict[tuple[str, str], list[str]] = {}

    def add(a: str, b: str, claim: str) -> None:
        claims = pairs.setdefault((a, b), [])
        if claim not in claims:
            claims.append(claim)

    for a in methods:
        if is_mera(a):
            for b in methods:
                if not is_mera(b):
                    add(a, b, CLAIM_MERA_ABLATION if _norm(b) in ABLATIONS else CLAIM_MERA)
    for x, with_realign in realign_pairs(methods):
        add(with_realign, x, CLAIM_REALIGN)
    ft = next((m for m in methods if _norm(m) in FINETUNE_NAMES), None)
    if ft is not None:
        for m in methods:
            if _norm(m) in ABLATIONS:
                add(m, ft, CLAIM_ABLATION)
    return [(a, b, claims) for (a, b), claims in pairs.items()]


@dataclass
class Paired:
    """The paired difference A - B of one statistic over the seeds both methods ran.

    ``statistic``: ``last_stage_bw`` (the headline; ``order`` None) or ``bw_mean`` (the mean
    Backward RG over the stages of ``order``). ``differences[k]`` is seed ``seeds[k]``'s
    A - B, in points of relative gain; ``interval`` their t-interval.
    """

    a: str
    b: str
    statistic: str
    order: str | None
    seeds: list
    differences: list[float]
    interval: Interval
    claims: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def verdict(self) -> str:
        return verdict(self.interval)

    def as_json(self) -> dict:
        iv = self.interval.as_json()
        return {"a": self.a, "b": self.b, "statistic": self.statistic, "order": self.order, "n": self.n,
                "seeds": list(self.seeds), "differences": [_json_float(d) for d in self.differences],
                "mean": iv["mean"], "std": iv["std"], "ci_low": iv["ci_low"], "ci_high": iv["ci_high"],
                "verdict": self.verdict}


def paired_difference(stats: dict[str, dict], a: str, b: str, statistic: str, order: str | None = None,
                      level: float = LEVEL) -> Paired | None:
    """A - B of ``statistic`` on the seeds both have (see :class:`Paired`); None if they share none.

    ``stats``: :func:`per_seed_stats`.
    """
    def value(st: SeedStats) -> float | None:
        if statistic == "last_stage_bw":
            return st.last_stage_bw
        if statistic == "bw_mean":
            return st.bw_mean.get(order)
        raise ValueError(f"unknown statistic {statistic!r}")

    seeds, diffs = [], []
    for s in sorted(set(stats[a]) & set(stats[b]), key=seed_order):
        va, vb = value(stats[a][s]), value(stats[b][s])
        if va is not None and vb is not None:
            seeds.append(s)
            diffs.append(va - vb)
    if not seeds:
        return None
    return Paired(a, b, statistic, order, seeds, diffs, Interval.of(diffs, level))


def paired_differences(runs: Sequence[RunMetrics], level: float = LEVEL) -> list[Paired]:
    """For each pair of :func:`comparison_pairs`: the paired difference of the headline
    last-stage BW, then of each order's mean BW (pairs and orders with no common seed left out)."""
    stats = per_seed_stats(runs)
    methods, orders = methods_and_orders(runs)
    out = []
    for a, b, claims in comparison_pairs(methods):
        for statistic, order in [("last_stage_bw", None)] + [("bw_mean", o) for o in orders]:
            p = paired_difference(stats, a, b, statistic, order, level)
            if p is not None:
                p.claims = list(claims)
                out.append(p)
    return out


def orderings(runs: Sequence[RunMetrics], level: float = LEVEL, paired: Sequence[Paired] | None = None) -> list[dict]:
    """The paper's orderings that ``runs`` can form, each judged on the headline last-stage BW::

        {"claim": "A above B", "claims": [the paper's claims it tests], "a", "b", "statistic":
         "last_stage_bw", "n", "mean", "ci_low", "ci_high", "verdict", "by_order": {order: verdict
         on that order's mean BW}}
    """
    if paired is None:
        paired = paired_differences(runs, level)
    out = []
    for p in paired:
        if p.statistic != "last_stage_bw":
            continue
        iv = p.interval.as_json()
        by_order = {q.order: q.verdict for q in paired if q.statistic == "bw_mean" and (q.a, q.b) == (p.a, p.b)}
        out.append({"claim": f"{p.a} above {p.b}", "claims": list(p.claims), "a": p.a, "b": p.b,
                    "statistic": p.statistic, "n": p.n, "mean": iv["mean"], "ci_low": iv["ci_low"],
                    "ci_high": iv["ci_high"], "verdict": p.verdict, "by_order": by_order})
    return out


# ----------------------------------------------------------------------------- JSON


def seed_key(seed: int | None) -> str:
    """A seed as a JSON object key: its digits, or ``"null"`` for no seed."""
    return "null" if seed is None else str(seed)


def over_seed_object(runs: Sequence[RunMetrics], level: float = LEVEL) -> dict:
    """The over-seed part of metrics.json (added by :func:`mera.eval.metrics.summary_object`
    when the runs have two seeds or more)::

        {"seeds": [seed, ...],
         "per_seed": {seed: the one-seed summary object of that seed's runs},
         "over_seeds": {"level", "distribution", "methods": {method: {"seeds", "n", "last_stage_bw": I,
                        "orders": {order: {"seeds", "bw_mean": I, "bw_std_mean", "bw_rg": [I per stage],
                                           "fw_rg": [I per stage]}}}}},
         "paired": [Paired.as_json(), ...],
         "orderings": [see orderings()],
         "last_stage_bw": {method: mean over its seeds of the per-seed headline}}

    ``I`` is ``{"mean", "std", "ci_low", "ci_high", "n"}`` over the seeds (NaN written as null).
    """
    seeds = seeds_of(runs)
    per_seed = {seed_key(s): _one_seed_summary([r for r in runs if r.seed == s]) for s in seeds}
    methods = {}
    for m, ms in summarize_seeds(runs, level).items():
        methods[m] = {
            "seeds": list(ms.seeds),
            "n": len(ms.seeds),
            "last_stage_bw": ms.last_stage_bw.as_json(),
            "orders": {
                o: {"seeds": list(os_.seeds), "bw_mean": os_.bw_mean.as_json(), "bw_std_mean": _json_float(os_.bw_std),
                    "bw_rg": [iv.as_json() for iv in os_.bw_rg], "fw_rg": [iv.as_json() for iv in os_.fw_rg]}
                for o, os_ in ms.orders.items()
            },
        }
    paired = paired_differences(runs, level)
    return {
        "seeds": list(seeds),
        "per_seed": per_seed,
        "over_seeds": {"level": level, "distribution": "Student t, n-1 degrees of freedom; sample std (ddof=1)",
                       "methods": methods},
        "paired": [p.as_json() for p in paired],
        "orderings": orderings(runs, level, paired),
        "last_stage_bw": last_stage_bw(runs),
    }
