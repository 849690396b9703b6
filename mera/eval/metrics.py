"""Continual-learning metrics over a long-format scores table (pure Python + numpy, no torch).

The table (``scores.csv``) has the columns
``method,order,seed,stage,modality,dataset,task,score``; files of the first release, without
the ``seed`` column, are read too (every row then has seed None: one seed). ``task`` is
``caption`` (score = CIDEr x100) or ``qa`` (accuracy in [0, 1]). Rows whose method is
``expert`` have an empty stage: they are the upper bounds ``S_sup`` (one model trained on one
modality). ``seed`` is the training seed of the run (an integer; empty = None). Each seed
trains its own experts, so a row's upper bound is the expert of the same seed.

Definitions (METHOD.md section 5), all reported in percent:

- Relative Gain of modality j at stage i over its K datasets:
  ``RG_j^i = 100 * (1/K) * sum_k S_{j,k}^i / S_sup_{j,k}``.
- Backward RG at stage i >= 2: the mean of ``RG_j^i`` over the old modalities (those
  first seen before stage i); 100 at stage 1 by definition.
- Forward RG at stage i >= 2: ``RG_i^i`` of the modality introduced at stage i; 100 at
  stage 1 by definition.
- Summary of one (method, order, seed): mean and sample std (ddof=1) of the backward RGs
  of all m stages, stage 1's 100 included. Headline: last stage's backward RG averaged
  over the orders present (then over the seeds, when there are several).

Statistics over several seeds (t-intervals, paired differences, the paper's orderings) are
in :mod:`mera.eval.seeds`.

Every malformed input raises :class:`mera.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from mera.errors import DataError

# RunMetrics and the functions over several runs live in mera.eval.runs (below mera.eval.seeds,
# which reads them too); they are also imported from here, under the same names
from mera.eval.runs import (
    RunMetrics,
    _one_seed_summary,
    mean_std,
    seed_order,
    seeds_of,
)
from mera.eval.runs import last_stage_bw as last_stage_bw
from mera.eval.runs import last_stage_bw_by_seed as last_stage_bw_by_seed
from mera.eval.runs import methods_and_orders as methods_and_orders
from mera.eval.seeds import over_seed_object

COLUMNS = ("method", "order", "seed", "stage", "modality", "dataset", "task", "score")
LEGACY_COLUMNS = tuple(c for c in COLUMNS if c != "seed")  # the first release's header: no seed column
EXPERT = "expert"
TASKS = ("caption", "qa")


@dataclass(frozen=True)
class ScoreRow:
    """One row of a scores table, with the file and line it came from (for error messages)."""

    method: str
    order: str
    stage: int | None  # None for expert rows
    modality: str
    dataset: str
    task: str
    score: float
    source: str = "<memory>"
    line: int = 0
    seed: int | None = None  # None: the table has no seed (one seed)

    @property
    def is_expert(self) -> bool:
        return self.method == EXPERT

    @property
    def where(self) -> str:
        return f"{self.source}, line {self.line}"

    @property
    def key(self) -> tuple:
        return (self.method, self.order, self.seed, self.stage, self.modality, self.dataset)

    def as_csv(self) -> str:
        """The row as a line of the :data:`COLUMNS` header (an empty cell for a None seed or stage)."""
        stage = "" if self.stage is None else str(self.stage)
        seed = "" if self.seed is None else str(self.seed)
        return ",".join([self.method, self.order, seed, stage, self.modality, self.dataset, self.task, f"{self.score:g}"])


# ----------------------------------------------------------------------------- raw rows
# The one definition of a scores row on disk: the run directory writes its rows with
# ``format_rows`` and reads them back with ``read_rows``; everything else parses them with
# ``read_scores`` (checked, typed).


def format_rows(rows: Iterable[Mapping]) -> str:
    """CSV text (header first) of ``rows``, mappings with the keys of :data:`COLUMNS` (missing: empty,
    so a row without ``seed`` writes an empty seed cell)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    return buf.getvalue()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a scores file as plain string mappings (no checks: the run directory's own files)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- reading


def _parse_score(text: str, where: str, task: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: score {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: score {text!r} is not a finite number")
    if value < 0:
        raise DataError(f"{where}: score {text!r} is negative")
    if task == "qa" and value > 1:
        raise DataError(f"{where}: qa score {text!r} is above 1 (QA accuracy is a fraction in [0, 1], not a percent)")
    return value


def _parse_seed(text: str, where: str, cells: Sequence[str]) -> int | None:
    """A seed cell: empty -> None, else a non-negative integer written in decimal digits."""
    if not text:
        return None
    if not text.isdecimal() or not text.isascii():
        raise DataError(f"{where}: seed {text!r} is not a non-negative integer ({','.join(cells)})")
    return int(text)


def parse_scores(lines: Iterable[str], source: str = "<memory>") -> list[ScoreRow]:
    """Parse CSV text (an iterable of lines, header first) into rows; ``source`` names it in errors.

    The header has the :data:`COLUMNS` (any order), or the same without ``seed`` (the first
    release's files: every row gets seed None). An empty seed cell is None too.
    """
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{source}: empty file; expected the header {','.join(COLUMNS)}") from None
    except csv.Error as e:
        raise DataError(f"{source}, line 1: {e}") from None
    names = [h.strip() for h in header]
    columns = COLUMNS if "seed" in names else LEGACY_COLUMNS
    missing = [c for c in columns if c not in names]
    extra = [h for h in names if h not in columns]
    dup = sorted({h for h in names if names.count(h) > 1})
    if missing or extra or dup:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unexpected " + ", ".join(repr(h) for h in extra))
        if dup:
            parts.append("repeated " + ", ".join(dup))
        also = f" (or {','.join(COLUMNS)}, with the training seed)" if columns is LEGACY_COLUMNS else ""
        raise DataError(
            f"{source}, line 1: wrong header ({'; '.join(parts)}); expected exactly {','.join(columns)}{also}"
        )
    index = {name: names.index(name) for name in columns}
    rows: list[ScoreRow] = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{source}, line {reader.line_num}: {e}") from None
        line = reader.line_num
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line
        where = f"{source}, line {line}"
        if len(cells) != len(names):
            raise DataError(f"{where}: {len(cells)} fields, expected {len(names)} ({','.join(cells)})")
        get = {name: cells[i].strip() for name, i in index.items()}
        for name in ("method", "order", "modality", "dataset", "task", "score"):
            if not get[name]:
                raise DataError(f"{where}: empty {name} ({','.join(cells)})")
        if get["task"] not in TASKS:
            raise DataError(f"{where}: task {get['task']!r} is not one of {', '.join(TASKS)}")
        if get["method"] == EXPERT:
            if get["stage"]:
                raise DataError(f"{where}: expert rows have an empty stage, got {get['stage']!r}")
            stage = None
        else:
            try:
                stage = int(get["stage"])
            except ValueError:
                raise DataError(
                    f"{where}: stage {get['stage']!r} is not a positive integer ({','.join(cells)})"
                ) from None
            if stage < 1:
                raise DataError(f"{where}: stage {stage} is not a positive integer (stages count from 1)")
        score = _parse_score(get["score"], where, get["task"])
        seed = _parse_seed(get.get("seed", ""), where, cells)
        rows.append(
            ScoreRow(get["method"], get["order"], stage, get["modality"], get["dataset"], get["task"], score, source, line,
                     seed)
        )
    return rows


def read_scores(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ScoreRow]:
    """Read one or several scores files and concatenate their rows (file order kept)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no scores file given")
    rows: list[ScoreRow] = []
    for path in paths:
        path = os.fspath(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows.extend(parse_scores(f, source=path))
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a directory, expected a scores CSV file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
        except csv.Error as e:  # e.g. a field beyond the csv module's size limit
            raise DataError(f"{path}: not a scores CSV file ({e})") from None
    return rows


# ----------------------------------------------------------------------------- checks


def check_unique(rows: Iterable[ScoreRow]) -> None:
    """Raise DataError on two rows with the same (method, order, seed, stage, modality, dataset)."""
    seen: dict[tuple, ScoreRow] = {}
    for row in rows:
        first = seen.setdefault(row.key, row)
        if first is not row:
            seed = "" if row.seed is None else f" (seed {row.seed})"
            raise DataError(
                f"{row.where}: duplicated row ({row.as_csv()}); the same method, order, stage, "
                f"modality and dataset{seed} is already at {first.where}"
            )


def expert_table(rows: Iterable[ScoreRow]) -> dict[tuple[str, str, str, int | None], ScoreRow]:
    """Expert rows keyed by (order, modality, dataset, seed); raises DataError on a zero expert score."""
    table: dict[tuple[str, str, str, int | None], ScoreRow] = {}
    for row in rows:
        if row.is_expert:
            if row.score == 0:
                raise DataError(
                    f"{row.where}: expert score is 0 ({row.as_csv()}); it is the denominator of the relative gain"
                )
            table.setdefault((row.order, row.modality, row.dataset, row.seed), row)
    return table


def find_expert(experts: Mapping[tuple[str, str, str, int | None], ScoreRow], row: ScoreRow) -> ScoreRow:
    """The upper bound ``S_sup`` for ``row``: the expert of the same order, modality, dataset and seed
    (each seed trains its own experts; a row without seed matches the experts without seed).

    Without one for that order, fall back to the same seed's experts of other orders if they
    all agree on the score. A seeded row for whose seed there is no expert of that modality
    and dataset at all uses the experts without seed (experts shared by every seed) the same
    way. Otherwise raise DataError.
    """
    seed = row.seed
    if seed is not None and not any(m == row.modality and d == row.dataset and s == seed for (_, m, d, s) in experts):
        seed = None  # no expert of this seed for the data set: the experts shared by every seed, if any
    own = experts.get((row.order, row.modality, row.dataset, seed))
    if own is None:
        others = [e for (_, m, d, s), e in experts.items() if m == row.modality and d == row.dataset and s == seed]
        if not others and row.seed is None:
            raise DataError(
                f"{row.where}: no expert row for modality {row.modality!r}, dataset {row.dataset!r} "
                f"(needed by {row.as_csv()}); add a row like "
                f"'expert,{row.order},,{row.modality},{row.dataset},{row.task},<score>'"
            )
        if not others:
            raise DataError(
                f"{row.where}: no expert row for modality {row.modality!r}, dataset {row.dataset!r}, "
                f"seed {row.seed} (needed by {row.as_csv()}); add a row like "
                f"'expert,{row.order},{row.seed},,{row.modality},{row.dataset},{row.task},<score>'"
            )
        if any(e.score != others[0].score for e in others):
            listed = "; ".join(f"{e.where}: {e.as_csv()}" for e in others)
            of_seed = "" if seed is None else f" of seed {seed}"
            raise DataError(
                f"{row.where}: no expert row of order {row.order!r} for modality {row.modality!r}, "
                f"dataset {row.dataset!r}, and the experts{of_seed} of other orders disagree ({listed})"
            )
        own = others[0]
    if own.task != row.task:
        raise DataError(
            f"{row.where}: task {row.task!r} differs from the expert's task {own.task!r} at {own.where}"
        )
    return own


def modality_schedule(run_rows: Sequence[ScoreRow]) -> list[str]:
    """The modality introduced at each stage of one (method, order, seed) run, in stage order.

    The modality new at stage i is the one present at stage i and absent at stage i-1.
    Raises DataError when a stage number is missing, a modality present at stage i-1 is
    absent at stage i, a stage introduces zero or several modalities, or a modality's
    datasets change between stages.
    """
    if not run_rows:
        return []
    by_stage: dict[int, list[ScoreRow]] = {}
    for row in run_rows:
        by_stage.setdefault(row.stage, []).append(row)
    first = run_rows[0]
    name = f"method {first.method!r}, order {first.order!r}" + ("" if first.seed is None else f", seed {first.seed}")
    last = max(by_stage)
    for stage in range(1, last + 1):
        if stage not in by_stage:
            later = by_stage[min(s for s in by_stage if s > stage)][0]
            raise DataError(
                f"{later.where}: {name} has no rows for stage {stage} "
                f"(stages present: {', '.join(str(s) for s in sorted(by_stage))})"
            )
    schedule: list[str] = []
    datasets: dict[str, set[str]] = {}
    for stage in range(1, last + 1):
        rows = by_stage[stage]
        present: dict[str, set[str]] = {}
        for row in rows:
            present.setdefault(row.modality, set()).add(row.dataset)
        for m in schedule:
            if m not in present:
                raise DataError(
                    f"{rows[0].where}: {name}, stage {stage} has no rows for modality {m!r}, "
                    f"which is present at stage {stage - 1}; every stage must score all modalities seen so far"
                )
            if present[m] != datasets[m]:
                raise DataError(
                    f"{rows[0].where}: {name}, stage {stage}, modality {m!r} has datasets "
                    f"{', '.join(sorted(present[m]))} but {', '.join(sorted(datasets[m]))} earlier"
                )
        new = [m for m in present if m not in datasets]
        if len(new) != 1:
            what = "no new modality" if not new else f"{len(new)} new modalities ({', '.join(new)})"
            raise DataError(
                f"{rows[0].where}: {name}, stage {stage} introduces {what}; "
                f"each stage must add exactly one modality"
            )
        schedule.append(new[0])
        datasets[new[0]] = present[new[0]]
    return schedule


# ----------------------------------------------------------------------------- formulas


def relative_gain(scores: Sequence[float], uppers: Sequence[float]) -> float:
    """``RG = 100 * (1/K) * sum_k scores[k] / uppers[k]``: percent of the experts' scores.

    Denominator: each dataset's expert score ``S_sup_k`` (must be non-zero), then K.
    """
    if len(scores) != len(uppers) or not scores:
        raise ValueError("relative_gain needs as many expert scores as scores, and at least one")
    return 100.0 * sum(s / u for s, u in zip(scores, uppers)) / len(scores)


def backward_rg(rg_at_stage: Mapping[str, float], old_modalities: Sequence[str]) -> float:
    """Backward RG at one stage: ``(1/(i-1)) * sum_{j old} RG_j^i`` (percent).

    Denominator: the number of old modalities (those first seen at an earlier stage).
    With no old modality (stage 1) it is 100 by definition.
    """
    if not old_modalities:
        return 100.0
    return sum(rg_at_stage[m] for m in old_modalities) / len(old_modalities)


def forward_rg(rg_at_stage: Mapping[str, float], new_modality: str, stage: int) -> float:
    """Forward RG at stage i: ``RG_i^i`` of the modality new at stage i (percent); 100 at stage 1.

    No averaging: its denominator is only the experts' scores inside ``RG_i^i``.
    """
    if stage == 1:
        return 100.0
    return rg_at_stage[new_modality]


# ----------------------------------------------------------------------------- tables


def _runs(rows: Sequence[ScoreRow]) -> dict[tuple[str, str, int | None], list[ScoreRow]]:
    """Non-expert rows grouped by (method, order, seed): methods in order of first appearance, then
    orders (order of first appearance), then seeds (by value, None first)."""
    method_rank: dict[str, int] = {}
    order_rank: dict[str, int] = {}
    groups: dict[tuple[str, str, int | None], list[ScoreRow]] = {}
    for row in rows:
        order_rank.setdefault(row.order, len(order_rank))
        if row.is_expert:
            continue
        method_rank.setdefault(row.method, len(method_rank))
        groups.setdefault((row.method, row.order, row.seed), []).append(row)
    keys = sorted(groups, key=lambda k: (method_rank[k[0]], order_rank[k[1]], seed_order(k[2])))
    return {k: groups[k] for k in keys}


def run_metrics(rows: Sequence[ScoreRow]) -> list[RunMetrics]:
    """All metrics of every (method, order, seed) in ``rows`` (methods in order of first appearance,
    then orders, then seeds).

    Validates the whole table first (duplicates, experts, stage schedule).
    """
    check_unique(rows)
    experts = expert_table(rows)
    out: list[RunMetrics] = []
    for (method, order, seed), run_rows in _runs(rows).items():
        schedule = modality_schedule(run_rows)
        by_stage: dict[int, dict[str, list[tuple[float, float]]]] = {}
        for row in run_rows:
            upper = find_expert(experts, row).score
            by_stage.setdefault(row.stage, {}).setdefault(row.modality, []).append((row.score, upper))
        rg: list[dict[str, float]] = []
        bw: list[float] = []
        fw: list[float] = []
        for stage, new in enumerate(schedule, start=1):
            stage_rg = {
                m: relative_gain([s for s, _ in by_stage[stage][m]], [u for _, u in by_stage[stage][m]])
                for m in schedule[:stage]
            }
            rg.append(stage_rg)
            bw.append(backward_rg(stage_rg, schedule[: stage - 1]))
            fw.append(forward_rg(stage_rg, new, stage))
        mean, std = mean_std(bw)
        datasets: dict[str, list[str]] = {m: [] for m in schedule}
        for row in run_rows:
            if row.dataset not in datasets[row.modality]:
                datasets[row.modality].append(row.dataset)
        out.append(RunMetrics(method, order, schedule, rg, bw, fw, mean, std, run_rows[0].source, datasets, seed))
    return out


def relative_gains(rows: Sequence[ScoreRow]) -> dict[tuple, list[dict[str, float]]]:
    """``{(method, order): [ {modality: RG_j^i in percent} for each stage i ]}``; with several
    seeds the keys are ``(method, order, seed)``.

    ``RG_j^i = 100 * (1/K) * sum_k S_{j,k}^i / S_sup_{j,k}``; denominator: the expert
    score of each dataset, then K, the modality's number of datasets.
    """
    runs = run_metrics(rows)
    if len(seeds_of(runs)) > 1:
        return {(r.method, r.order, r.seed): r.rg for r in runs}
    return {(r.method, r.order): r.rg for r in runs}


def summary_object(runs: Sequence[RunMetrics], level: float = 0.95) -> dict:
    """The JSON-ready summary of ``runs`` (NaN written as null); see :func:`summarize`.

    With several seeds the over-seed part of :func:`mera.eval.seeds.over_seed_object` is added
    (``seeds``, ``per_seed``, ``over_seeds``, ``paired``, ``orderings``; ``level``: the
    confidence level of its intervals) and ``last_stage_bw`` is the mean over the seeds.
    """
    obj = _one_seed_summary(runs)
    if len(seeds_of(runs)) > 1:
        obj.update(over_seed_object(runs, level))
    return obj


def summarize(rows: Sequence[ScoreRow], level: float = 0.95) -> dict:
    """The metrics of a whole scores table as one JSON-ready object (percent throughout)::

        {"summary": [{"method", "order", "seed", "bw_rg": [per stage], "fw_rg": [per stage],
                      "bw_mean", "bw_std", "rg": {modality: [per stage or null]}}],
         "last_stage_bw": {method: last-stage backward RG averaged over its orders (then seeds)}}

    ``bw_mean``/``bw_std``: mean and sample std (ddof=1) over the m stages' backward RGs,
    stage 1's 100 included (denominators m and m-1). One entry per (method, order, seed);
    ``seed`` is null for a table without seeds. With two seeds or more the object also has
    ``seeds``, ``per_seed``, ``over_seeds``, ``paired`` and ``orderings``
    (:func:`mera.eval.seeds.over_seed_object`).
    """
    return summary_object(run_metrics(rows), level)
