"""The run directory: the single source of truth of a run (every step can be resumed from it).

    <out>/config.yaml                     the resolved config
    <out>/experts/<modality>/             expert checkpoint + scores.csv + DONE
    <out>/<order>/<method>/stage_<i>_<modality>/   stage checkpoint + scores.csv + DONE
    <out>/.steps/...                      step checkpoints of unfinished phases
    <out>/.shared/<key>/                  training steps shared between methods (mera.continual.sharing)
    <out>/.features/                      the encoders' feature cache
    <out>/scores.csv                      every finished stage's rows, in plan order
    <out>/items.csv                       every finished stage's per-item scores, in the same order
    <out>/metrics.jsonl                   every finished stage's training curves and scores, in plan
                                          order (each stage folder has its own: mera.runner.telemetry)
    <out>/trackers/                       the event files of train.report_to's local trackers (tensorboard)
    <out>/report.md, metrics.json, efficiency.json, figures/

With several seeds (``seeds: [0, 1, 2]``) the experts and the orders live in ``<out>/seed_<s>/``
(one tree per seed, as above); config, feature cache, shared steps, scores and report stay at
the top, and every score row carries its seed.

:class:`RunDir` knows these paths, the plan (per seed: experts, then order x method x stage, walked
by :meth:`RunDir.stages` as :class:`StageRef`; the expert rule is :func:`expert_modality`), the
units of work, which are done, and reads and writes score rows (in the one format of
:mod:`mera.eval.metrics`). It trains nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import yaml

from mera.config import dump_config
from mera.continual import checkpoint as ckpt
from mera.errors import ConfigError, MeraError
from mera.eval.bootstrap import format_item_rows, read_item_rows
from mera.eval.metrics import format_rows, read_rows
from mera.io import write_text
from mera.runner.names import flat_diff, slug

if TYPE_CHECKING:
    from mera.continual.methods import MethodConfig


def expert_modality(order: Sequence[str]) -> str:
    """The expert rule: stage 1 of every chain is the expert of its order's first modality, trained
    once per seed (``experts/<modality>``) and copied into the chain's first stage folder, never
    trained there again (:attr:`StageRef.is_expert`)."""
    return order[0]


@dataclass(frozen=True)
class StageRef:
    """One stage of the plan: stage ``index`` (1-based) of the chain of ``method`` (a MethodConfig)
    on the order named ``order``, in the tree of ``seed``; ``modality`` is the one it adds,
    ``seen`` the modalities of stages 1..index, ``folder`` its stage folder. ``is_expert``: the
    stage is the expert of the order's first modality (:func:`expert_modality`), a copy of
    ``expert_folder``; ``is_final``: the chain's last stage, whose model is the method's final one."""

    seed: int
    order: str
    method: MethodConfig
    index: int
    modality: str
    folder: Path
    seen: tuple[str, ...]
    is_expert: bool
    is_final: bool
    expert_folder: Path | None = None

    @property
    def predictions_folder(self) -> Path:
        """Where the stage's predictions were written: the expert's own folder for the expert
        stage (a copy, not evaluated again), else the stage folder."""
        return self.expert_folder if self.is_expert else self.folder


@dataclass(frozen=True)
class Unit:
    """A unit of work of one seed: an expert, or the (order, method) chains of one family (methods
    whose stages train the same steps, run one after the other so that the later ones reuse the
    first one's training: see :func:`families`)."""

    kind: str  # "expert" | "chain"
    modality: str | None = None
    order: str | None = None
    methods: tuple[int, ...] = ()  # indices into cfg.methods
    seed: int | None = None  # None: the config's seed

    def name(self, cfg) -> str:
        tag = f"seed {self.seed}: " if cfg.seeds else ""
        if self.kind == "expert":
            return f"{tag}expert {self.modality}"
        return f"{tag}{self.order} / {' + '.join(cfg.methods[k].name for k in self.methods)}"


def start_expert(cfg, unit: Unit) -> Unit:
    """The expert unit a chain unit starts from (its stage 1: :func:`expert_modality`), of its seed."""
    return Unit("expert", modality=expert_modality(cfg.orders[unit.order]), seed=unit.seed)


def families(cfg) -> list[tuple[int, ...]]:
    """The methods grouped by what their stages train (indices into ``cfg.methods``, config order).

    A strategy that acts only after a stage (``only_after_stage``: realign) does not change what the
    stage trains from the same parent: Fine-Tuning, Merge only, MERA and Realign only are one family
    (their steps coincide, or at least step A and stage 2: mera.continual.sharing), EWC and EWC +
    Realign another, Replay and Replay + Realign a third (stage 2 and the next step A coincide, then
    the replayed data passes through realigned connectors). The grouping is only a schedule, run one
    chain after another so that the later ones find the steps of the first; whether a step is
    shared is decided by its content key when it runs."""
    from mera.continual.methods import resolve

    groups: dict[str, list[int]] = {}
    for k, meth in enumerate(cfg.methods):
        trained = []
        for item in meth.strategies:
            entry = resolve(item["name"])
            if entry.kind == "strategy" and not getattr(entry.obj, "only_after_stage", False):
                trained.append(item)
        groups.setdefault(json.dumps(trained, sort_keys=True, default=str), []).append(k)
    return [tuple(v) for v in groups.values()]


class RunDir:
    def __init__(self, out: str | Path, cfg, seed: int | None = None):
        self.out = Path(out)
        self.cfg = cfg
        self.seed = cfg.run_seeds[0] if seed is None else seed
        # where this seed's experts and orders live: the run directory itself with a single seed
        self.root = self.out / f"seed_{self.seed}" if cfg.seeds else self.out

    def for_seed(self, seed: int) -> "RunDir":
        return RunDir(self.out, self.cfg, seed)

    def seed_dirs(self) -> list["RunDir"]:
        return [self.for_seed(s) for s in self.cfg.run_seeds]

    # ------------------------------------------------------------------ paths
    def _inside(self, path: Path) -> Path:
        """``path``, asserted inside the run directory (names that become paths are checked where they
        enter; this is the last guard before anything is written or deleted there)."""
        if not path.resolve().is_relative_to(self.out.resolve()) or path.resolve() == self.out.resolve():
            raise ConfigError(f"{path}: not inside the run directory {self.out}; a name in the config is a path")
        return path

    def expert_dir(self, modality: str) -> Path:
        return self._inside(self.root / "experts" / modality)

    def stage_dir(self, order: str, method, i: int, modality: str) -> Path:
        """``method``: a MethodConfig or its name."""
        name = method if isinstance(method, str) else method.name
        return self._inside(self.root / order / slug(name) / f"stage_{i}_{modality}")

    def steps_dir(self, folder: Path) -> Path:
        """Where a stage's step checkpoints live until it is DONE (outside the stage folder, which
        an unfinished stage clears)."""
        return self.out / ".steps" / folder.relative_to(self.out)

    @property
    def features_dir(self) -> Path:
        return self.out / ".features"

    @property
    def shared_dir(self) -> Path:
        return self.out / ".shared"

    # ------------------------------------------------------------------ plan
    def experts(self) -> list[str]:
        out = []
        for order in self.cfg.orders.values():
            out += [m for m in order if m not in out]
        return out

    def _method(self, method) -> MethodConfig:
        """``method`` (a MethodConfig or its name) as the run's MethodConfig."""
        name = method if isinstance(method, str) else method.name
        for meth in self.cfg.methods:
            if meth.name == name:
                return meth
        raise ConfigError(f"no method {name!r} in the run (methods: {', '.join(m.name for m in self.cfg.methods)})")

    def chain(self, order: str, method) -> list[StageRef]:
        """The stages of the chain of ``method`` (a MethodConfig or its name) on the order named
        ``order``, in this seed's tree, stage 1 first."""
        if order not in self.cfg.orders:
            raise ConfigError(f"no order {order!r} in the run (orders: {', '.join(self.cfg.orders)})")
        meth, modalities = self._method(method), self.cfg.orders[order]
        expert = self.expert_dir(expert_modality(modalities))
        out = []
        for i, m in enumerate(modalities, 1):
            first = i == 1  # the expert rule's stage (expert_modality)
            out.append(StageRef(self.seed, order, meth, i, m, self.stage_dir(order, meth, i, m), tuple(modalities[:i]),
                                is_expert=first, is_final=i == len(modalities), expert_folder=expert if first else None))
        return out

    def final_stage(self, order: str, method) -> StageRef:
        """The last stage of a chain (its model is the method's final one on that order)."""
        return self.chain(order, method)[-1]

    def stages(self, seeds: Iterable[int] | None = None, orders: Iterable[str] | None = None,
               methods: Iterable | None = None) -> Iterator[StageRef]:
        """Every stage of the plan, in plan order: seed by seed, then order, method (config order)
        and stage. ``seeds``, ``orders``, ``methods`` (MethodConfigs or names), when given, keep only
        those (still in plan order)."""
        keep_seeds = None if seeds is None else set(seeds)
        keep_orders = None if orders is None else set(orders)
        keep_methods = None if methods is None else {self._method(m).name for m in methods}
        for name in keep_orders or ():
            if name not in self.cfg.orders:
                raise ConfigError(f"no order {name!r} in the run (orders: {', '.join(self.cfg.orders)})")
        for seed in keep_seeds or ():
            if seed not in self.cfg.run_seeds:
                raise ConfigError(f"no seed {seed!r} in the run (seeds: {', '.join(map(str, self.cfg.run_seeds))})")
        for seed in self.cfg.run_seeds:
            if keep_seeds is not None and seed not in keep_seeds:
                continue
            rd = self.for_seed(seed)
            for order in self.cfg.orders:
                if keep_orders is not None and order not in keep_orders:
                    continue
                for meth in self.cfg.methods:
                    if keep_methods is None or meth.name in keep_methods:
                        yield from rd.chain(order, meth)

    def units(self) -> list[Unit]:
        """Every seed's experts, then every seed's chains (one unit per seed, order and family; the
        costliest first, so that a pool of workers ends on small units, together)."""
        seeds = self.cfg.run_seeds
        chains = [Unit("chain", order=o, methods=f, seed=s) for s in seeds for o in self.cfg.orders
                  for f in families(self.cfg)]
        from mera.continual.methods import resolve

        def cost(u: Unit) -> tuple:  # a guess: more chains, or a strategy with its own LLM modules, cost more
            own = any(resolve(it["name"]).info.get("llm") == "own" for k in u.methods for it in self.cfg.methods[k].strategies)
            return (-len(u.methods), -int(own))

        return ([Unit("expert", modality=m, seed=s) for s in seeds for m in self.experts()]
                + sorted(chains, key=cost))  # stable: config order among equals

    def plan(self) -> dict:
        """What the run would train: the experts and every (order, method, stage), per seed."""
        stages = [{"order": st.order, "method": st.method.name, "stage": st.index, "modality": st.modality,
                   **({"seed": st.seed} if self.cfg.seeds else {}), "dir": str(st.folder.relative_to(self.out)),
                   "what": "= expert of " + st.modality if st.is_expert else "+".join(st.method.names)}
                  for st in self.stages()]
        return {"experts": self.experts(), "seeds": self.cfg.run_seeds, "stages": stages}

    def unit_done(self, unit: Unit) -> bool:
        """Every stage of the unit is done and whole (its files as DONE recorded them)."""
        rd = self.for_seed(unit.seed) if unit.seed is not None else self

        def ok(folder):
            return ckpt.is_done(folder) and ckpt.done_problem(folder) is None

        if unit.kind == "expert":
            return ok(rd.expert_dir(unit.modality))
        return all(ok(st.folder) for k in unit.methods for st in rd.chain(unit.order, self.cfg.methods[k]))

    # ------------------------------------------------------------------ set-up
    def prepare(self, resume: bool, write: bool = True) -> None:
        """Refuse an existing run without --resume, or a resume with another config; write config.yaml
        (under the run's lock: of two fresh runs started at once on one directory, one is refused)."""
        from mera.io import UnitLock

        lock = UnitLock(self.out / ".locks" / "config.lock") if write else None
        if lock is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            holder = lock.acquire("writing the run's config")
            if holder:
                raise MeraError(f"{self.out}: {holder} is setting up this run directory; wait, then pass --resume")
        try:
            self._prepare(resume, write)
        finally:
            if lock is not None:
                lock.release()

    def _prepare(self, resume: bool, write: bool) -> None:
        text = dump_config(self.cfg)
        cfg_file = self.out / "config.yaml"
        if cfg_file.exists():
            if not resume:
                raise MeraError(f"{self.out}: a run directory is already there; pass --resume to continue it "
                                "or choose another --out")
            diff = flat_diff(self._saved_config(cfg_file), yaml.safe_load(text))
            # where the curves are reported (train.report_to) and where jobs run (launcher) change
            # nothing computed: a resume may change them
            diff = [k for k in diff if k != "train.report_to" and k != "launcher" and not k.startswith("launcher.")]
            if diff:
                raise ConfigError(f"{cfg_file}: the resumed config differs from the run's in: {', '.join(diff)}")
        elif write:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(cfg_file, text)

    def _saved_config(self, cfg_file: Path) -> dict:
        """The run's config.yaml, resolved by the current schema (a run written by an earlier release
        compares equal when it means the same)."""
        from mera.config import validate
        from mera.config.loading import read_yaml

        try:
            data = read_yaml(cfg_file)  # the config loader's own checks (no aliases, no duplicate keys)
        except ConfigError as e:
            raise ConfigError(f"{cfg_file}: the run's saved config is unreadable ({str(e).split(': ', 1)[-1]})") from None
        try:
            return yaml.safe_load(dump_config(validate(data, type(self.cfg), str(cfg_file))))
        except ConfigError:
            return data

    @staticmethod
    def clean(folder: Path) -> None:
        """Remove an unfinished stage folder (no DONE): it is redone from scratch."""
        if folder.exists():
            shutil.rmtree(folder)

    # ------------------------------------------------------------------ scores
    @staticmethod
    def write_rows(path: Path, rows: list[dict]) -> None:
        write_text(path, format_rows(rows))

    @staticmethod
    def read_rows(path: Path) -> list[dict]:
        return read_rows(path)

    def assemble_scores(self) -> Path:
        """Rebuild ``scores.csv`` from the finished stages, in plan order (seed by seed; so resume
        gives the same file). Every row carries its seed. ``items.csv`` (every test item's score,
        mera.eval.bootstrap) is gathered the same way from the stages that have one (a stage done
        before per-item scores were recorded has none; a run with none has no items.csv)."""
        rows, items = [], []
        for rd in self.seed_dirs():
            seed = {"seed": rd.seed}
            for oname, order in self.cfg.orders.items():
                for m in order:
                    f = rd.expert_dir(m)
                    if ckpt.is_done(f):
                        rows += [{**r, "order": oname, **seed} for r in read_rows(f / "scores.csv")]
                        if (f / "items.csv").is_file():
                            items += [{**r, "order": oname, **seed} for r in read_item_rows(f / "items.csv")]
            for st in self.stages(seeds=[rd.seed]):
                if ckpt.is_done(st.folder):
                    rows += [{**r, **seed} for r in read_rows(st.folder / "scores.csv")]
                    if (st.folder / "items.csv").is_file():
                        items += [{**r, **seed} for r in read_item_rows(st.folder / "items.csv")]
        path = self.out / "scores.csv"
        self.write_rows(path, rows)
        if items:
            write_text(self.out / "items.csv", format_item_rows(items))
        else:
            (self.out / "items.csv").unlink(missing_ok=True)
        return path

    def assemble_metrics(self) -> Path:
        """Rebuild ``metrics.jsonl`` from the finished stages' own files (mera.runner.telemetry), in
        plan order: seed by seed, the experts (each once), then every order, method and stage, like
        scores.csv (so a resume gives the same file). A stage done before the file existed gives
        its eval lines, read from its scores.csv, and no train lines."""
        from mera.runner.telemetry import FILE, StageId, dumps, eval_lines

        parts = []

        def add(folder: Path, sid: StageId) -> None:
            if not ckpt.is_done(folder):
                return
            if (folder / FILE).is_file():
                parts.append((folder / FILE).read_text(encoding="utf-8"))
            elif (folder / "scores.csv").is_file():
                parts.append(dumps(eval_lines(sid, read_rows(folder / "scores.csv"))))

        for rd in self.seed_dirs():
            for m in self.experts():
                add(rd.expert_dir(m), StageId(rd.seed, None, "expert", 1, m))
            for st in self.stages(seeds=[rd.seed]):
                add(st.folder, StageId(st.seed, st.order, st.method.name, st.index, st.modality))
        path = self.out / FILE
        write_text(path, "".join(parts))
        return path

    # ------------------------------------------------------------------ costs
    def efficiency(self) -> dict:
        """Per method: training time and peak memory (stages 2..m, averaged over orders and seeds:
        stage 1 is the shared expert; a step reused from another method counts with the time it
        took to train, mera.continual.sharing) and the inference profile of its final model
        (first order, first seed: the median of its rounds, their min and max, and whether it was
        measured with nothing else working in the run directory; mera.runner.profile)."""
        out = {}
        first = next(iter(self.cfg.orders))
        for meth in self.cfg.methods:
            totals: dict[tuple[int, str], float] = {}  # (seed, order) -> seconds, in plan order
            peaks, ok = [], True
            for st in self.stages(methods=[meth]):
                total = totals.setdefault((st.seed, st.order), 0.0)
                if st.is_expert:  # trained once for every method: not this method's cost
                    continue
                if not ckpt.is_done(st.folder):
                    ok = False
                    continue
                c = ckpt.read_manifest(st.folder).get("cost") or {}
                totals[(st.seed, st.order)] = total + c.get("seconds", 0.0)
                if "peak_mib" in c:
                    peaks.append(c["peak_mib"])
            if not ok:
                continue
            secs = list(totals.values())
            entry = {"train_seconds": sum(secs) / len(secs), "train_peak_mib": max(peaks) if peaks else None}
            prof_file = self.seed_dirs()[0].final_stage(first, meth).folder / "profile.json"
            if prof_file.is_file():
                try:
                    prof = json.loads(prof_file.read_text(encoding="utf-8"))
                    entry.update(efficiency_fields(prof))
                except (OSError, UnicodeDecodeError, RecursionError, ValueError, KeyError, TypeError) as e:
                    # a measurement, not a result: the table goes without it (mera profile measures it again)
                    print(f"warning: {prof_file}: unreadable inference profile ({type(e).__name__}); the efficiency "
                          "table leaves it out (mera profile RUN_DIR measures it again)", flush=True)
            out[meth.name] = entry
        return out


def efficiency_fields(prof: dict) -> dict:
    """The efficiency table's inference entries of a profile (profile.json): the median latency,
    its spread and quietness where the profile recorded them (a profile of an earlier release has
    one measurement and no record of quietness: those entries are left out)."""
    out = {"infer_ms_per_token": float(prof["ms_per_token"]), "infer_peak_mib": float(prof["peak_mib"]),
           "llm_params_m": float(prof["llm_params_m"]), "memory_kind": str(prof["memory_kind"])}
    if "ms_per_token_min" in prof and "ms_per_token_max" in prof:
        out.update({"infer_ms_per_token_min": float(prof["ms_per_token_min"]),
                    "infer_ms_per_token_max": float(prof["ms_per_token_max"]), "infer_rounds": int(prof["rounds"])})
    if "quiet" in prof:
        out["infer_quiet"] = None if prof["quiet"] is None else bool(prof["quiet"])
    return out


def require_experts(rd: RunDir, units: list[Unit]) -> None:
    """Raise when a chosen chain's expert (:func:`start_expert`) is neither done nor chosen itself,
    naming every one missing."""
    cfg, chosen = rd.cfg, set(units)
    missing = []
    for u in units:
        e = start_expert(cfg, u) if u.kind == "chain" else None
        if e is not None and e not in chosen and not rd.unit_done(e):
            folder = str(rd.for_seed(e.seed).expert_dir(e.modality).relative_to(rd.out))
            if folder not in missing:
                missing.append(folder)
    if missing:
        raise MeraError(f"{rd.out}: the chains chosen with --only start from experts that are not done: "
                        f"{', '.join(missing)}; run them first (--only experts, or --only experts/MODALITY)")
