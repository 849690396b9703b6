"""The stage loop: experts, then for every order and method, stage after stage:

    train (align, instruct; the method's strategies) -> fold (its merge rule) -> after-stage
    hooks (realign) -> checkpoint -> evaluate every modality seen so far -> scores.csv, items.csv
    (every test item's score) and metrics.jsonl (the stage's training curve and scores:
    mera.runner.telemetry) -> DONE

Seeds are derived from (run seed, order, stage, phase), never from the method's name or from
what ran before: a resumed run trains exactly what an uninterrupted one would, and two methods
that train the same thing (the same parent model on the same data) train it identically, so
their difference is the methods' and not the seeds' (Fine-Tuning and Realign only have the same
LLM at every stage; so do Merge only and MERA; the copies of a ``mera sweep`` differ only in the
swept value).

Several processes (``torchrun`` / ``accelerate launch``, docs/distributed.md) run the same loop
together: every process trains every stage (each micro-batch split across them, see
mera.train.loop) and generates its share of the evaluation batches; only the main process
writes to the run directory (and clears unfinished stage folders), and a barrier follows each
write that the others then read. ``--workers N`` instead runs independent units (experts,
then the (order, method) chains of one family) in N processes (mera.runner.workers).

Several seeds (``seeds: [0, 1, 2]``) run everything once per seed, each in its own tree of the
run directory (mera.runner.rundir), with the tokenizer, encoders, data and feature cache
loaded once. A stage's step that another method already trained identically is reused from the
run's step store (mera.continual.sharing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from mera import dist
from mera.continual import checkpoint as ckpt
from mera.continual.assets import connector_states, load_assets, seed_for
from mera.continual.methods import build_method
from mera.continual.replay import ReplayMemory
from mera.continual.sharing import StepStore
from mera.continual.stages import load_stage
from mera.continual.training import make_context, train_stage, trainer_curve
from mera.errors import ConfigError, MeraError, WriteError
from mera.eval.bootstrap import format_item_rows, read_item_rows
from mera.eval.profile import Cost
from mera.io import UnitLock, write_text
from mera.runner import telemetry as tm
from mera.runner.names import slug
from mera.runner.rundir import RunDir, Unit, require_experts


class StageLoop:
    def __init__(self, cfg, out_dir: str | Path, *, config_dir: Path | None = None, resume: bool = False,
                 progress: bool = True, log=None, workers: int = 1, only: list[Unit] | None = None):
        self.cfg = cfg
        self.only = only  # --only: these units (mera.runner.launch.select_units) instead of the whole plan
        self.dir = RunDir(out_dir, cfg)
        self.out = self.dir.out
        self.config_dir = config_dir or Path.cwd()
        self.resume, self.progress, self.workers = resume, progress, max(1, int(workers))
        self.threads = cfg.threads  # torch threads of this process (a worker process: its share)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.main = dist.is_main()  # under a launcher only the main process writes (and logs)
        self.events = None  # a worker process's progress events go here (mera.runner.workers)
        self.defer_profile = False  # a worker: the final models are profiled after the pool (workers.py)
        self.assets = None
        self._items = None  # (stage folder, its per-item scores): written with the stage's scores
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() == "true":
            # accelerate's DeepSpeed wrapper needs loaders with a batch size (ours, split across the
            # processes, have a batch sampler), its ZeRO-2 buckets need every process to hold every
            # modality of a mixed batch (replay, realign), and its optimizer state has no "state"
            # for our step checkpoints: docs/distributed.md, "DeepSpeed ZeRO-2"
            raise ConfigError("DeepSpeed (accelerate launch with a deepspeed config) is not supported: mera would "
                              "train wrong or stop mid-run; use configs/accelerate/fsdp.yaml (sharded training) or "
                              "ddp.yaml (docs/distributed.md)")
        if dist.world_size() > 1:
            if self.workers > 1:
                raise ConfigError(f"--workers {self.workers} cannot be combined with a multi-process launch "
                                  f"({dist.world_size()} processes: torchrun / accelerate launch); use one or "
                                  "the other")
            if not self.main:
                self.log, self.progress = (lambda msg: None), False
            if cfg.threads:  # the processes of one machine share the config's CPU threads, as --workers does
                local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
                self.threads = max(1, cfg.threads // max(1, local))

    def setup(self) -> None:
        self.attach_assets(load_assets(self.cfg, self.config_dir, cache_dir=self.dir.features_dir,
                                       progress=self.progress, threads=self.threads))
        self.store = StepStore(self.dir.shared_dir if self.cfg.share else None, writer=self.main)
        # one tracker run per expert and per chain, opened where it starts (only the main process logs)
        self.trackers = tm.Trackers(self.cfg.train.report_to if self.main else [], self.out, self.cfg.name)
        tm.check_trackers(self.trackers.names)

    def attach_assets(self, assets) -> None:
        """Use ``assets`` (load_assets) for every seed: what the run's end (finish: the report's
        gallery, the quiet profiles) needs when no unit ran in this process (the launcher's end)."""
        self.base_assets = assets
        self._seeds: dict[int, tuple] = {}
        self.use_seed(self.cfg.run_seeds[0])

    def use_seed(self, seed: int) -> None:
        """Point the loop at one seed: its part of the run directory, the config and assets with
        that seed (everything loaded is shared), its replay memory."""
        if seed not in self._seeds:
            scfg = self.cfg.for_seed(seed)
            rd = self.dir.for_seed(seed)
            assets = dataclasses.replace(self.base_assets, cfg=scfg)
            memory = ReplayMemory(assets.sets, seed, record_dir=rd.root / "replay_memory" if self.main else None)
            self._seeds[seed] = (rd, assets, memory)
        self.rd, self.assets, self.memory = self._seeds[seed]
        self.seed = seed

    # ------------------------------------------------------------------ the run
    def run(self) -> Path:
        self.dir.prepare(self.resume, write=False)  # fail fast, before any set-up work
        if self.only is not None:  # a chain chosen by hand needs its expert done (or chosen too)
            require_experts(self.dir, self.only)
        dist.barrier()  # every process has looked at the directory before the main one writes to it
        with dist.main_process_first():  # the main process builds the zoo / toy data; the others read them
            self.setup()  # bad paths or files fail here, before the run directory exists
        if self.main:
            self.dir.prepare(self.resume)
        dist.barrier()
        t0 = time.perf_counter()
        units = self.dir.units() if self.only is None else list(self.only)
        if self.workers > 1:
            from mera.runner.workers import run_parallel

            # one pool: the experts first (every chain's stage 1 is an expert), then the chains
            run_parallel(self, [[u for u in units if u.kind == "expert"], [u for u in units if u.kind == "chain"]])
        else:
            for unit in units:
                self.run_unit(unit)
        if not self.main:
            dist.barrier()  # wait for the main process's scores, efficiency table and report
            return self.out / "scores.csv"
        try:
            return self.finish(t0)
        finally:
            dist.barrier()

    def run_unit(self, unit: Unit) -> None:
        self.use_seed(unit.seed if unit.seed is not None else self.cfg.run_seeds[0])
        self._event("unit", unit=unit.name(self.cfg))
        if unit.kind == "expert":
            self.run_expert(unit.modality)
        else:
            for k in unit.methods:
                self.run_chain(unit.order, self.cfg.methods[k])

    @property
    def tag(self) -> str:
        return f"seed {self.seed}: " if self.cfg.seeds else ""

    def _lock(self, what: str, key: str) -> UnitLock | None:
        """The lock of a unit of work (an expert, an (order, method) chain of a seed), or None when a
        live process holds it: then the unit is skipped, with one line naming the holder. Only the
        main process of a launch locks; the others follow its answer."""
        lock = UnitLock(self.dir.out / ".locks" / f"{key}.lock")
        holder = lock.acquire(what) if self.main else None
        if dist.world_size() > 1:
            holder = dist.broadcast_object(holder)
        if holder:
            self.log(f"[{what}] held by {holder}: skipped (run --resume once it is done)")
            return None
        return lock

    def _done(self, folder: Path, what: str) -> bool:
        """Whether ``folder`` is done and whole (its DONE's files as recorded); a damaged one is
        redone, with a warning line."""
        if not ckpt.is_done(folder):
            return False
        problem = ckpt.done_problem(folder)
        if problem is None:
            return True
        self.log(f"warning: [{what}] {problem}; the stage is done again")
        return False

    def run_expert(self, modality: str) -> None:
        what = f"{self.tag}expert {modality}"
        lock = self._lock(what, f"seed{self.seed}-expert-{modality}")
        if lock is None:
            return
        try:
            self._run_expert(modality, what)
        finally:
            self.trackers.close()
            lock.release()

    def _run_expert(self, modality: str, what: str) -> None:
        folder = self.rd.expert_dir(modality)
        if self._done(folder, what):
            self.log(f"[{what}] done, skipped")
            return
        self._start(folder)
        t0 = time.perf_counter()
        self.log(f"[{self.tag}expert {modality}] training")
        self._event("stage", what=f"expert {modality}")
        sid = tm.StageId(self.seed, None, "expert", 1, modality)
        self.trackers.open(folder)
        a = self.assets
        model = a.base_model()
        ctx = self._context(model, "-", "expert", 1, modality, [modality], seed_for(self.seed, "expert", modality),
                            None, folder, sid)
        pre = self.cfg.model.branches[modality].pretrained_connector
        with Cost(dist.world_size()) as cost:
            if pre:  # an already trained branch (e.g. an imported LLaVA): nothing to train
                a.add_branch(model, modality, a.pretrained_connector_state(model, modality, pre))
                ctx.log["pretrained_connector"] = pre
                folds, trained = [], None
            else:
                folds, trained = train_stage(a, ctx, [], build_method_finetune())
        if self.main:
            ckpt.save_stage(folder, parent=None, folds=folds, trained=trained, connectors=connector_states(model),
                            info={"kind": "expert", "modality": modality, "log": ctx.log, "cost": cost.info})
        rows = self.evaluate(model, [modality], folder)
        self._finish_stage(folder, [{"method": "expert", "order": "", "stage": "", **r} for r in rows],
                           sid=sid, curve=trainer_curve(ctx) or [])
        self.log(f"[{self.tag}expert {modality}] {time.perf_counter() - t0:.1f}s")

    def run_chain(self, order_name: str, method) -> None:
        what = f"{self.tag}{order_name} / {method.name}"
        lock = self._lock(what, f"seed{self.seed}-{order_name}-{slug(method.name)}")
        if lock is None:
            return
        try:
            expert = self.rd.chain(order_name, method)[0].expert_folder
            if not ckpt.is_done(expert):  # another process holds it (or it failed): nothing to start from
                self.log(f"[{what}] the expert {expert.name} is not done: skipped (run --resume once it is)")
                return
            self._run_chain(order_name, method, what)
        finally:
            self.trackers.close()
            lock.release()

    def _run_chain(self, order_name: str, method, what: str) -> None:
        strategies, merge = build_method(method)
        model, prev, redo = None, None, False
        steps_before = 0  # the chain's train lines in its stages done before (the trackers' step axis)
        for st in self.rd.chain(order_name, method):
            i, m, folder = st.index, st.modality, st.folder
            sid = tm.StageId(self.seed, order_name, method.name, i, m)
            if not redo and self._done(folder, f"{what} stage {i}"):
                model, prev = None, folder  # loaded lazily if a later stage needs training
                if self.trackers.names:
                    steps_before += sum(line["type"] == "train" for line in tm.read_lines(folder / tm.FILE))
                continue
            if not redo:
                self.trackers.open(folder.parent, steps_before)
            redo = True  # a stage redone: every later one is built on it again
            if model is None and i > 1:
                model = load_stage(self.assets, prev)
            self._start(folder)
            t0 = time.perf_counter()
            self.log(f"[{self.tag}{order_name} / {method.name}] stage {i} {m}")
            self._event("stage", what=f"{method.name}: stage {i} {m}")
            curve = []
            if st.is_expert:  # a copy of the expert of the order's first modality (rundir.expert_modality)
                expert = st.expert_folder
                if self.main:
                    ckpt.save_stage(folder, parent=expert, folds=[], connectors=ckpt.load_connectors(expert),
                                    info={"kind": "stage", "stage": 1, "modality": m, "same_as": "expert"})
                dist.barrier()  # written by the main process, loaded by every one
                rows = self.rd.read_rows(expert / "scores.csv")
                # the expert's items (none in an expert done before items.csv existed)
                self._items = (folder, read_item_rows(expert / "items.csv")) if (expert / "items.csv").is_file() else None
                model = load_stage(self.assets, folder) if not st.is_final else None
            else:
                ctx = self._context(model, order_name, method.name, i, m, list(st.seen),
                                    seed_for(self.seed, order_name, i), prev, folder, sid)
                with Cost(dist.world_size()) as cost:
                    folds, trained = train_stage(self.assets, ctx, strategies, merge, self.store)
                    for s in strategies:
                        s.after_stage(ctx)
                info = dict(cost.info)
                reused = [ctx.log[k] for k in ("shared", "align_shared") if k in ctx.log]
                if reused:  # a reused step (or step A) costs the time it took to train where it was trained
                    info["measured_seconds"] = info.get("seconds", 0.0)
                    info["seconds"] = round(info.get("seconds", 0.0) + sum(r["seconds"] for r in reused), 2)
                if "shared" in ctx.log:
                    self.log(f"    step shared with {ctx.log['shared']['trained_by']} (not trained again)")
                if self.main:
                    ckpt.save_stage(folder, parent=prev, folds=folds, trained=trained,
                                    connectors=connector_states(model), tensors=ctx.tensors,
                                    info={"kind": "stage", "stage": i, "modality": m, "log": ctx.log,
                                          "cost": info,
                                          **({"llm_modules": ctx.llm_modules} if ctx.llm_modules else {})})
                rows = self.evaluate(model, list(st.seen), folder)
                curve = trainer_curve(ctx) or []
                if (self.main and st.is_final and order_name == next(iter(self.cfg.orders))
                        and self.seed == self.cfg.run_seeds[0] and not self.defer_profile):
                    self.profile(model, list(st.seen), folder)
            self._finish_stage(folder, [{**r, "method": method.name, "order": order_name, "stage": i} for r in rows],
                               assemble=True, sid=sid, curve=curve)
            self.log(f"    stage {i} done in {time.perf_counter() - t0:.1f}s")
            prev = folder

    # ------------------------------------------------------------------ helpers
    def _context(self, model, order, method, stage, modality, seen, seed, parent, folder, sid: tm.StageId):
        return make_context(self.assets, model, order=order, method=method, stage=stage, modality=modality,
                            seen=seen, seed=seed, parent=parent, steps_dir=self.rd.steps_dir(folder),
                            progress=self.progress, memory=self.memory,
                            listener=tm.step_listener(self.trackers, self.events, sid))

    def _event(self, kind: str, **info) -> None:
        """A progress event for the main process's display (worker processes only)."""
        if self.events is not None:
            self.events({"kind": kind, **info})

    def _start(self, folder: Path) -> None:
        if self.main:
            self.dir.clean(folder)

    def _finish_stage(self, folder: Path, rows: list[dict], assemble: bool = False, *, sid: tm.StageId,
                      curve: list[dict]) -> None:
        """Rows and the stage's metrics.jsonl (its curve's train lines, then its eval lines), then DONE
        (the stage is complete only now, its metrics recorded with it), then the step checkpoints go."""
        if self.main:
            self.dir.write_rows(folder / "scores.csv", rows)
            self._write_items(folder, rows)
            evals = tm.eval_lines(sid, rows)
            tm.write_lines(folder / tm.FILE, tm.train_lines(sid, curve) + evals)
            ckpt.mark_done(folder)
            for line in evals:
                self.trackers.log(line)
            shutil.rmtree(self.rd.steps_dir(folder), ignore_errors=True)
            if assemble:
                self.dir.assemble_scores()
        dist.barrier()  # the stage is DONE (and loadable) for every process

    def _write_items(self, folder: Path, rows: list[dict]) -> None:
        """The stage's ``items.csv`` (mera.eval.bootstrap's columns, as its scores.csv: no seed, an expert's
        order and stage empty): the items of its evaluation (or of the expert it copies), before DONE."""
        got, self._items = self._items, None
        if got is None or got[0] != folder or not rows:
            return
        keys = {k: rows[0][k] for k in ("method", "order", "stage")}
        write_text(folder / "items.csv", format_item_rows({**it, **keys, "seed": ""} for it in got[1]))

    def evaluate(self, model, modalities: list[str], folder: Path) -> list[dict]:
        """Evaluate every modality in ``modalities`` on the sets of ``eval.split`` (test, or val: the
        validation sets, whose rows get the dataset name suffixed ``-val`` so that they can never be
        taken for test scores); predictions go to ``folder/predictions.jsonl``."""
        from mera.eval.evaluate import evaluate_modality

        a, rows, preds, items = self.assets, [], [], []
        split = self.cfg.eval.split
        for k, m in enumerate(modalities, 1):
            self._event("step", phase=f"eval {m}", step=k, total=len(modalities))
            captions, qa = a.sets[m].evaluation(split)
            names = a.set_names[m] if split == "test" else tuple(f"{n}-{split}" for n in a.set_names[m])
            r, ex = evaluate_modality(model, a.tokenizer, m, captions, qa, a.provider,
                                      a.judge, self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens,
                                      names, self.progress)
            rows += r
            preds += [{"modality": m, **p} for p in ex["predictions"]]
            items += ex.get("items", [])
            shown = ", ".join(f"{x['task']} {x['score']:.3g}" for x in r)
            if ex.get("qa_unparseable"):
                shown += f" ({ex['qa_unparseable']} QA judgements unparseable, counted as wrong)"
            self.log(f"    eval {m:6s} {shown}   e.g. {ex.get('caption', [('', '')])[0][1]!r}")
        if self.main:
            write_text(folder / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
        self._items = (folder, items)  # written with the scores (_finish_stage)
        return rows

    def profile(self, model, modalities: list[str], folder: Path) -> dict:
        """Inference cost of a final model right after its stage: ``profile.json``
        (mera.runner.profile.profile_model)."""
        from mera.runner.profile import profile_model

        return profile_model(self.assets, model, modalities, folder, self.out, self.log)

    def profile_finals(self) -> None:
        """The final models not profiled yet (with --workers: all of them), measured here after all
        training (mera.runner.profile.profile_finals)."""
        from mera.runner.profile import profile_finals

        profile_finals(self)

    def finish(self, t0: float) -> Path:
        """scores.csv, efficiency.json and the report (the main process)."""
        from mera.eval.report import write_report

        scores = self.dir.assemble_scores()
        self.dir.assemble_metrics()
        self.log(f"all stages done in {time.perf_counter() - t0:.1f}s; scores: {scores}")
        t1 = time.perf_counter()  # the run's end has costs of its own: the log says what they were
        self.profile_finals()
        eff = self.dir.efficiency()
        write_text(self.out / "efficiency.json", json.dumps(eff, indent=2) + "\n")
        try:
            from mera.runner.gallery import gallery_or_reason

            gallery = gallery_or_reason(self.out, self.cfg, self.base_assets.sets)
            write_report([str(scores)], str(self.out), efficiency=eff, gallery=gallery)
            self.log(f"final models profiled and report written in {time.perf_counter() - t1:.1f}s")
        except WriteError:  # a full disk is the run's error (one line, exit 2), not a missing report
            raise
        except MeraError as e:  # e.g. an expert scored 0: relative gains are undefined; scores stay
            self.log(f"no report: {e}")
        return scores


def build_method_finetune():
    """The merge rule of an expert: its delta folded whole."""
    from mera.config import registry

    return registry.build("merge", "finetune")


def run(cfg, out_dir, **kwargs) -> Path:
    """Run (or resume) ``cfg`` into ``out_dir``; returns the path of scores.csv."""
    return StageLoop(cfg, out_dir, **kwargs).run()
