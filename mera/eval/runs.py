"""One (method, order, seed) run's metrics and what is computed over several runs without the
seed statistics: the seeds present, the methods and orders, the headline last-stage BW, the one-seed
JSON summary. Below both :mod:`mera.eval.metrics` (which builds the runs from a scores table) and
:mod:`mera.eval.seeds` (the statistics over seeds), which read them (pure Python, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass
class RunMetrics:
    """Metrics of one (method, order, seed) run; stage i is at list index i-1.

    ``modalities`` are in the order they were introduced (``modalities[i-1]`` is new at
    stage i); ``rg[i-1]`` maps each modality seen by stage i to ``RG_j^i`` (percent).
    """

    method: str
    order: str
    modalities: list[str]
    rg: list[dict[str, float]]
    bw_rg: list[float]
    fw_rg: list[float]
    bw_mean: float
    bw_std: float  # NaN with a single stage (sample std undefined)
    source: str = ""
    datasets: dict[str, list[str]] = field(default_factory=dict)
    seed: int | None = None

    @property
    def num_stages(self) -> int:
        return len(self.bw_rg)

    def accuracy_matrix(self) -> list[list[float | None]]:
        """Stage x modality matrix of ``RG_j^i`` (percent); None where modality j is not yet seen.

        Columns follow ``self.modalities`` (introduction order).
        """
        return [[stage_rg.get(m) for m in self.modalities] for stage_rg in self.rg]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean ``sum(v)/n`` and sample standard deviation ``sqrt(sum((v-mean)^2)/(n-1))``.

    The std is NaN for a single value (n-1 = 0).
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def seed_order(seed: int | None) -> tuple[int, int]:
    """Sort key of seeds: None (no seed) first, then the seeds by value."""
    return (0, 0) if seed is None else (1, seed)


def seeds_of(runs: Iterable[RunMetrics]) -> list[int | None]:
    """The distinct seeds of ``runs``, sorted (None first)."""
    return sorted({r.seed for r in runs}, key=seed_order)


def last_stage_bw_by_seed(runs: Sequence[RunMetrics]) -> dict[str, dict[int | None, float]]:
    """Per method and seed: ``(1/O) * sum_o BW_m^o``, the last stage's backward RG of each order o
    that seed ran (denominator: that number O of orders). Seeds sorted, None first."""
    acc: dict[str, dict[int | None, list[float]]] = {}
    for r in runs:
        acc.setdefault(r.method, {}).setdefault(r.seed, []).append(r.bw_rg[-1])
    return {m: {s: sum(v) / len(v) for s, v in sorted(by.items(), key=lambda kv: seed_order(kv[0]))}
            for m, by in acc.items()}


def methods_and_orders(runs: Sequence[RunMetrics]) -> tuple[list[str], list[str]]:
    """The methods and the orders of ``runs``, each in order of first appearance."""
    methods: list[str] = []
    orders: list[str] = []
    for r in runs:
        if r.method not in methods:
            methods.append(r.method)
        if r.order not in orders:
            orders.append(r.order)
    return methods, orders


def last_stage_bw(runs: Sequence[RunMetrics]) -> dict[str, float]:
    """Headline per method: ``(1/O) * sum_o BW_m^o``, the last stage's backward RG of each order o.

    Denominator: the number O of orders present for that method. With several seeds, this is
    computed per seed (:func:`last_stage_bw_by_seed`) and then averaged over the method's seeds
    (denominator: its number of seeds).
    """
    return {m: sum(by.values()) / len(by) for m, by in last_stage_bw_by_seed(runs).items()}


def _json_float(x: float | None) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(x)


def _one_seed_summary(runs: Sequence[RunMetrics]) -> dict:
    summary = []
    for r in runs:
        summary.append(
            {
                "method": r.method,
                "order": r.order,
                "seed": r.seed,
                "bw_rg": [_json_float(x) for x in r.bw_rg],
                "fw_rg": [_json_float(x) for x in r.fw_rg],
                "bw_mean": _json_float(r.bw_mean),
                "bw_std": _json_float(r.bw_std),
                "rg": {m: [_json_float(s.get(m)) for s in r.rg] for m in r.modalities},
            }
        )
    return {"summary": summary, "last_stage_bw": last_stage_bw(runs)}
