"""The stage loop: experts, then for every order and method, stage after stage:
align -> instruct -> merge coefficient -> after-stage hooks (realign) -> checkpoint -> evaluate.

Run directory (the single source of truth; every step can be resumed from it):

    <out>/config.yaml                     the resolved config
    <out>/experts/<modality>/             expert checkpoints + scores.csv + DONE
    <out>/<order>/<method>/stage_<i>_<modality>/   stage checkpoints + scores.csv + DONE
    <out>/scores.csv                      all rows, rebuilt in a fixed order after each stage
    <out>/report.md, metrics.json, figures/

Seeds are derived from (run seed, what is being trained), never from what ran before,
so a resumed run trains exactly what an uninterrupted one would.

Several processes (``torchrun`` / ``accelerate launch``, docs/distributed.md) run the same
stage loop together: every process trains every stage (each micro-batch split across them,
see mera.train.loop) and generates its share of the evaluation batches; only the main process
writes to the run directory (and clears unfinished stage folders), and a barrier follows each
write that the others then read (a finished stage, before its DONE is checked or it is loaded).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml

from mera import dist
from mera.config import dump_config, validate
from mera.continual import checkpoint as ckpt
from mera.continual.strategies import StageContext, Strategy, build_strategy
from mera.continual.strategies.finetune import FineTune
from mera.data.format import Sample
from mera.data.pipeline import FeatureProvider, ItemDataset, load_sets
from mera.errors import CheckpointError, ConfigError, MeraError
from mera.io import write_text
from mera.model.collate import MultimodalCollator
from mera.run_config import MethodConfig, PhaseConfig, RunConfig
from mera.train.loop import PhaseResult, StepCheckpoint, train_phase
from mera.train.lora import attach_lora, detach_lora, extract_lora, fold_lora, load_lora

SCORE_COLUMNS = ["method", "order", "stage", "modality", "dataset", "task", "score"]


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return s or "method"


def seed_for(base: int, *parts) -> int:
    h = hashlib.sha256(json.dumps([base, *map(str, parts)]).encode()).hexdigest()
    return int(h[:8], 16)


def flat_diff(a, b, prefix="") -> list[str]:
    """Keys whose values differ between two nested dicts (dotted paths)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += flat_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class Runner:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, config_dir: Path | None = None,
                 resume: bool = False, progress: bool = True, log=None, workers: int = 1):
        self.cfg = cfg
        self.workers = max(1, int(workers))
        self.threads = cfg.threads  # torch threads of this process (a worker process: its share)
        self.out = Path(out_dir)
        self.config_dir = config_dir or Path.cwd()
        self.resume = resume
        self.progress = progress
        self.verbose = log is None  # worker processes print their log lines only when this one does
        self.log = log or (lambda msg: print(msg, flush=True))
        self.sets = {}
        self.encoders = {}
        self.device = dist.device()  # under a launcher: this process's own GPU
        self.main = dist.is_main()  # under a launcher only the main process writes (and logs)
        if dist.world_size() > 1:
            if self.workers > 1:
                raise ConfigError(f"--workers {self.workers} cannot be combined with a multi-process launch "
                                  f"({dist.world_size()} processes: torchrun / accelerate launch); use one or "
                                  "the other")
            if not self.main:
                self.log = lambda msg: None
                self.progress = False
            if cfg.threads:  # the processes of one machine share the config's CPU threads, as --workers does
                local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
                self.threads = max(1, cfg.threads // max(1, local))

    # ------------------------------------------------------------------ plan
    def plan(self) -> dict:
        """What the run would train: the experts and every (order, method, stage)."""
        experts = []
        for order in self.cfg.orders.values():
            for m in order:
                if m not in experts:
                    experts.append(m)
        stages = []
        for oname, order in self.cfg.orders.items():
            for meth in self.cfg.methods:
                for i, m in enumerate(order, 1):
                    stages.append({"order": oname, "method": meth.name, "stage": i, "modality": m,
                                   "dir": str(self.stage_dir(oname, meth, i, m).relative_to(self.out)),
                                   "what": "= expert of " + m if i == 1 else "+".join(meth.strategies)})
        return {"experts": experts, "stages": stages}

    def stage_dir(self, order: str, method: MethodConfig, i: int, modality: str) -> Path:
        return self.out / order / slug(method.name) / f"stage_{i}_{modality}"

    def expert_dir(self, modality: str) -> Path:
        return self.out / "experts" / modality

    def steps_dir(self, folder: Path) -> Path:
        """Where a stage's step checkpoints live until it is DONE (outside the stage folder, which
        an unfinished stage clears)."""
        return self.out / ".steps" / folder.relative_to(self.out)

    # ------------------------------------------------------------------ set-up
    def prepare_dir(self, write: bool = True) -> None:
        """Refuse an existing run without --resume, or a resume with another config; write config.yaml."""
        text = dump_config(self.cfg)
        cfg_file = self.out / "config.yaml"
        if cfg_file.exists():
            if not self.resume:
                raise MeraError(f"{self.out}: a run directory is already there; pass --resume to continue it "
                                "or choose another --out")
            old = yaml.safe_load(cfg_file.read_text())
            diff = flat_diff(old, yaml.safe_load(text))
            if diff:
                raise ConfigError(f"{cfg_file}: the resumed config differs from the run's in: {', '.join(diff)}")
        elif write:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(cfg_file, text)

    def resolve(self, path: str) -> str:
        if path.startswith("zoo:"):
            key = path[4:]
            paths = self.zoo_paths
            if key in paths and isinstance(paths[key], (str, Path)):
                return str(paths[key])
            if key.startswith("encoders/") and key.split("/", 1)[1] in paths.get("encoders", {}):
                return str(paths["encoders"][key.split("/", 1)[1]])
            raise ConfigError(f"unknown zoo path {path!r}; known: zoo:llm, zoo:tokenizer, zoo:encoders/<modality>")
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self.config_dir / p)

    def setup(self, data: bool = True, judge: bool = True) -> None:
        """Resolve paths, build the toy zoo if needed, load the tokenizer and the encoders, and (unless
        ``data`` / ``judge`` is False, e.g. to only load and use stages) the data sets and the judge."""
        from transformers import AutoTokenizer

        from mera.model.encoders.base import load_encoder

        if self.threads:
            torch.set_num_threads(self.threads)
        self.zoo_paths = {}
        if self._uses_zoo():
            from mera.zoo.build import ZooConfig, build_zoo, zoo_paths

            zcfg = validate(self.cfg.zoo or {}, ZooConfig, "config section 'zoo'")
            build_zoo(zcfg, force=False, progress=self.progress)
            self.zoo_paths = zoo_paths(zcfg)
        self.llm_path = self.resolve(self.cfg.model.llm)
        tok_path = self.tok_path = self.resolve(self.cfg.model.tokenizer) if self.cfg.model.tokenizer else self.llm_path
        for key, p in (("model.llm", self.llm_path), ("model.tokenizer", tok_path)):
            if not Path(p).is_dir():
                raise ConfigError(f"{key}: {p} is not a folder (a local model folder is expected; "
                                  "mera never downloads)")
        set_paths = {m: p.model_dump() for m, p in self.cfg.data.sets.items()}
        self.set_names = {m: (p.caption_name or f"{m}-caption", p.qa_name or f"{m}-qa")
                          for m, p in self.cfg.data.sets.items()}
        if data:
            self._load_data(set_paths)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tok_path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.tok_path}: cannot load the tokenizer ({e})") from None
        for m, b in self.cfg.model.branches.items():
            path = self.resolve(b.encoder.path) if b.encoder.path else None
            try:
                self.encoders[m] = load_encoder(b.encoder.family, path, **b.encoder.options).to(self.device)
            except MeraError as e:
                raise type(e)(f"model.branches.{m}.encoder: {e}") from None
        self.provider = FeatureProvider(self.encoders, cache=self.cfg.train.cache_features, progress=self.progress,
                                        cache_dir=self.out / ".features",
                                        cache_dtype=self.cfg.train.feature_cache_dtype)
        self.judge = None
        if judge:
            from mera.eval.judges import get_judge

            self.judge = get_judge(self.cfg.eval.judge, **self.cfg.eval.judge_options)

    def _load_data(self, set_paths: dict) -> None:
        """The four sets of every branch (the toy world's written first when the config uses it)."""
        if self.cfg.data.toy is not None:
            from mera.data.toy_world import ToyWorldConfig, write_world
            from mera.zoo.build import zoo_home

            wcfg = validate(self.cfg.data.toy, ToyWorldConfig, "config section 'data.toy'")
            h = hashlib.sha256(wcfg.model_dump_json().encode()).hexdigest()[:12]
            paths = write_world(zoo_home(self.cfg.zoo) / "toy-data" / h, wcfg)
            for m in self.cfg.model.branches:
                if m not in set_paths:
                    p = paths[m]
                    set_paths[m] = {"caption_train": p["caption"]["train"], "caption_test": p["caption"]["test"],
                                    "qa_train": p["qa"]["train"], "qa_test": p["qa"]["test"]}
                    self.set_names[m] = (f"toy-{m}-caption", f"toy-{m}-qa")
        for m, p in set_paths.items():
            for k in ("caption_train", "caption_test", "qa_train", "qa_test"):
                p[k] = self.resolve(p[k])
            p.pop("caption_name", None)
            p.pop("qa_name", None)
        self.sets = load_sets({m: set_paths[m] for m in self.cfg.model.branches}, self.cfg.data.max_test)

    def _uses_zoo(self) -> bool:
        refs = [self.cfg.model.llm, self.cfg.model.tokenizer or ""]
        refs += [b.encoder.path or "" for b in self.cfg.model.branches.values()]
        return any(r.startswith("zoo:") for r in refs)

    # ------------------------------------------------------------------ models
    def base_model(self):
        from transformers import AutoModelForCausalLM

        from mera.model.mllm import MultimodalLM

        dtype = getattr(torch, self.cfg.model.dtype)
        from safetensors import SafetensorError

        try:
            llm = AutoModelForCausalLM.from_pretrained(self.llm_path, dtype=dtype)
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{self.llm_path}: cannot load the language model ({e})") from None
        llm.requires_grad_(False)
        return MultimodalLM(llm.to(self.device), self.tokenizer)

    def llm_hidden(self, model) -> int:
        return model.llm.get_input_embeddings().weight.shape[1]

    def new_connector(self, model, modality: str):
        from mera.model.connectors import build_connector

        torch.manual_seed(seed_for(self.cfg.seed, "connector", modality))
        b = self.cfg.model.branches[modality]
        conn = build_connector(b.connector, self.encoders[modality].output_dim, self.llm_hidden(model))
        return conn.to(self.device)  # fp32 (its output is cast to the LLM dtype at the splice)

    def add_branch(self, model, modality: str, state: dict | None = None):
        conn = self.new_connector(model, modality)
        if state is not None:
            conn.load_state_dict(state)
        model.add_branch(modality, self.encoders[modality], conn)

    def pretrained_connector_state(self, model, modality: str, path: str) -> dict:
        """The connector weights of ``path`` (safetensors, connector parameter names), checked
        against a freshly built connector of the configured type."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self.resolve(path)
        try:
            state = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read the pretrained connector ({e})") from None
        model_dim = self.cfg.model.branches[modality]
        want = self.new_connector(model, modality).state_dict()
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        bad = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
        if missing or extra or bad:
            raise CheckpointError(
                f"{file}: does not fit the {model_dim.connector.type} connector of {modality!r}: "
                + "; ".join(x for x in (f"missing {missing[:4]}" if missing else "",
                                        f"unexpected {extra[:4]}" if extra else "",
                                        f"wrong shape {bad[:4]}" if bad else "") if x))
        return state

    def load_stage(self, folder: Path):
        """Rebuild the model of a finished stage from its checkpoint chain."""
        model = self.base_model()
        ckpt.apply_stage_llm(model.llm, folder)
        layout = ckpt.read_manifest(folder).get("llm_modules")
        if layout:
            if layout.get("kind") != "pathweave":
                raise CheckpointError(f"{folder}: unknown LLM modules {layout.get('kind')!r} in the manifest")
            from mera.continual.strategies.pathweave import install_from_state

            install_from_state(model.llm, layout, ckpt.load_strategy_tensors(folder))
        manifest = ckpt.read_manifest(folder)
        for m, state in ckpt.load_connectors(folder).items():
            if m not in self.cfg.model.branches:
                raise CheckpointError(f"{folder}: the stage has a {m!r} connector, but the config has no such branch "
                                      f"(branches: {', '.join(self.cfg.model.branches)})")
            try:
                self.add_branch(model, m, state)
            except RuntimeError as e:  # size mismatch: a checkpoint of another model config
                last = str(e).strip().splitlines()[-1].strip()
                raise CheckpointError(
                    f"{folder / manifest['connectors']}: the {m!r} connector does not fit the configured "
                    f"{self.cfg.model.branches[m].connector.type} connector ({last}); "
                    "a checkpoint of another model config?") from None
        return model

    def connector_states(self, model) -> dict:
        return {m: {k: v.detach().clone() for k, v in b.connector.state_dict().items()}
                for m, b in model.branches.items()}

    # ------------------------------------------------------------------ training
    def _phase(self, model, groups, samples: list[Sample], pc: PhaseConfig, seed: int, desc: str,
               extra_loss=None) -> PhaseResult:
        for p in model.parameters():
            p.requires_grad_(False)
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        collate = MultimodalCollator(self.tokenizer, model, train=True)
        ck = None
        if self.cfg.train.checkpoint_every and getattr(self, "_steps_dir", None) is not None:
            ck = StepCheckpoint(self._steps_dir / desc.split()[-1], self.cfg.train.checkpoint_every)
        # every phase backpropagates through the frozen LLM (into the connectors, or its LoRA):
        # gradient checkpointing trades its activations' memory for recomputation in all of them
        gc = self.cfg.train.gradient_checkpointing and hasattr(model.llm, "gradient_checkpointing_enable")
        if gc:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            res = train_phase(model, groups, ItemDataset(samples, self.provider), collate,
                              batch_size=pc.batch_size, micro_batch_size=pc.micro_batch_size, epochs=pc.epochs,
                              warmup_ratio=pc.warmup_ratio, weight_decay=pc.weight_decay,
                              max_grad_norm=pc.max_grad_norm, seed=seed, extra_loss=extra_loss, desc=desc,
                              progress=self.progress, checkpoint=ck, num_workers=self.cfg.train.num_workers)
        finally:
            if gc:
                model.llm.gradient_checkpointing_disable()
        for p in model.parameters():
            p.requires_grad_(False)
        return res

    def train_modality(self, model, ctx: StageContext, strategy: Strategy):
        """The standard two steps on the new modality, then the fold of the LLM delta.

        Returns the list of (LoRA delta, coefficient) folded into the LLM, in folding order.
        """
        tc, m = self.cfg.train, ctx.modality
        self.add_branch(model, m)
        strategy.before_stage(ctx)
        conn = model.connector_parameters(m)
        tag = f"{ctx.method} s{ctx.stage} {m}"
        # step A: align the new connector on captions
        res = self._phase(model, [{"params": conn, "lr": tc.align.lr_connector}], self.sets[m].caption_train,
                          tc.align, seed_for(ctx.seed, "align"), f"{tag} align")
        ctx.log["align"] = _phase_log(res)
        # step B: instruct (new connector + LoRA; strategies may add data, parameters, a loss term)
        own = strategy.llm_params(ctx)
        if own is not None:  # a strategy with its own LLM modules (PathWeave) instead of a LoRA
            self._instruct(model, ctx, strategy, conn, own, tag)
            return list(ctx.llm_deltas)
        deltas = []
        cont = strategy.continue_lora(ctx)  # a strategy may continue the previous stage's adapter (EWC)
        if cont is not None:
            prev, prev_coef = cont
            fold_lora(model.llm, prev, -prev_coef)  # take it out of the weights, train it as an adapter again
            deltas.append((prev, -prev_coef))
        model.llm = attach_lora(model.llm, tc.lora, seed_for(ctx.seed, "lora"))
        if cont is not None:
            load_lora(model.llm, cont[0])
        self._instruct(model, ctx, strategy, conn, list(self.lora_params(model).values()), tag)
        delta = extract_lora(model.llm)
        model.llm = detach_lora(model.llm)
        coef = strategy.merge_coefficient(ctx)
        coef = 1.0 if coef is None else coef
        fold_lora(model.llm, delta, coef)
        deltas.append((delta, coef))
        ctx.log["merge_coef"] = coef
        return deltas

    def _instruct(self, model, ctx: StageContext, strategy: Strategy, conn, llm_params, tag: str) -> None:
        """Step B: the new connector and ``llm_params`` (LoRA, or a strategy's own modules) on the
        new modality's captions + QA, plus what the strategy adds (data, parameters, a loss)."""
        tc = self.cfg.train
        strategy.before_instruct(ctx)
        groups = [{"params": conn, "lr": tc.instruct.lr_connector},
                  {"params": llm_params, "lr": tc.instruct.lr_lora or tc.instruct.lr_connector}]
        for _name, params in strategy.instruct_extra_params(ctx):
            groups.append({"params": params, "lr": tc.instruct.lr_connector})
        data = self.sets[ctx.modality].train + strategy.instruct_extra_data(ctx)
        res = self._phase(model, groups, data, tc.instruct, seed_for(ctx.seed, "instruct"), f"{tag} instruct",
                          extra_loss=strategy.extra_loss(ctx))
        ctx.log["instruct"] = _phase_log(res)
        strategy.after_instruct(ctx)

    def lora_params(self, model) -> dict[str, torch.nn.Parameter]:
        """The trainable LoRA parameters of the (peft-wrapped) LLM, by name."""
        return {n: p for n, p in model.llm.named_parameters() if "lora_" in n}

    def realign(self, ctx: StageContext, samples: list[Sample]) -> PhaseResult:
        """Train every connector of the model on ``samples``; LLM and encoders frozen."""
        pc = self.cfg.train.realign
        params = ctx.model.connector_parameters()
        return self._phase(ctx.model, [{"params": params, "lr": pc.lr_connector}], samples, pc,
                           seed_for(ctx.seed, "realign"), f"{ctx.method} s{ctx.stage} realign")

    # ------------------------------------------------------------------ costs
    def cost(self):
        """Wall time and peak memory of a stage's training (see mera.eval.profile.PeakMemory)."""
        return _Cost()

    def profile(self, model, modalities: list[str], folder: Path) -> dict:
        """Inference cost of a final model (batch 1, 2 test prompts per modality): ``profile.json``."""
        from mera.eval.profile import profile_inference

        samples = [s for m in modalities for s in (self.sets[m].caption_test[:1] + self.sets[m].qa_test[:1])]
        prof = profile_inference(model, self.tokenizer, samples, self.provider,
                                 new_tokens=self.cfg.eval.max_new_tokens)
        write_text(folder / "profile.json", json.dumps(prof, indent=2) + "\n")
        self.log(f"    inference: {prof['ms_per_token']:.2f} ms/token (batch 1), peak {prof['peak_mib']:.0f} MiB "
                 f"({prof['memory_kind']}), LLM {prof['llm_params_m']:.2f}M parameters")
        return prof

    def efficiency(self) -> dict:
        """Per method: training time and peak memory (stages 2..m, averaged over orders: stage 1 is
        the shared expert) and the inference profile of its final model (first order)."""
        out = {}
        first = next(iter(self.cfg.orders))
        for meth in self.cfg.methods:
            secs, peaks, ok = [], [], True
            for oname, order in self.cfg.orders.items():
                total = 0.0
                for i, m in enumerate(order[1:], 2):
                    f = self.stage_dir(oname, meth, i, m)
                    if not ckpt.is_done(f):
                        ok = False
                        continue
                    c = ckpt.read_manifest(f).get("cost") or {}
                    total += c.get("seconds", 0.0)
                    if "peak_mib" in c:
                        peaks.append(c["peak_mib"])
                secs.append(total)
            if not ok:
                continue
            entry = {"train_seconds": sum(secs) / len(secs), "train_peak_mib": max(peaks) if peaks else None}
            order = self.cfg.orders[first]
            prof_file = self.stage_dir(first, meth, len(order), order[-1]) / "profile.json"
            if prof_file.is_file():
                prof = json.loads(prof_file.read_text())
                entry.update({"infer_ms_per_token": prof["ms_per_token"], "infer_peak_mib": prof["peak_mib"],
                              "llm_params_m": prof["llm_params_m"], "memory_kind": prof["memory_kind"]})
            out[meth.name] = entry
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, modalities: list[str], folder: Path) -> list[dict]:
        """Evaluate every modality in ``modalities``; predictions go to ``folder/predictions.jsonl``."""
        from mera.eval.evaluate import evaluate_modality

        rows, preds = [], []
        for m in modalities:
            r, ex = evaluate_modality(model, self.tokenizer, m, self.sets[m].caption_test, self.sets[m].qa_test,
                                      self.provider, self.judge, self.cfg.eval.batch_size,
                                      self.cfg.eval.max_new_tokens, self.set_names[m], self.progress)
            rows += r
            preds += [{"modality": m, **p} for p in ex["predictions"]]
            shown = ", ".join(f"{x['task']} {x['score']:.3g}" for x in r)
            if ex.get("qa_unparseable"):
                shown += f" ({ex['qa_unparseable']} QA judgements unparseable, not scored)"
            self.log(f"    eval {m:6s} {shown}   e.g. {ex.get('caption', [('', '')])[0][1]!r}")
        if self.main:
            write_text(folder / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
        return rows

    # ------------------------------------------------------------------ experts and stages
    def run_expert(self, modality: str) -> None:
        folder = self.expert_dir(modality)
        if ckpt.is_done(folder):
            self.log(f"[expert {modality}] done, skipped")
            return
        if self.main:
            _clean(folder)
        self._steps_dir = self.steps_dir(folder)
        t0 = time.perf_counter()
        self.log(f"[expert {modality}] training")
        model = self.base_model()
        ctx = StageContext(self, model, order="-", method="expert", stage=1, modality=modality, seen=[modality],
                           seed=seed_for(self.cfg.seed, "expert", modality))
        pre = self.cfg.model.branches[modality].pretrained_connector
        with self.cost() as cost:
            if pre:  # an already trained branch (e.g. an imported LLaVA): nothing to train
                self.add_branch(model, modality, self.pretrained_connector_state(model, modality, pre))
                ctx.log["pretrained_connector"] = pre
                deltas = []
            else:
                deltas = self.train_modality(model, ctx, FineTune())
        if self.main:
            ckpt.save_stage(folder, parent=None, deltas=deltas, connectors=self.connector_states(model),
                            info={"kind": "expert", "modality": modality, "log": ctx.log, "cost": cost.info})
        rows = self.evaluate(model, [modality], folder)
        if self.main:
            _write_rows(folder / "scores.csv", [{"method": "expert", "order": "", "stage": "", **r} for r in rows])
            ckpt.mark_done(folder)
            shutil.rmtree(self._steps_dir, ignore_errors=True)
        dist.barrier()  # the expert is DONE for every process
        self.log(f"[expert {modality}] {time.perf_counter() - t0:.1f}s")

    def run_method(self, order_name: str, method: MethodConfig) -> None:
        order = self.cfg.orders[order_name]
        strategy = build_strategy(method.strategies, method.replay_ratio, method.ewc_lambda, method.fisher_ratio,
                                  method.realign_ratio, method.pathweave_in_rank)
        model = None
        for i, m in enumerate(order, 1):
            folder = self.stage_dir(order_name, method, i, m)
            if ckpt.is_done(folder):
                model = None  # loaded lazily if a later stage needs training
                prev = folder
                continue
            if model is None:
                model = self.load_stage(prev) if i > 1 else None
            if self.main:
                _clean(folder)
            self._steps_dir = self.steps_dir(folder)
            t0 = time.perf_counter()
            self.log(f"[{order_name} / {method.name}] stage {i} {m}")
            if i == 1:  # stage 1 of every method is the expert of the first modality
                expert = self.expert_dir(m)
                if self.main:
                    ckpt.save_stage(folder, parent=expert, deltas=[], connectors=ckpt.load_connectors(expert),
                                    info={"kind": "stage", "stage": 1, "modality": m, "same_as": "expert"})
                dist.barrier()  # written by the main process, loaded by every one
                rows = _read_rows(expert / "scores.csv")
                model = self.load_stage(folder) if len(order) > 1 else None
            else:
                ctx = StageContext(self, model, order=order_name, method=method.name, stage=i, modality=m,
                                   seen=order[:i], seed=seed_for(self.cfg.seed, order_name, method.name, i),
                                   parent=prev)
                with self.cost() as cost:
                    deltas = self.train_modality(model, ctx, strategy)
                    strategy.after_stage(ctx)
                if self.main:
                    ckpt.save_stage(folder, parent=prev, deltas=deltas, connectors=self.connector_states(model),
                                    tensors=ctx.tensors,
                                    info={"kind": "stage", "stage": i, "modality": m, "log": ctx.log,
                                          "cost": cost.info,
                                          **({"llm_modules": ctx.llm_modules} if ctx.llm_modules else {})})
                rows = self.evaluate(model, order[:i], folder)
                if self.main and i == len(order) and order_name == next(iter(self.cfg.orders)):
                    self.profile(model, order, folder)
            if self.main:
                rows = [{**r, "method": method.name, "order": order_name, "stage": i} for r in rows]
                _write_rows(folder / "scores.csv", rows)
                ckpt.mark_done(folder)
                shutil.rmtree(self._steps_dir, ignore_errors=True)
                self.assemble_scores()
            dist.barrier()  # the stage is DONE (and loadable) for every process
            self.log(f"    stage {i} done in {time.perf_counter() - t0:.1f}s")
            prev = folder

    # ------------------------------------------------------------------ tasks and workers
    def run_task(self, task: tuple) -> None:
        """("expert", modality) or ("chain", order, method index): the units a worker runs."""
        if task[0] == "expert":
            self.run_expert(task[1])
        else:
            self.run_method(task[1], self.cfg.methods[task[2]])

    def _parallel(self, tasks: list[tuple]) -> None:
        """Run independent tasks in ``workers`` spawned processes, each with its share of the threads.

        Each task writes only its own folders (DONE last), so the run directory stays valid
        whatever finishes first; the first failure stops the pool and is raised here.
        """
        import concurrent.futures
        import multiprocessing

        todo = [t for t in tasks if not self._task_done(t)]
        for t in tasks:
            if t not in todo:
                self.log(f"[{_task_name(t, self.cfg)}] done, skipped")
        if not todo:
            return
        n = min(self.workers, len(todo))
        threads = max(1, (self.cfg.threads or torch.get_num_threads()) // n)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has started torch threads
        # when a failure stops the workers, multiprocessing's resource tracker (its own process,
        # which reads PYTHONWARNINGS) would warn about the pool's semaphores: not the user's concern
        os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
        with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                                    initargs=(self.cfg, str(self.out), str(self.config_dir),
                                                              threads, self.verbose)) as pool:
            futures = {pool.submit(_worker_run, t): t for t in todo}
            try:
                for f in concurrent.futures.as_completed(futures):
                    f.result()
            except BaseException:
                # stop at once: the other workers' unfinished stages have no DONE and are redone
                # by --resume (every file is written atomically, so killing them loses nothing
                # finished). ProcessPoolExecutor has no public way to stop running tasks.
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.terminate()
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _task_done(self, task: tuple) -> bool:
        if task[0] == "expert":
            return ckpt.is_done(self.expert_dir(task[1]))
        order = self.cfg.orders[task[1]]
        return ckpt.is_done(self.stage_dir(task[1], self.cfg.methods[task[2]], len(order), order[-1]))

    # ------------------------------------------------------------------ scores and report
    def assemble_scores(self) -> Path:
        """Rebuild ``scores.csv`` from the finished stages, in plan order (so resume gives the same file)."""
        rows = []
        for oname, order in self.cfg.orders.items():
            for m in order:
                f = self.expert_dir(m)
                if ckpt.is_done(f):
                    rows += [{**r, "order": oname} for r in _read_rows(f / "scores.csv")]
        for oname, order in self.cfg.orders.items():
            for meth in self.cfg.methods:
                for i, m in enumerate(order, 1):
                    f = self.stage_dir(oname, meth, i, m)
                    if ckpt.is_done(f):
                        rows += _read_rows(f / "scores.csv")
        path = self.out / "scores.csv"
        _write_rows(path, rows)
        return path

    def run(self) -> Path:
        self.prepare_dir(write=False)  # fail fast, before any set-up work
        dist.barrier()  # every process has looked at the directory before the main one writes to it
        with dist.main_process_first():  # the main process builds the zoo / toy data; the others read them
            self.setup()  # bad paths or files fail here, before the run directory exists
        if self.main:
            self.prepare_dir()
        dist.barrier()
        t0 = time.perf_counter()
        experts = [("expert", m) for m in self.plan()["experts"]]
        chains = [("chain", oname, k) for oname in self.cfg.orders for k in range(len(self.cfg.methods))]
        if self.workers > 1:
            self._parallel(experts)  # the experts first: every chain's stage 1 is one of them
            self._parallel(chains)
        else:
            for task in experts + chains:
                self.run_task(task)
        if not self.main:
            dist.barrier()  # wait for the main process's scores, efficiency table and report
            return self.out / "scores.csv"
        try:
            return self._finish(t0)
        finally:
            dist.barrier()

    def _finish(self, t0: float) -> Path:
        """scores.csv, efficiency.json and the report (the main process)."""
        scores = self.assemble_scores()
        self.log(f"all stages done in {time.perf_counter() - t0:.1f}s; scores: {scores}")
        from mera.eval.report import write_report

        eff = self.efficiency()
        write_text(self.out / "efficiency.json", json.dumps(eff, indent=2) + "\n")
        try:
            write_report([str(scores)], str(self.out), efficiency=eff)
        except MeraError as e:  # e.g. an expert scored 0: relative gains are undefined; scores stay
            self.log(f"no report: {e}")
        return scores


_WORKER: "Runner | None" = None


def _task_name(task: tuple, cfg: RunConfig) -> str:
    return f"expert {task[1]}" if task[0] == "expert" else f"{task[1]} / {cfg.methods[task[2]].name}"


def _worker_init(cfg: RunConfig, out: str, config_dir: str, threads: int, verbose: bool) -> None:
    """Set up a worker process's runner once (tokenizer, encoders, data, feature cache)."""
    global _WORKER
    import os
    import warnings

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=FutureWarning)
    runner = Runner(cfg, out, config_dir=Path(config_dir), resume=True, progress=False,
                    log=None if verbose else (lambda msg: None))
    runner.threads = threads
    runner.setup()
    _WORKER = runner


