"""``mera sweep``: choose a method's hyper-parameter on the validation split, never on the test split.

    mera sweep configs/toy/demo.yaml --method EWC --param ewc.lam --values 0.1,1,10

builds ONE run config from the config: only the method ``EWC``, copied once per value with the
parameter set (the copies are named ``EWC [ewc.lam=0.1]``, ...), and ``eval.split: val`` (every
stage is evaluated on the validation sets; the test sets are never read). It runs it (the
experts are trained once, shared by every value: that is why it is one run), reads its
``scores.csv`` with :mod:`mera.eval.metrics` and writes ``sweep.md`` and ``sweep.json``: per
value, each order's last-stage backward RG and mean ± std backward RG, and the averages over
the orders; then the value chosen by the metric.

A key is ``<plug-in>.<parameter>``: the item of the method's ``strategies`` list whose name is
the plug-in (``ewc.lam``, ``realign.ratio``, ``replay.ratio``, ``ema.beta``). Several keys make
a grid (the cartesian product of their values). A key starting with ``train.`` (e.g.
``train.realign.lr_connector``) is a config field, and ``train`` is run-wide: such keys are
swept with one run per combination of their values (each in its own folder under the sweep's,
with its own experts), the plug-in keys as copies inside each run, and the tables merged.

Choice: the highest metric wins (``last_bw``: the last-stage backward RG averaged over the
orders, the paper's headline; ``mean_bw``: the mean backward RG over the stages, averaged over
the orders). Ties (within 1e-9) go to the smaller value, compared key by key in the order the
keys were given (a key whose values are not all numbers compares by the position of its values
in ``--values``).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mera.config import validate
from mera.config.loading import apply_override, parse_override
from mera.errors import ConfigError
from mera.io import write_text
from mera.runner.names import slug
from mera.runner.run_config import RunConfig

METRICS = {
    "last_bw": "last-stage backward RG, averaged over the orders",
    "mean_bw": "mean backward RG over the stages, averaged over the orders",
}
TIE = 1e-9
RULE = ("the highest {metric} ({what}) wins; ties (within 1e-9) go to the smaller value, compared key by key "
        "in --param order (a key whose values are not all numbers: the one given first in --values)")


@dataclass
class SweepParam:
    """One ``--param KEY --values V1,V2,...``; ``values`` are the texts as given (read as YAML)."""

    key: str
    values: list[str]

    @property
    def is_train(self) -> bool:
        return self.key.startswith("train.")


@dataclass
class Copy:
    """One point of the grid: its values (as given and as validated) and the method copy's name."""

    text: dict[str, str]
    name: str
    values: dict[str, object] = field(default_factory=dict)


@dataclass
class SweepRun:
    """One run of the sweep: its folder, its config and the method copies it holds."""

    dir: Path
    cfg: RunConfig
    train: dict[str, str]
    copies: list[Copy]


@dataclass
class SweepPlan:
    method: str
    params: list[SweepParam]
    out: Path
    runs: list[SweepRun]
    source: str = ""

    @property
    def copies(self) -> list[tuple[SweepRun, Copy]]:
        return [(r, c) for r in self.runs for c in r.copies]


# ----------------------------------------------------------------------------- the plan


def parse_values(key: str, text: str) -> list[str]:
    """``"0.1, 1,10"`` -> ``["0.1", "1", "10"]``; ConfigError on an empty list, item or a repeat."""
    items = [v.strip() for v in str(text).split(",")]
    if not any(items):
        raise ConfigError(f"--values for {key}: no values given (expected a comma-separated list, e.g. 0.1,1,10)")
    if not all(items):
        raise ConfigError(f"--values for {key}: an empty value in {text!r} (expected a comma-separated list, "
                          "e.g. 0.1,1,10)")
    dup = sorted({v for v in items if items.count(v) > 1})
    if dup:
        raise ConfigError(f"--values for {key}: {', '.join(dup)} given twice")
    return items


