"""The paper's method names as the report and the seed statistics read them: which name is
fine-tuning, which pairs of methods differ by realign (Table 5), which rows form the ablation
(Table 4). Case and spacing in the names are ignored. Pure Python."""

from __future__ import annotations

import re
from typing import Sequence


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
