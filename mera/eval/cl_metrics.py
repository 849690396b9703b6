"""The usual continual-learning summaries of one run (numpy only), to set our tables beside those of
MCITlib or FusionBench.

The accuracy matrix. For one (method, order, seed) run with m stages, ``A`` is m x m with
``A[i][j]`` the score of modality j after training stage i (rows: stages, columns: modalities in the
order they were introduced; indices from 1 in the formulas, from 0 in the code). It is filled below
and on the diagonal (j <= i) and NaN above it (modality j is not learnt yet).

Normalisation: an entry is not a raw score but the relative gain ``RG_j^i`` of METHOD.md section 5,
in percent of the expert: ``A[i][j] = 100 * (1/K_j) * sum_k S^i_{j,k} / S_sup_{j,k}``, the mean over
modality j's K_j datasets of the score at stage i divided by the expert's score on that dataset (the
expert of the same seed). CIDEr x100 and QA accuracies in [0, 1] thus share one scale, where 100
means "as good as the expert"; the literature's formulas below are applied unchanged to that scale.

- Last accuracy: ``Last = (1/m) * sum_{j=1..m} A[m][j]``, every modality after the final stage.
- Average incremental accuracy (Rebuffi et al., "iCaRL", CVPR 2017):
  ``Avg = (1/m) * sum_{i=1..m} [ (1/i) * sum_{j=1..i} A[i][j] ]``.
- Backward transfer (Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS 2017):
  ``BWT = (1/(m-1)) * sum_{j=1..m-1} (A[m][j] - A[j][j])``; negative when old modalities degrade.
- Forgetting (Chaudhry et al., "Riemannian Walk", ECCV 2018; here after the last stage):
  ``F = (1/(m-1)) * sum_{j=1..m-1} max_{l=j..m-1} (A[l][j] - A[m][j])``; the largest drop of each old
  modality from its best earlier value. Since the maximum includes ``l = j``, ``F >= -BWT``, with
  equality when every column peaks on its diagonal.

With a single stage (m = 1) BWT and F have no old modality and are NaN.

Relation to the paper's metrics (:mod:`mera.eval.metrics`): row i of ``A`` holds the ``RG_j^i`` of
:class:`~mera.eval.metrics.RunMetrics`; the last stage's backward RG is the mean of ``A[m][j]`` over
j < m and its forward RG is ``A[m][m]``, so ``Last = ((m-1) * BW_m + FW_m) / m`` for m >= 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mera.eval.metrics import RunMetrics, ScoreRow, run_metrics


@dataclass(frozen=True)
class CLMetrics:
    """Last, Avg, BWT and Forgetting of one accuracy matrix (percent of the expert; see the module)."""

    last: float
    avg: float
    bwt: float
    forgetting: float
    matrix: np.ndarray = field(repr=False, compare=False)
    modalities: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        return int(self.matrix.shape[0])

    def as_json(self) -> dict:
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {"last": num(self.last), "avg": num(self.avg), "bwt": num(self.bwt), "forgetting": num(self.forgetting),
                "modalities": list(self.modalities),
                "matrix": [[num(x) for x in row[: i + 1]] for i, row in enumerate(self.matrix)]}


def as_matrix(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> np.ndarray:
    """A float copy of ``matrix``, checked: square, at least 1 x 1, finite on and below the diagonal.
    Entries above the diagonal are ignored and set to NaN (None is accepted there)."""
    rows = [list(r) for r in matrix]
    m = len(rows)
    if m == 0 or any(len(r) != m for r in rows):
        raise ValueError(f"an accuracy matrix is square and not empty; got row lengths {[len(r) for r in rows]}")
    a = np.full((m, m), np.nan)
    for i, row in enumerate(rows):
        for j in range(i + 1):
            v = row[j]
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"accuracy matrix entry [{i}][{j}] (stage {i + 1}, modality {j + 1}) is {v!r}, "
                                 "not a finite number")
            a[i, j] = float(v)
    return a


def last_accuracy(matrix) -> float:
    """``Last = (1/m) * sum_j A[m][j]``."""
    a = as_matrix(matrix)
    return float(a[-1].mean())


def average_incremental_accuracy(matrix) -> float:
    """``Avg = (1/m) * sum_i (1/i) * sum_{j<=i} A[i][j]`` (Rebuffi et al. 2017)."""
    a = as_matrix(matrix)
    return float(np.mean([a[i, : i + 1].mean() for i in range(a.shape[0])]))


def backward_transfer(matrix) -> float:
    """``BWT = (1/(m-1)) * sum_{j<m} (A[m][j] - A[j][j])`` (Lopez-Paz & Ranzato 2017); NaN when m = 1."""
    a = as_matrix(matrix)
    m = a.shape[0]
    if m < 2:
        return float("nan")
    return float(np.mean(a[-1, : m - 1] - np.diag(a)[: m - 1]))


def forgetting(matrix) -> float:
    """``F = (1/(m-1)) * sum_{j<m} max_{l=j..m-1} (A[l][j] - A[m][j])`` (Chaudhry et al. 2018); NaN when m = 1."""
    a = as_matrix(matrix)
    m = a.shape[0]
    if m < 2:
        return float("nan")
    return float(np.mean([a[j : m - 1, j].max() - a[-1, j] for j in range(m - 1)]))


def cl_metrics(matrix, modalities: Sequence[str] = ()) -> CLMetrics:
    """All four summaries of a plain accuracy matrix (``modalities``: the column names, optional)."""
    a = as_matrix(matrix)
    if modalities and len(modalities) != a.shape[0]:
        raise ValueError(f"{len(modalities)} modality names for a {a.shape[0]} x {a.shape[0]} matrix")
    return CLMetrics(last_accuracy(a), average_incremental_accuracy(a), backward_transfer(a), forgetting(a), a,
                     tuple(modalities))


def accuracy_matrix(run: RunMetrics) -> np.ndarray:
    """The m x m matrix ``A[i][j] = RG_j^i`` (percent) of a run, columns in introduction order, NaN above
    the diagonal."""
    return as_matrix([[row.get(mod) for mod in run.modalities] for row in run.rg])


def cl_metrics_of_run(run: RunMetrics) -> CLMetrics:
    """:func:`cl_metrics` of a run built by :func:`mera.eval.metrics.run_metrics`."""
    return cl_metrics(accuracy_matrix(run), run.modalities)


def cl_metrics_of_rows(rows: Sequence[ScoreRow]) -> dict[tuple[str, str, int | None], CLMetrics]:
    """``{(method, order, seed): CLMetrics}`` for every run in ``rows``: a scores table, or the rows of one
    run as :func:`mera.eval.metrics.run_metrics` groups them together with the expert rows they need.

    The table is checked as :func:`~mera.eval.metrics.run_metrics` checks it (DataError naming the file
    and line on a duplicate, a missing or zero expert, a broken stage schedule).
    """
    return {(r.method, r.order, r.seed): cl_metrics_of_run(r) for r in run_metrics(rows)}


def table_matrix(table: Mapping, method: str, order: str) -> np.ndarray:
    """The accuracy matrix of (method, order) in a table keyed ``("rg", method, order, stage, modality)``
    (a replicate's statistics in :mod:`mera.eval.bootstrap`): columns in the order the modalities came (the
    new one of each stage), NaN above the diagonal."""
    stages: dict[int, list[str]] = {}
    for k in table:
        if isinstance(k, tuple) and k[:3] == ("rg", method, order):
            stages.setdefault(k[3], []).append(k[4])
    mods: list[str] = []
    for i in sorted(stages):
        mods += [m for m in stages[i] if m not in mods]
    return np.array([[table[("rg", method, order, i, m)] if c < i else np.nan for c, m in enumerate(mods)]
                     for i in sorted(stages)], dtype=float)
