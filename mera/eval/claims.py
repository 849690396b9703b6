"""The paper's claims as a checklist, each judged on this run's paired-bootstrap intervals
(:mod:`mera.eval.bootstrap`, 95% percentile intervals; pure Python + numpy).

Every claim compares statistics of :class:`~mera.eval.bootstrap.Replicates` (the last-stage backward RG
``BW_m``, the mean forward RG, per-stage forward RGs) and names the numbers it used. Its verdict:

- ``holds``: the rule's intervals all fall on the claimed side (for a difference A - B "above": the
  whole interval above 0);
- ``does not hold``: an interval falls wholly on the other side (e.g. a baseline significantly above
  MERA in one order);
- ``inconclusive``: neither (an interval straddles the bound: this run cannot tell);
- ``not testable in this run``: the run lacks what the claim needs (a method, a second order, stage 2,
  or per-item scores), with the reason.

"MERA" below is MERA (10%) when the run has it, else its MERA method (a name starting with "MERA") of
highest last-stage BW over the orders. Method names match as :mod:`mera.eval.names` matches them (case
and spacing ignored; any spelling of fine-tuning). The rules:

1. **MERA has the best backward RG in every order** (Table 2): in each order, MERA's last-stage BW minus
   each Table 2 baseline's (Fine-Tuning, Replay (1%), Replay (10%), EWC, PathWeave; those in the run):
   every interval above 0. Needs two orders or more (the paper ran two).
2. **MERA (10%) above MERA (1%)**: the last-stage BW over the orders, interval above 0.
3. **Merge and realign each help, and more together** (Table 4): Merge only - Fine-Tuning, Realign only -
   Fine-Tuning, MERA (10%) - Merge only and MERA (10%) - Realign only, on the last-stage BW over the
   orders: every interval above 0. Needs all four methods.
4. **Realign helps every baseline** (Table 5): each "X + Realign" - X (and Realign only - Fine-Tuning:
   realign added to fine-tuning) on the last-stage BW over the orders: every interval above 0.
5. **MERA's plasticity is comparable to EWC's and PathWeave's** (section 5.6): MERA's mean forward RG
   (stages 2..m, each order's mean, then the mean over the orders) minus EWC's and minus PathWeave's:
   each interval inside ``[-margin, +margin]`` (default 5 points) holds; an interval wholly outside it
   does not hold (a MERA far above is not "comparable" either; the numbers say which side). Needs both.
6. **Positive forward transfer before stage 4**: MERA's forward RG at stage 2 or 3 of some order has an
   interval above 100 (better than its expert); does not hold when every such interval is below 100.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from mera.eval.bootstrap import Estimate, Replicates
from mera.eval.names import FINETUNE_NAMES, realign_pairs

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, NOT_TESTABLE = "holds", "does not hold", "inconclusive", "not testable in this run"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, NOT_TESTABLE)
BASELINES = ("Fine-Tuning", "Replay (1%)", "Replay (10%)", "EWC", "PathWeave")


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def find_method(methods: Sequence[str], name: str) -> str | None:
    """The run's method called ``name`` (case and spacing ignored; any of the names of fine-tuning
    matches another), or None."""
    n = _norm(name)
    for m in methods:
        if _norm(m) == n or (n in FINETUNE_NAMES and _norm(m) in FINETUNE_NAMES):
            return m
    return None


def stat_key(statistic: str, method: str, order: str | None) -> tuple:
    """The :class:`~mera.eval.bootstrap.Replicates` key of a report statistic (``last_stage_bw``,
    ``bw_mean``, ``fw_mean``) of ``method`` on ``order`` (None: over the orders)."""
    return ({"last_stage_bw": "last_bw"}.get(statistic, statistic), method, order)


def best_mera(rep: Replicates | None, methods: Sequence[str]) -> str | None:
    """MERA (10%) when the run has it, else the MERA method of highest last-stage BW point estimate."""
    m10 = find_method(methods, "MERA (10%)")
    if m10 is not None:
        return m10
    meras = [m for m in methods if _norm(m).startswith("mera")]
    if not meras:
        return None
    if rep is None:
        return meras[0]
    point = {m: rep.point[rep.keys.index(stat_key("last_stage_bw", m, None))] for m in meras
             if stat_key("last_stage_bw", m, None) in rep.keys}
    return max(point, key=lambda m: -math.inf if math.isnan(point[m]) else point[m]) if point else meras[0]


@dataclass
class Number:
    """One number a claim used: ``what`` it is, its estimate; ``kind``: "difference" (A - B) or "value"."""

    what: str
    estimate: Estimate
    kind: str = "difference"

    def as_json(self) -> dict:
        e = self.estimate.as_json()
        return {"what": self.what, "kind": self.kind, "point": e["point"], "low": e["low"], "high": e["high"],
                "n": e["n"], **({"p": e["p"]} if self.kind == "difference" else {})}


@dataclass
class Claim:
    """One claim of the checklist: ``key``, its ``text``, the ``rule`` it is judged by, the ``verdict``
    (:data:`VERDICTS`), the ``reason`` (why not testable, or what decided it) and the ``numbers`` used."""

    key: str
    text: str
    rule: str
    verdict: str
    reason: str = ""
    numbers: list[Number] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # the rule's parameters (the plasticity margin)

    def as_json(self) -> dict:
        return {"claim": self.key, "text": self.text, "rule": self.rule, "verdict": self.verdict, "reason": self.reason,
                **self.extra, "numbers": [n.as_json() for n in self.numbers]}


def _all_above(numbers: list[Number], bound: float) -> tuple[str, str]:
    """holds: every interval above ``bound``; does not hold: one wholly below it; else inconclusive."""
    if not numbers:
        return NOT_TESTABLE, "no interval is defined on these replicates"
    below = [n.what for n in numbers if n.estimate.high < bound]
    if below:
        return DOES_NOT_HOLD, "wholly below: " + "; ".join(below)
    if all(n.estimate.low > bound for n in numbers):
        return HOLDS, "every interval is above"
    return INCONCLUSIVE, "an interval contains the bound: " + "; ".join(n.what for n in numbers if not n.estimate.low > bound)


def _some_above(numbers: list[Number], bound: float) -> tuple[str, str]:
    """holds: some interval above ``bound``; does not hold: every one wholly below it; else inconclusive."""
    if not numbers:
        return NOT_TESTABLE, "no interval is defined on these replicates"
    above = [n.what for n in numbers if n.estimate.low > bound]
    if above:
        return HOLDS, "above: " + "; ".join(above)
    if all(n.estimate.high < bound for n in numbers):
        return DOES_NOT_HOLD, "every interval is below"
    return INCONCLUSIVE, "no interval is wholly above"


def _within(numbers: list[Number], margin: float) -> tuple[str, str]:
    """holds: every interval inside [-margin, margin]; does not hold: one wholly outside it; else inconclusive."""
    if not numbers:
        return NOT_TESTABLE, "no interval is defined on these replicates"
    out = [n.what for n in numbers if n.estimate.high < -margin or n.estimate.low > margin]
    if out:
        return DOES_NOT_HOLD, "wholly outside the margin: " + "; ".join(out)
    if all(-margin <= n.estimate.low and n.estimate.high <= margin for n in numbers):
        return HOLDS, "every interval is inside the margin"
    return INCONCLUSIVE, "an interval crosses the margin: " + "; ".join(
        n.what for n in numbers if not (-margin <= n.estimate.low and n.estimate.high <= margin))


def _diff(rep: Replicates, a: str, b: str, statistic: str, order: str | None, what: str) -> Number | None:
    ka, kb = stat_key(statistic, a, order), stat_key(statistic, b, order)
    if ka not in rep.keys or kb not in rep.keys:
        return None
    return Number(what, rep.estimate(ka, minus=kb))


def _defined(numbers: list[Number | None]) -> list[Number]:
    """The numbers the replicates define (every method has its statistic over the orders: all of them)."""
    return [n for n in numbers if n is not None]


def _missing(methods: Sequence[str], names: Sequence[str]) -> list[str]:
    return [n for n in names if find_method(methods, n) is None]


def _not_in_run(names: list[str]) -> str:
    return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not in this run"


TEXTS = {
    "mera_best": ("MERA has the best backward RG in every training order (Table 2)",
                  "in each order, MERA's last-stage BW minus each Table 2 baseline's: every interval above 0"),
    "mera_10_above_1": ("MERA (10%) above MERA (1%)", "last-stage BW over the orders: the difference's interval above 0"),
    "merge_realign": ("Merge and realign each help, and more together (Table 4)",
                      "Merge only and Realign only above Fine-Tuning, MERA (10%) above each of them (last-stage BW over "
                      "the orders): every interval above 0"),
    "realign_helps": ("Realign helps every baseline (Table 5)",
                      "each X + Realign above X (last-stage BW over the orders): every interval above 0"),
    "plasticity": ("MERA's plasticity is comparable to EWC's and PathWeave's (its forward RG)",
                   "MERA's mean forward RG (stages 2..m, over the orders) minus EWC's and minus PathWeave's: each "
                   "interval inside plus or minus the margin"),
    "forward_transfer": ("Positive forward transfer before stage 4",
                         "MERA's forward RG at stage 2 or 3 of some order: an interval above 100"),
}


def _claim(key: str, verdict: str, reason: str = "", numbers: list[Number] | None = None) -> Claim:
    text, rule = TEXTS[key]
    return Claim(key, text, rule, verdict, reason, numbers or [])


def checklist(rep: Replicates | None, methods: Sequence[str], orders: Sequence[str], margin: float = 5.0,
              missing: str | None = None) -> list[Claim]:
    """The six claims of the module docstring, in its order, judged on ``rep`` (None: every claim is not
    testable, for the reason ``missing``)."""
    if rep is None:
        out = [_claim(k, NOT_TESTABLE, missing or "no bootstrap replicates") for k in TEXTS]
        out[list(TEXTS).index("plasticity")].extra["margin"] = float(margin)
        return out
    mera = best_mera(rep, methods)
    out = []

    # 1. MERA best in every order
    baselines = [b for b in (find_method(methods, n) for n in BASELINES) if b is not None and b != mera]
    if mera is None or not baselines or len(orders) < 2:
        why = ("no MERA method is in this run" if mera is None else "no Table 2 baseline is in this run" if not baselines
               else f"the run has one order ({orders[0]}); the claim is about every order the paper ran (two)")
        out.append(_claim("mera_best", NOT_TESTABLE, why))
    else:
        nums = [n for o in orders for b in baselines
                if (n := _diff(rep, mera, b, "last_stage_bw", o, f"{mera} − {b}, last-stage BW, {o}")) is not None]
        out.append(_claim("mera_best", *_all_above(nums, 0.0), nums) if nums else
                   _claim("mera_best", NOT_TESTABLE, "MERA and the baselines share no order"))

    # 2. MERA (10%) above MERA (1%)
    gone = _missing(methods, ["MERA (10%)", "MERA (1%)"])
    if gone:
        out.append(_claim("mera_10_above_1", NOT_TESTABLE, _not_in_run(gone)))
    else:
        a, b = find_method(methods, "MERA (10%)"), find_method(methods, "MERA (1%)")
        nums = _defined([_diff(rep, a, b, "last_stage_bw", None, f"{a} − {b}, last-stage BW over the orders")])
        out.append(_claim("mera_10_above_1", *_all_above(nums, 0.0), nums))

    # 3. the ablation
    gone = _missing(methods, ["Fine-Tuning", "Merge only", "Realign only", "MERA (10%)"])
    if gone:
        out.append(_claim("merge_realign", NOT_TESTABLE, _not_in_run(gone)))
    else:
        ft, mo, ro, m10 = (find_method(methods, n) for n in ("Fine-Tuning", "Merge only", "Realign only", "MERA (10%)"))
        nums = _defined([_diff(rep, a, b, "last_stage_bw", None, f"{a} − {b}, last-stage BW over the orders")
                         for a, b in ((mo, ft), (ro, ft), (m10, mo), (m10, ro))])
        out.append(_claim("merge_realign", *_all_above(nums, 0.0), nums))

    # 4. realign helps every baseline
    pairs = [(x, xr) for x, xr in realign_pairs(methods) if _norm(x) != "merge only"]
    if not pairs:
        out.append(_claim("realign_helps", NOT_TESTABLE, "no method runs both with and without realign in this run"))
    else:
        nums = _defined([_diff(rep, xr, x, "last_stage_bw", None, f"{xr} − {x}, last-stage BW over the orders")
                         for x, xr in pairs])
        out.append(_claim("realign_helps", *_all_above(nums, 0.0), nums))

    # 5. plasticity within the margin of EWC's and PathWeave's
    gone = (["a MERA method"] if mera is None else []) + _missing(methods, ["EWC", "PathWeave"])
    if gone:
        out.append(_claim("plasticity", NOT_TESTABLE, _not_in_run(gone)))
        out[-1].extra["margin"] = float(margin)
    else:
        nums = [n for x in (find_method(methods, "EWC"), find_method(methods, "PathWeave"))
                if (n := _diff(rep, mera, x, "fw_mean", None, f"{mera} − {x}, mean forward RG")) is not None]
        if len(nums) < 2:
            out.append(_claim("plasticity", NOT_TESTABLE, "no stage 2 in this run: no forward RG is measured"))
        else:
            out.append(_claim("plasticity", *_within(nums, margin), nums))
        out[-1].extra["margin"] = float(margin)

    # 6. positive forward transfer at stage 2 or 3
    if mera is None:
        out.append(_claim("forward_transfer", NOT_TESTABLE, "no MERA method is in this run"))
    else:
        nums = [Number(f"{mera} forward RG, {o}, stage {i}", rep.estimate(("fw", mera, o, i)), "value")
                for o in orders for i in (2, 3) if ("fw", mera, o, i) in rep.keys]
        out.append(_claim("forward_transfer", *_some_above(nums, 100.0), nums) if nums else
                   _claim("forward_transfer", NOT_TESTABLE, "the run's chains have one stage: no forward RG is measured"))
    return out
