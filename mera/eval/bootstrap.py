"""A paired bootstrap over seeds and test items for the paper's metrics (numpy only).

Input: one :class:`ItemScore` per test item (seed, method, order, stage (None for the expert, its seed's
upper bound), modality, dataset, task, item id, score), kept in ``items.csv`` (:data:`COLUMNS`). The mean
of a (seed, method, order, stage, modality, dataset)'s items is the score ``S`` of the scores table; the
statistics are those of :mod:`mera.eval.metrics` (METHOD.md section 5), built on ``RG_j^i = 100 * (1/K) *
sum_k S^i_{j,k} / S_sup_{j,k}``; the headline averages a seed's orders, then the seeds.

CIDEr: the per-image CIDEr-D of pycocoevalcap's ``compute_score`` averages to the corpus score when the
IDF is taken over the whole test set; resampling the item scores holds that IDF fixed instead of
recomputing it per resample, an approximation (a resampled corpus would have a slightly different IDF).

Replicate b of B: (1) draw S seeds with replacement out of the S seeds; (2) for each drawn seed and each
(modality, dataset), draw n item indices with replacement: ONE draw for every method, stage and order of
that seed and for its expert (paired), as a row c of counts (sum n): the resampled means of the dataset's
G scored versions are one product ``c @ X.T / n`` (X: G x n scores); (3) per drawn seed every RG, BW, FW
and summary, linear in the ratios ``S / S_sup`` (one more product), averaged over the drawn seeds that
have them; user statistics are functions of that table; (4) the percentile interval (Efron's): the
``(1-level)/2`` and ``(1+level)/2`` quantiles of the B values (numpy's linear interpolation). A replicate
where a statistic is undefined is left out of it (``n`` counts those kept): none of its seeds drawn, or
(for every statistic) a resampled expert mean of 0. Same items, B and seed: same numbers.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from mera.errors import DataError
from mera.eval.metrics import EXPERT, TASKS, ScoreRow, expert_table, find_expert, run_metrics
from mera.io import write_text

COLUMNS = ("seed", "method", "order", "stage", "modality", "dataset", "task", "item", "score")
CHUNK = 1 << 21  # at most this many item counts drawn at once (bounds the memory on large test sets)


@dataclass(frozen=True, slots=True)
class ItemScore:
    """The score of one test item (caption: its CIDEr-D x100; qa: in [0, 1]), with its file and line."""

    seed: int | None
    method: str
    order: str
    stage: int | None  # None for the expert
    modality: str
    dataset: str
    task: str
    item: str
    score: float
    source: str = "<memory>"
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line}"


def write_items(path: str | os.PathLike, items: Iterable[ItemScore]) -> None:
    """Write ``items.csv`` (empty cells: no seed, the expert's stage) under a temporary name, then rename it."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([COLUMNS] + [
        ["" if it.seed is None else it.seed, it.method, it.order, "" if it.stage is None else it.stage,
         it.modality, it.dataset, it.task, it.item, repr(float(it.score))] for it in items])
    write_text(path, buf.getvalue())