def _yaml(key: str, text: str):
    return parse_override(f"{key}={text}")[1]


def _check_key(key: str, method: dict) -> tuple[str, str]:
    """(plug-in, parameter) of a plug-in key, checked against the method's plug-ins."""
    from mera.continual.methods import resolve

    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--param {key!r}: expected <plug-in>.<parameter> (e.g. ewc.lam, realign.ratio) "
                          "or a config key starting with train. (e.g. train.realign.lr_connector)")
    plugin, param = parts
    names = [x["name"] for x in method["strategies"]]
    try:
        entry = resolve(plugin)
    except ValueError as e:
        raise ConfigError(f"--param {key}: {e}") from None
    if entry.name not in names:
        raise ConfigError(f"--param {key}: method {method['name']!r} has no plug-in {entry.name!r} "
                          f"(its plug-ins: {', '.join(names)})")
    fields = list(entry.params.model_fields) if entry.params is not None else []
    if param not in fields:
        import difflib

        close = difflib.get_close_matches(param, fields, n=1)
        known = f"its parameters: {', '.join(fields)}" if fields else "it has no parameters"
        raise ConfigError(f"--param {key}: plug-in {entry.name!r} has no parameter {param!r} "
                          f"({f'did you mean {close[0]!r}? ' if close else ''}{known})")
    return entry.name, param


def _folder_name(train: dict[str, str]) -> str:
    text = "__".join(f"{k}={v}" for k, v in train.items())
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "run"


def _read_back(cfg: RunConfig, method_index: int, key: str, plugin: str | None, param: str | None):
    if plugin is not None:
        item = next(x for x in cfg.methods[method_index].strategies if x["name"] == plugin)
        return item[param]
    node = cfg.model_dump(mode="json")
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def plan_sweep(cfg: RunConfig, method: str, params: list[SweepParam], out: str | Path,
               source: str = "config") -> SweepPlan:
    """The sweep's runs: ``cfg`` reduced to ``method``, copied over the grid of the plug-in keys, with
    ``eval.split=val``; one run per combination of the ``train.*`` keys. Every check is made here,
    before anything trains: ConfigError (one line) on an unknown method, plug-in or parameter, an
    empty value list or a value the config rejects."""
    names = [m.name for m in cfg.methods]
    if method not in names:
        import difflib

        close = difflib.get_close_matches(method, names, n=1)
        raise ConfigError(f"--method: {source} has no method {method!r} "
                          f"({f'did you mean {close[0]!r}? ' if close else ''}its methods: {', '.join(names)})")
    if not params:
        raise ConfigError("give at least one --param KEY --values V1,V2,...")
    keys = [p.key for p in params]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"--param {', '.join(dup)} given twice; give each key once with all its values")
    base = cfg.model_dump(mode="json")
    meth = base["methods"][names.index(method)]
    where: dict[str, tuple[str | None, str | None]] = {}
    for p in params:
        if not p.values:
            raise ConfigError(f"--values for {p.key}: no values given (expected a comma-separated list, e.g. 0.1,1,10)")
        where[p.key] = (None, None) if p.is_train else _check_key(p.key, meth)
    train_params = [p for p in params if p.is_train]
    plug_params = [p for p in params if not p.is_train]
    out = Path(out)
    runs: list[SweepRun] = []
    for train_combo in itertools.product(*[[(p.key, v) for v in p.values] for p in train_params]):
        train = dict(train_combo)
        data = copy.deepcopy(base)
        data["eval"]["split"] = "val"
        for k, v in train.items():
            apply_override(data, k.split("."), _yaml(k, v), f"{k}={v}")
        copies, methods = [], []
        for plug_combo in itertools.product(*[[(p.key, v) for v in p.values] for p in plug_params]):
            text = {**dict(plug_combo), **train}
            text = {k: text[k] for k in keys}  # in --param order
            m = copy.deepcopy(meth)
            for k, v in plug_combo:
                plugin, param = where[k]
                next(x for x in m["strategies"] if x["name"] == plugin)[param] = _yaml(k, v)
            m["name"] = f"{method} [{', '.join(f'{k}={v}' for k, v in text.items())}]"
            methods.append(m)
            copies.append(Copy(text, m["name"]))
        data["methods"] = methods
        rcfg = validate(data, RunConfig, f"{source} (sweep of {method!r})")
        for i, c in enumerate(copies):
            c.values = {k: _read_back(rcfg, i, k, *where[k]) for k in keys}
        slugs = [slug(c.name) for c in copies]
        clash = sorted({s for s in slugs if slugs.count(s) > 1})
        if clash:
            raise ConfigError(f"--values: two values give the same method folder {clash[0]!r}; "
                              "write the values differently")
        runs.append(SweepRun(out / _folder_name(train) if train_params else out, rcfg, train, copies))
    plan = SweepPlan(method, params, out, runs, source)
    for p in params:  # "0.1" and "0.10" are the same value once read
        seen: dict[str, str] = {}
        for _, c in plan.copies:
            typed = json.dumps(c.values[p.key], default=str)
            if seen.setdefault(typed, c.text[p.key]) != c.text[p.key]:
                raise ConfigError(f"--values for {p.key}: {seen[typed]} and {c.text[p.key]} are the same value")
    return plan