def _worker_run(task: tuple) -> None:
    runner = _WORKER
    if runner.verbose:  # lines of parallel tasks interleave: tag the indented ones with their task
        tag = f"[{_task_name(task, runner.cfg)}]"
        runner.log = lambda msg: print(f"{tag}{msg}" if msg.startswith(" ") else msg, flush=True)
    runner.run_task(task)


class _Cost:
    """Context manager: wall seconds and peak memory (MiB) of a block, in ``.info``."""

    def __enter__(self):
        from mera.eval.profile import PeakMemory

        self.pm = PeakMemory("cuda" if torch.cuda.is_available() else "cpu").__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.pm.__exit__(*exc)
        self.info = {"seconds": round(time.perf_counter() - self.t0, 2), "peak_mib": round(self.pm.peak_mib, 1),
                     "memory_kind": self.pm.kind, "processes": dist.world_size()}  # peak: the main process's
        return False


def _phase_log(res: PhaseResult) -> dict:
    return {"steps": res.steps, "seconds": round(res.seconds, 2),
            "loss_first": round(res.losses[0], 4) if res.losses else None,
            "loss_last": round(res.losses[-1], 4) if res.losses else None,
            "losses": [round(x, 6) for x in res.losses]}  # one per optimizer step


def _clean(folder: Path) -> None:
    """Remove an unfinished stage folder (no DONE): it is redone from scratch."""
    if folder.exists():
        shutil.rmtree(folder)


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in SCORE_COLUMNS})
    write_text(path, buf.getvalue())


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