def format_item_rows(rows: Iterable[Mapping]) -> str:
    """CSV text (the :data:`COLUMNS` header first) of ``rows``, mappings with those keys (a missing one:
    an empty cell); a float score is written with ``repr`` (every digit kept), anything else as it is.
    The run directory's own files: a stage folder's ``items.csv`` (no seed; an expert's order and stage
    empty, as in its scores.csv) and the run's, assembled with the seeds (mera.runner.rundir)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([repr(float(v)) if k == "score" and isinstance(v, float) else ("" if v is None else v)
                    for k, v in ((k, r.get(k, "")) for k in COLUMNS)])
    return buf.getvalue()


def read_item_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of an items file as plain string mappings (no checks: the run directory's own files)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _parse_item(cells: list[str], col: dict[str, int], source: str, line: int) -> ItemScore:
    where = f"{source}, line {line}"
    if len(cells) != len(COLUMNS):
        raise DataError(f"{where}: {len(cells)} fields, expected {len(COLUMNS)} ({','.join(cells)})")
    get = {name: cells[i].strip() for name, i in col.items()}
    empty = [n for n in ("method", "order", "modality", "dataset", "task", "item", "score") if not get[n]]
    seed, stage = (int(get[n]) if get[n].isascii() and get[n].isdecimal() else None for n in ("seed", "stage"))
    top = 1.0 if get["task"] == "qa" else math.inf
    try:
        score = float(get["score"])
    except ValueError:
        score = math.nan
    problem = (f"empty {empty[0]}" if empty
               else f"task {get['task']!r} is not one of {', '.join(TASKS)}" if get["task"] not in TASKS
               else f"seed {get['seed']!r} is not a non-negative integer" if get["seed"] and seed is None
               else f"expert items have an empty stage, got {get['stage']!r}" if get["method"] == EXPERT and get["stage"]
               else f"stage {get['stage']!r} is not a positive integer" if get["method"] != EXPERT and not stage
               else f"score {get['score']!r} is not a number in [0, {top:g}]" if not (0 <= score <= top and math.isfinite(score))
               else "")
    if problem:
        raise DataError(f"{where}: {problem} ({','.join(cells)})")
    return ItemScore(seed, get["method"], get["order"], stage, get["modality"], get["dataset"], get["task"],
                     get["item"], score, source, line)


def read_items(path: str | os.PathLike) -> list[ItemScore]:
    """Read ``items.csv`` (header: the :data:`COLUMNS`, any order); DataError names the file and the line."""
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            if sorted(header := [h.strip() for h in next(reader)]) != sorted(COLUMNS):
                raise DataError(f"{path}, line 1: header {','.join(header)!r}; expected the columns {','.join(COLUMNS)}")
            col = {name: header.index(name) for name in COLUMNS}
            return [_parse_item(cells, col, path, reader.line_num) for cells in reader if any(c.strip() for c in cells)]
    except StopIteration:
        raise DataError(f"{path}: empty file; expected the header {','.join(COLUMNS)}") from None
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not CSV ({e})") from None
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read an items CSV file ({e.strerror if isinstance(e, OSError) else e})") from None


class _Seed(NamedTuple):
    """One seed's datasets (G x n item scores) and its statistics ``[1, means[num] / means[den]] @ weights``
    (the leading 1 carries the 100 of stage 1); ``present``: 1 where the seed has the statistic."""

    blocks: list[np.ndarray]
    num: np.ndarray
    den: np.ndarray
    weights: np.ndarray
    present: np.ndarray


def _stats(s: _Seed, means: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.column_stack([np.ones(len(means)), means[:, s.num] / means[:, s.den]]) @ s.weights


def _avg(forms: list[dict]) -> dict:
    """The mean of linear forms ``{ratio index (0: the constant 1): weight}``."""
    return {p: sum(f.get(p, 0.0) for f in forms) / len(forms) for p in dict.fromkeys(p for f in forms for p in f)}


def _design(items: Sequence[ItemScore]) -> tuple[list[tuple], list[_Seed]]:
    groups: dict[tuple, dict[str, ItemScore]] = {}
    for it in items:
        g = groups.setdefault((it.method, it.order, it.seed, it.stage, it.modality, it.dataset), {})
        first = next(iter(g.values()), it)
        if it.item in g or it.task != first.task:
            raise DataError(f"{it.where}: " + (f"item {it.item!r} repeated (first at {g[it.item].where})" if it.item in g
                                               else f"task {it.task!r}, but {first.task!r} at {first.where}"))
        g[it.item] = it
    if not groups:
        raise DataError("no item scores given")
    firsts = {k: next(iter(g.values())) for k, g in groups.items()}
    rows = {k: ScoreRow(k[0], k[1], k[3], k[4], k[5], f.task, sum(i.score for i in groups[k].values()) / len(groups[k]),
                        f.source, f.line, k[2]) for k, f in firsts.items()}
    runs = run_metrics(list(rows.values()))  # checks duplicates, experts, stage schedules
    experts = expert_table(rows.values())
    expert_of = {k: find_expert(experts, r).key for k, r in rows.items() if r.method != EXPERT}
    per_seed: dict[int | None, tuple[dict, dict]] = {}  # seed -> ({(num, den): ratio}, {statistic: form})
    by_method: dict[tuple, list] = {}  # (seed, method) -> its orders' (last BW, mean BW)
    for r in runs:
        pairs, forms = per_seed.setdefault(r.seed, ({None: 0}, {}))  # ratio 0: the constant
        bw = []
        for i in range(1, r.num_stages + 1):
            rg = {j: {pairs.setdefault((k, expert_of[k]), len(pairs)): 100.0 / len(r.datasets[j])
                      for k in [(r.method, r.order, r.seed, i, j, d) for d in r.datasets[j]]} for j in r.modalities[:i]}
            forms.update({("rg", r.method, r.order, i, j): f for j, f in rg.items()})
            bw.append(_avg([rg[j] for j in r.modalities[: i - 1]]) if i > 1 else {0: 100.0})
            forms[("bw", r.method, r.order, i)] = bw[-1]
            forms[("fw", r.method, r.order, i)] = rg[r.modalities[i - 1]] if i > 1 else {0: 100.0}
        forms[("last_bw", r.method, r.order)], forms[("bw_mean", r.method, r.order)] = bw[-1], _avg(bw)
        by_method.setdefault((r.seed, r.method), []).append((bw[-1], _avg(bw)))
    for (s, m), per_order in by_method.items():  # per method: the mean over the orders the seed ran
        per_seed[s][1].update({(stat, m, None): _avg([f[x] for f in per_order]) for x, stat in enumerate(("last_bw", "bw_mean"))})
    keys = {k: q for q, k in enumerate(dict.fromkeys(k for _, forms in per_seed.values() for k in forms))}
    seeds = []  # one _Seed per seed, sorted (None first)
    for s in sorted(per_seed, key=lambda s: (s is not None, s or 0)):
        pairs, forms = per_seed[s]
        by_dataset: dict[tuple, list[tuple]] = {}
        for num, den in list(pairs)[1:]:
            by_dataset.setdefault(num[4:], []).extend([num, den])
        cols, blocks = {}, []
        for members in by_dataset.values():
            members = list(dict.fromkeys(members))
            ref = groups[members[1]]  # the expert of the first scored version
            for k in members:
                if groups[k].keys() != ref.keys():
                    raise DataError(f"{firsts[k].where}: {len(groups[k])} items, not the {len(ref)} of the expert at "
                                    f"{firsts[members[1]].where}; pairing needs the same items everywhere")
                cols[k] = len(cols)
            blocks.append(np.array([[groups[k][i].score for i in ref] for k in members], dtype=float))
        weights, present = np.zeros((len(pairs), len(keys))), np.zeros(len(keys))
        for key, form in forms.items():
            present[keys[key]] = 1.0
            weights[list(form), keys[key]] = list(form.values())
        num, den = (np.array([cols[pair[x]] for pair in list(pairs)[1:]], dtype=int) for x in (0, 1))
        seeds.append(_Seed(blocks, num, den, weights, present))
    return list(keys), seeds


@dataclass(frozen=True)
class Estimate:
    """A point estimate, its percentile interval, and ``n``, the replicates that define it; ``p``: for a
    difference, ``2 * min(P(d <= 0), P(d >= 0))`` over those n, floored at ``1/n`` (1/B when all count)."""

    point: float
    low: float
    high: float
    n: int
    p: float | None = None

    def as_json(self) -> dict:
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


@dataclass
class Replicates:
    """Every statistic's point estimate and its B bootstrap values (``draws``: B x statistics). Keys:
    ``("last_bw"|"bw_mean", method, order)`` (order None: the mean over the orders), ``("bw"|"fw", method,
    order, stage)``, ``("rg", method, order, stage, modality)``, and the names of the user statistics."""

    keys: list
    point: np.ndarray
    draws: np.ndarray
    level: float

    def estimate(self, key: Hashable, minus: Hashable | None = None) -> Estimate:
        """The estimate of ``key``, or of ``key - minus`` on the same replicates (then with its p-value)."""
        q = self.keys.index(key)  # ValueError: no such statistic
        point, d = self.point[q], self.draws[:, q]
        if minus is not None:
            point, d = point - self.point[self.keys.index(minus)], d - self.draws[:, self.keys.index(minus)]
        valid = d[np.isfinite(d)]
        low, high = np.percentile(valid, [50 * (1 - self.level), 50 * (1 + self.level)]) if valid.size else (math.nan,) * 2
        p = min(1.0, max(1.0 / valid.size, 2.0 * min(np.mean(valid <= 0), np.mean(valid >= 0)))) if valid.size else math.nan
        return Estimate(float(point), float(low), float(high), int(valid.size), None if minus is None else float(p))


def resample(items: Sequence[ItemScore], B: int = 2000, seed: int = 0, level: float = 0.95,
             statistics: Mapping[str, Callable[[dict], float]] | None = None) -> Replicates:
    """Point estimates and B paired replicates of every statistic (module docstring, steps 1-3), ``seed``
    seeding the numpy Generator. ``statistics``: more, ``{name: f(table)}``, f called on a dict ``{key: value}``
    of the point estimate and of each replicate (:func:`mera.eval.cl_metrics.table_matrix` reads it)."""
    if B < 1 or not 0 < level < 1:
        raise ValueError(f"need B >= 1 and a level in (0, 1); got B={B}, level={level}")
    keys, seeds = _design(items)
    rng = np.random.default_rng(seed)
    point = sum(_stats(s, np.concatenate([x.mean(axis=1) for x in s.blocks])[None, :])[0] for s in seeds)
    point = point / sum(s.present for s in seeds)
    sums, counts = np.zeros((B, len(keys))), np.zeros((B, len(keys)))
    drawn = rng.integers(0, len(seeds), size=(B, len(seeds)))  # step 1
    for si, s in enumerate(seeds):
        times = (drawn == si).sum(axis=1)
        counts += times[:, None] * s.present[None, :]
        slots = np.repeat(np.arange(B), times)  # one slot per draw of this seed, labelled by its replicate
        step = max(1, CHUNK // max(x.shape[1] for x in s.blocks))
        for start in range(0, slots.size, step):
            rows, means = slots[start: start + step], []
            for x in s.blocks:  # step 2: one row of counts per slot and dataset, for all its versions
                n = x.shape[1]
                idx = rng.integers(0, n, size=(rows.size, n)) + n * np.arange(rows.size)[:, None]
                means.append(np.bincount(idx.ravel(), minlength=rows.size * n).reshape(rows.size, n) @ x.T / n)
            np.add.at(sums, rows, _stats(s, np.concatenate(means, axis=1)))  # step 3
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = sums / counts
    draws[~np.isfinite(draws)] = np.nan
    base = len(keys)
    for name, f in (statistics or {}).items():
        point = np.append(point, f(dict(zip(keys[:base], point[:base]))))
        draws = np.column_stack([draws, [f(dict(zip(keys[:base], row[:base]))) for row in draws]])
        keys.append(name)
    return Replicates(keys, point, draws, level)


def bootstrap_cells(data: Sequence[ItemScore] | Replicates, B: int = 2000, seed: int = 0, level: float = 0.95,
                    statistics: Mapping[str, Callable[[dict], float]] | None = None) -> dict:
    """Point estimates and percentile intervals (:class:`Estimate`) of every cell: ``{"methods": {method:
    {"last_bw": E, "bw_mean": E (over its orders), "orders": {order: {"last_bw": E, "bw_mean": E, "bw_rg": [E
    per stage], "fw_rg": [E per stage]}}}}, "statistics": {name: E}, "replicates": the Replicates}`` (pass
    them to bootstrap_differences for the same draws). ``data``: items, or :func:`resample`'s Replicates."""
    rep = data if isinstance(data, Replicates) else resample(data, B, seed, level, statistics)
    methods: dict[str, dict] = {}
    for key in rep.keys:
        if isinstance(key, tuple) and key[0] == "last_bw" and key[2] is not None:
            m, o = key[1:]
            stages = range(1, 1 + max(k[3] for k in rep.keys if isinstance(k, tuple) and k[:3] == ("bw", m, o)))
            cell = methods.setdefault(m, {s: rep.estimate((s, m, None)) for s in ("last_bw", "bw_mean")})
            cell.setdefault("orders", {})[o] = {s: rep.estimate((s, m, o)) for s in ("last_bw", "bw_mean")} | {
                f"{s}_rg": [rep.estimate((s, m, o, i)) for i in stages] for s in ("bw", "fw")}
    return {"methods": methods, "statistics": {k: rep.estimate(k) for k in rep.keys if isinstance(k, str)},
            "replicates": rep}


def bootstrap_differences(pairs: Sequence[tuple[Hashable, Hashable]], data: Sequence[ItemScore] | Replicates,
                          statistic: str = "last_bw", order: str | None = None, B: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict[tuple, Estimate]:
    """``{(a, b): Estimate of a - b}`` on the same replicates, with its p-value (:class:`Estimate`).
    ``a``/``b``: a method (its ``statistic``, "last_bw" or "bw_mean", at ``order``; None: over the orders),
    the name of a user statistic, or a full key of :class:`Replicates`."""
    rep = data if isinstance(data, Replicates) else resample(data, B, seed, level)
    key = {x: x if isinstance(x, tuple) or x in rep.keys else (statistic, x, order) for pair in pairs for x in pair}
    return {(a, b): rep.estimate(key[a], minus=key[b]) for a, b in pairs}