# ----------------------------------------------------------------------------- running


def run_sweep(plan: SweepPlan, *, config_dir: Path, resume: bool = False, workers: int = 1,
              progress: bool = False, metric: str = "last_bw", log=None) -> dict:
    """Run every run of the plan (resumable), then analyse them and write ``sweep.md`` / ``sweep.json``
    in ``plan.out``; returns the analysis (see :func:`analyse`)."""
    from mera import dist
    from mera.runner.loop import StageLoop
    from mera.runner.rundir import RunDir

    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for r in plan.runs:  # fail fast: an existing run without --resume, or a resume with another config
        RunDir(r.dir, r.cfg).prepare(resume, write=False)
    for r in plan.runs:
        StageLoop(r.cfg, r.dir, config_dir=config_dir, resume=resume, progress=progress, log=log,
                  workers=workers).run()
    result = analyse(plan, metric)
    if dist.is_main():
        write_sweep(plan.out, result)
    return result


# ----------------------------------------------------------------------------- the table


def _sort_key(plan: SweepPlan):
    """Tie-break order: the smaller value first, key by key in --param order."""
    numeric = {}
    for p in plan.params:
        vals = [c.values[p.key] for _, c in plan.copies]
        numeric[p.key] = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in vals)

    def key(c: Copy):
        return tuple(c.values[p.key] if numeric[p.key] else p.values.index(c.text[p.key]) for p in plan.params)

    return key


