"""Multiple comparisons: Holm's step-down correction over a declared family of p-values, and the labels
that keep the declared (primary) comparisons apart from the exploratory ones (numpy only).

Holm (1979), "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70.
For a family of n hypotheses with p-values sorted ``p_(1) <= ... <= p_(n)``, the adjusted p-values are

    ``p~_(i) = min(1, max_{k=1..i} (n - k + 1) * p_(k))``

(the running maximum makes them monotone in the raw order; the cap keeps them p-values). Rejecting
every hypothesis with ``p~ <= alpha`` is the step-down procedure itself: reject ``H_(1), H_(2), ...``
while ``p_(i) <= alpha / (n - i + 1)`` and stop at the first failure. It controls the family-wise error
rate at ``alpha`` under any dependence between the tests. Ties keep their input order (stable sort),
which does not change the adjusted values.

Only the declared family is corrected: a comparison outside it is reported "exploratory", with its raw
p-value and no claim attached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

PRIMARY = "primary"
EXPLORATORY = "exploratory"


def _checked(pvalues: Sequence[float]) -> np.ndarray:
    p = np.asarray(list(pvalues), dtype=float)
    if p.ndim != 1:
        raise ValueError("the p-values of a family are a flat sequence")
    bad = [float(x) for x in p if not (math.isfinite(x) and 0.0 <= x <= 1.0)]
    if bad:
        raise ValueError(f"a p-value is a number in [0, 1]; got {bad[0]!r}")
    return p


def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, in the input order: ``min(1, max_{k<=i} (n-k+1) p_(k))`` (see the module)."""
    p = _checked(pvalues)
    n = p.size
    if n == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((n - np.arange(n)) * p[order]))
    out = np.empty(n)
    out[order] = stepped
    return out


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(adjusted p-values, rejected)`` of Holm's procedure at family-wise level ``alpha``, input order kept."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is a level in (0, 1); got {alpha!r}")
    adjusted = holm_adjust(pvalues)
    return adjusted, adjusted <= alpha


@dataclass(frozen=True)
class Label:
    """How one comparison is reported: ``kind`` is "primary" (in the declared family, Holm-adjusted,
    ``reject`` at the family's alpha) or "exploratory" (raw p only; ``p_adjusted`` and ``reject`` None)."""

    kind: str
    p: float
    p_adjusted: float | None = None
    reject: bool | None = None

    def as_json(self) -> dict:
        return {"kind": self.kind, "p": self.p, "p_adjusted": self.p_adjusted, "reject": self.reject}


def label_comparisons(pvalues: Mapping[Hashable, float], primary: Iterable[Hashable],
                      alpha: float = 0.05) -> dict[Hashable, Label]:
    """Label every comparison of ``pvalues`` (``{key: raw two-sided p}``, e.g. keyed by a (method A,
    method B) pair): the keys in the declared family ``primary`` get "primary" with Holm's adjustment
    computed over that family alone; every other key "exploratory". Every declared key must have a
    p-value (a family is declared before the data are seen; a silently dropped member would shrink it).
    """
    family = list(dict.fromkeys(primary))
    missing = [k for k in family if k not in pvalues]
    if missing:
        raise ValueError(f"the primary family names comparisons without a p-value: {', '.join(map(repr, missing))}")
    adjusted, rejected = holm([pvalues[k] for k in family], alpha) if family else (np.empty(0), np.empty(0, bool))
    in_family = {k: i for i, k in enumerate(family)}
    out: dict[Hashable, Label] = {}
    for key, p in pvalues.items():
        if key in in_family:
            i = in_family[key]
            out[key] = Label(PRIMARY, float(p), float(adjusted[i]), bool(rejected[i]))
        else:
            out[key] = Label(EXPLORATORY, float(_checked([p])[0]))
    return out