def analyse(plan: SweepPlan, metric: str = "last_bw") -> dict:
    """The sweep's table from each run's ``scores.csv`` (read with :mod:`mera.eval.metrics`) and its
    choice. Every copy must have finished every order."""
    from mera.errors import DataError
    from mera.eval.metrics import read_scores, run_metrics
    from mera.eval.seeds import mean_runs

    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    rows, orders = [], list(plan.runs[0].cfg.orders)
    for r in plan.runs:
        scores = r.dir / "scores.csv"
        metrics: dict[str, dict] = {}
        runs = run_metrics(read_scores(scores))
        unfinished = {(rm.method, rm.order) for rm in runs if rm.num_stages != len(r.cfg.orders.get(rm.order, []))}
        for rm in mean_runs(runs):  # with several seeds: every number the mean over the seeds
            if (rm.method, rm.order) not in unfinished:
                metrics.setdefault(rm.method, {})[rm.order] = rm
        for c in r.copies:
            per = metrics.get(c.name, {})
            missing = [o for o in orders if o not in per or per[o].num_stages != len(r.cfg.orders[o])]
            if missing:
                raise DataError(f"{scores}: method {c.name!r} has not finished order {missing[0]!r}; "
                                "rerun the sweep with --resume")
            by_order = {o: {"last_bw": per[o].bw_rg[-1], "bw_mean": per[o].bw_mean,
                            "bw_std": None if math.isnan(per[o].bw_std) else per[o].bw_std} for o in orders}
            rows.append({
                "values": c.values, "text": c.text, "method": c.name,
                "run": str(r.dir.relative_to(plan.out)) if r.dir != plan.out else ".",
                "orders": by_order,
                "last_bw": sum(v["last_bw"] for v in by_order.values()) / len(orders),
                "mean_bw": sum(v["bw_mean"] for v in by_order.values()) / len(orders),
            })
    best = max(r[metric] for r in rows)
    sort_key = _sort_key(plan)
    by_name = {c.name: c for _, c in plan.copies}
    tied = [r for r in rows if best - r[metric] <= TIE * max(1.0, abs(best))]
    chosen = min(tied, key=lambda r: sort_key(by_name[r["method"]]))
    return {
        "method": plan.method,
        "config": plan.source,
        "split": "val",
        "metric": metric,
        "metric_means": METRICS[metric],
        "rule": RULE.format(metric=metric, what=METRICS[metric]),
        "params": [p.key for p in plan.params],
        "orders": orders,
        "runs": [{"dir": str(r.dir.relative_to(plan.out)) if r.dir != plan.out else ".", "train": r.train}
                 for r in plan.runs],
        "table": rows,
        "chosen": {"values": chosen["values"], "text": chosen["text"], "method": chosen["method"],
                   metric: chosen[metric], "tied": [r["method"] for r in tied]},
    }


def _pct(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def format_markdown(result: dict) -> str:
    """``sweep.md``: the table (one row per value) and the choice."""
    keys, orders, metric = result["params"], result["orders"], result["metric"]
    head = keys + [f"{o}: last BW" for o in orders] + [f"{o}: mean ± std BW" for o in orders] \
        + ["avg last BW", "avg mean BW"]
    lines = [f"# Sweep of {result['method']} on the validation split", "",
             f"Config: {result['config']}. Every value's copy of the method was trained through every order and "
             "evaluated on the validation sets (eval.split=val; the test sets were not read). Backward relative "
             "gain (BW) in percent of each modality's expert, per order: the last stage's, and the mean ± std over "
             "the stages.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chosen = result["chosen"]["method"]
    for r in result["table"]:
        cells = [r["text"][k] for k in keys]
        cells += [_pct(r["orders"][o]["last_bw"]) for o in orders]
        cells += [_pct(r["orders"][o]["bw_mean"]) + ("" if r["orders"][o]["bw_std"] is None
                                                      else f" ± {r['orders'][o]['bw_std']:.2f}") for o in orders]
        cells += [_pct(r["last_bw"]), _pct(r["mean_bw"])]
        if r["method"] == chosen:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    c = result["chosen"]
    what = ", ".join(f"{k}={v}" for k, v in c["text"].items())
    tie = f" (tied with {', '.join(t for t in c['tied'] if t != c['method'])})" if len(c["tied"]) > 1 else ""
    lines += ["", f"Chosen: **{what}** ({metric} = {c[metric]:.2f}){tie}.", "",
              f"Rule: {result['rule']}.", "",
              "The copies train with the same seeds (a stage's seed comes from the run seed, the order and the "
              "stage, not the method's name): they differ only by the value. One seed.", ""]
    if len(result["runs"]) > 1:
        lines += ["Keys under train. are run-wide: one run per combination of their values, each with its own "
                  "experts (" + ", ".join(r["dir"] for r in result["runs"]) + "); the tables are merged here.", ""]
    return "\n".join(lines)


def write_sweep(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(out / "sweep.md", format_markdown(result))
