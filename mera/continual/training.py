"""Training one stage: the standard two steps on the new modality (METHOD.md section 2), what the
strategies add to them, and the merge rule's fold of the LLM delta.

    add the new branch -> step A (align: new connector, captions)
    -> the LLM's adapter (a fresh LoRA, a continued one, or a strategy's own modules)
    -> step B (instruct: new connector + adapter on captions + QA, plus what strategies add)
    -> extract the delta, detach the adapter            (the step: shared between methods that
                                                           train it identically, mera.continual.sharing)
    -> fold what the merge rule returns

``run_phase`` trains one phase with the recipe of ``train.<phase>`` through the one training
loop (:func:`mera.train.loop.train_phase`); strategies reach it as ``ctx.train``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mera.continual.assets import Assets, seed_for
from mera.continual.checkpoint import ChainView
from mera.continual.deltas import Delta
from mera.continual.replay import ReplayMemory
from mera.continual.sharing import StepResult, StepStore, align_key, connector_digest, load_step, step_key
from mera.continual.strategies import Continue, InstructStep, LLMPolicy, OwnModules, StageContext
from mera.data.pipeline import ItemDataset
from mera.errors import CheckpointError
from mera.model.collate import MultimodalCollator
from mera.train.loop import PhaseResult, StepCheckpoint, train_only, train_phase
from mera.train.lora import attach_lora, detach_lora, extract_lora, load_lora, lora_parameters


def phase_log(res: PhaseResult) -> dict:
    return {"steps": res.steps, "seconds": round(res.seconds, 2),
            "loss_first": round(res.losses[0], 4) if res.losses else None,
            "loss_last": round(res.losses[-1], 4) if res.losses else None,
            "losses": [round(x, 6) for x in res.losses]}  # one per optimizer step


def run_phase(assets: Assets, model, groups: list[dict], samples, phase: str, seed: int, desc: str, *,
              steps_dir: Path | None = None, extra_loss=None, progress: bool = False, on_step=None) -> PhaseResult:
    """Train the parameters of ``groups`` (``{"params", "lr"}``) on ``samples`` with ``train.<phase>``."""
    tc = assets.cfg.train
    pc = getattr(tc, phase)
    train_only(model, groups)
    collate = MultimodalCollator(assets.tokenizer, model, train=True)
    ck = StepCheckpoint(steps_dir / phase, tc.checkpoint_every) if tc.checkpoint_every and steps_dir else None
    # every phase backpropagates through the frozen LLM (into the connectors, or its LoRA):
    # gradient checkpointing trades its activations' memory for recomputation in all of them
    gc = tc.gradient_checkpointing and hasattr(model.llm, "gradient_checkpointing_enable")
    if gc:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        res = train_phase(model, groups, ItemDataset(samples, assets.provider), collate,
                          batch_size=pc.batch_size, micro_batch_size=pc.micro_batch_size, epochs=pc.epochs,
                          warmup_ratio=pc.warmup_ratio, weight_decay=pc.weight_decay,
                          max_grad_norm=pc.max_grad_norm, seed=seed, extra_loss=extra_loss, desc=desc,
                          progress=progress, checkpoint=ck, num_workers=tc.num_workers, on_step=on_step)
    finally:
        if gc:
            model.llm.gradient_checkpointing_disable()
    for p in model.parameters():
        p.requires_grad_(False)
    return res


def curve_entry(phase: str, res: PhaseResult) -> dict:
    """A trained phase's record in a stage's curve: its losses, learning rates and gradient norms,
    one per optimizer step (mera.runner.telemetry turns them into metrics.jsonl lines)."""
    return {"phase": phase, "losses": list(res.losses), "lrs": list(res.lrs), "grad_norms": list(res.grad_norms)}


class PhaseTrainer:
    """``ctx.train``: trains one phase with the recipe of ``train.<phase>`` (:func:`run_phase`) and
    keeps the stage's curve, every phase in the order trained (``curve``; a reused step adds the
    curve it was stored with: :meth:`add`). ``listener(phase, step)`` hears each optimizer step
    (``step``: the dict of :func:`mera.train.loop.train_phase`'s ``on_step``), trained or reused."""

    def __init__(self, assets: Assets, model, *, seed: int, desc: str, steps_dir: Path | None, progress: bool,
                 listener=None):
        self.assets, self.model, self.seed, self.desc = assets, model, seed, desc
        self.steps_dir, self.progress, self.listener = steps_dir, progress, listener
        self.curve: list[dict] = []

    def __call__(self, params, samples, phase: str, extra_loss=None) -> PhaseResult:
        if params and not isinstance(params[0], dict):  # a plain parameter list: the phase's connector lr
            params = [{"params": list(params), "lr": getattr(self.assets.cfg.train, phase).lr_connector}]
        on_step = (lambda step: self.listener(phase, step)) if self.listener is not None else None
        res = run_phase(self.assets, self.model, params, samples, phase, seed_for(self.seed, phase),
                        f"{self.desc} {phase}", steps_dir=self.steps_dir, extra_loss=extra_loss,
                        progress=self.progress, on_step=on_step)
        self.curve.append(curve_entry(phase, res))
        return res

    def add(self, curve: list[dict]) -> None:
        """The curve of a reused step (as stored with it), as if its phases were trained here."""
        for entry in curve:
            self.curve.append(entry)
            if self.listener is not None:
                n = len(entry["losses"])
                for k in range(n):
                    self.listener(entry["phase"], {"step": k + 1, "total_steps": n, "loss": entry["losses"][k],
                                                   "lr": entry["lrs"][k], "grad_norm": entry["grad_norms"][k]})


def trainer_curve(ctx: StageContext) -> list[dict] | None:
    """The curve ``ctx.train`` kept so far (None: a context whose ``train`` keeps none)."""
    curve = getattr(ctx.train, "curve", None)
    return list(curve) if curve is not None else None


def make_context(assets: Assets, model, *, order: str, method: str, stage: int, modality: str, seen: list[str],
                 seed: int, parent: Path | None, steps_dir: Path | None, progress: bool,
                 memory: ReplayMemory | None = None, listener=None) -> StageContext:
    """The narrow view a stage's strategies get (model, data, a phase trainer, the parent chain)."""
    train = PhaseTrainer(assets, model, seed=seed, desc=f"{method} s{stage} {modality}", steps_dir=steps_dir,
                         progress=progress, listener=listener)

    def batch(samples):
        return MultimodalCollator(assets.tokenizer, model, train=True)([assets.provider.item(s) for s in samples])

    memory = memory or ReplayMemory(assets.sets, assets.cfg.seed)
    return StageContext(model=model, order=order, method=method, stage=stage, modality=modality, seen=seen,
                        seed=seed, train=train, data=lambda m: assets.sets[m].train, replay=memory.samples,
                        batch=batch, history=ChainView(parent))


def _sum_losses(losses):
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]

    def total():
        terms = [t for t in (f() for f in losses) if t is not None]
        return sum(terms) if terms else None

    return total


def train_stage(assets: Assets, ctx: StageContext, strategies: list, merge,
                store: StepStore | None = None) -> tuple[list, Delta | None]:
    """The step on ``ctx.modality`` (trained, or reused from ``store`` when a method already trained
    it: mera.continual.sharing) and the merge rule's fold; returns (folds [(Delta, coef)], trained)."""
    key = step_key(assets, ctx, strategies) if store is not None and store.root is not None else None
    found = store.get(key) if key else None
    result = None
    if found is not None:
        try:
            loaded = load_step(found)
        except CheckpointError as e:  # a damaged entry: train the step again (and say so)
            print(f"warning: {e}; the step is trained again", file=sys.stderr, flush=True)
        else:
            result = _reuse(assets, ctx, strategies, found, loaded)
    if result is None:
        before = {m: connector_digest(ctx.model, m) for m in ctx.model.branches}
        t0 = time.perf_counter()
        result = _train_step(assets, ctx, strategies, store if key else None)
        result.seconds = time.perf_counter() - t0
        if key and store is not None:
            changed = {m: {k: v.detach().clone() for k, v in b.connector.state_dict().items()}
                       for m, b in ctx.model.branches.items() if before.get(m) != connector_digest(ctx.model, m)}
            store.put(key, result, ctx, changed, by=f"{ctx.order} / {ctx.method} / stage {ctx.stage}",
                      curve=trainer_curve(ctx))
    if result.own:
        return list(result.pre_folds), None
    new = result.trained
    merged = merge.merge(new, ctx.history.trained(), ctx.stage)
    for delta, coef in merged:
        delta.fold(ctx.model.llm, coef)
    ctx.log["merge_coef"] = merged[0][1] if len(merged) == 1 and merged[0][0] is new else [c for _, c in merged]
    return list(result.pre_folds) + merged, new


def _reuse(assets: Assets, ctx: StageContext, strategies: list, folder, loaded) -> StepResult:
    """Put the model and ``ctx`` in the state the stored step (``loaded``: load_step) left them in."""
    result, changed, tensors, m = loaded
    model = ctx.model
    if ctx.modality not in changed:
        raise CheckpointError(f"{folder}: the shared step has no {ctx.modality!r} connector")
    assets.add_branch(model, ctx.modality, changed.pop(ctx.modality))
    for mod, state in changed.items():
        model.branches[mod].connector.load_state_dict(state)
    for delta, coef in result.pre_folds:
        delta.fold(model.llm, coef)
    if result.own:
        ctx.folds[:] = list(result.pre_folds)
    ctx.tensors.update(tensors)
    ctx.llm_modules = m.get("llm_modules")
    ctx.log.update(m["log"])
    _add_curve(ctx, m)
    for s in strategies:
        s.restore(ctx)
    ctx.log["shared"] = {"key": folder.name, "trained_by": m.get("by"), "seconds": result.seconds}
    return result


def _add_curve(ctx: StageContext, manifest: dict) -> None:
    """Give ``ctx.train`` the curve a reused step was stored with (a step stored by an earlier
    release has none: the stage's metrics then lack those phases' lines)."""
    curve = manifest.get("curve")
    if isinstance(curve, list) and hasattr(ctx.train, "add"):
        ctx.train.add(curve)


def _train_step(assets: Assets, ctx: StageContext, strategies: list, store: StepStore | None = None) -> StepResult:
    """Step A, the adapter, step B, and the trained delta (the LoRA detached again)."""
    tc, m, model = assets.cfg.train, ctx.modality, ctx.model
    assets.add_branch(model, m)
    conn = model.connector_parameters(m)
    _align(assets, ctx, conn, store)

    # the LLM's adapter in step B: a strategy's own modules, a continued LoRA, or a fresh one; none
    # where a strategy declares the LLM frozen (its policy: no delta, so nothing for the merge rule)
    adapters = [a for a in (s.adapter(ctx) for s in strategies) if a is not None]
    adapter = adapters[0] if adapters else None
    if adapter is None and any(getattr(s, "llm_policy", None) == LLMPolicy.FROZEN for s in strategies):
        adapter = OwnModules([])
    if isinstance(adapter, OwnModules):
        _instruct(assets, ctx, strategies, conn, adapter.params)
        return StepResult(own=True, pre_folds=list(ctx.folds))
    pre = []
    if isinstance(adapter, Continue):  # take it out of the weights, train it as an adapter again
        adapter.delta.fold(model.llm, -adapter.coef)
        pre.append((adapter.delta, -adapter.coef))
    model.llm = attach_lora(model.llm, tc.lora, seed_for(ctx.seed, "lora"))
    if isinstance(adapter, Continue):
        load_lora(model.llm, adapter.delta.modules)
    _instruct(assets, ctx, strategies, conn, list(lora_parameters(model.llm).values()))
    new = Delta.lora(extract_lora(model.llm))
    model.llm = detach_lora(model.llm)
    return StepResult(own=False, pre_folds=pre, trained=new)


def _align(assets: Assets, ctx: StageContext, conn, store: StepStore | None) -> None:
    """Step A: the new connector on the new modality's captions, the LLM frozen. It reads nothing a
    strategy adds, only the parent model: methods whose steps differ from step B on (at stage 2 every
    method of the grid) share it too (key: mera.continual.sharing.align_key)."""
    key = align_key(assets, ctx) if store is not None else None
    found = store.get(key) if key else None
    if found is not None:
        try:
            _result, conns, _tensors, m = load_step(found)
            ctx.model.branches[ctx.modality].connector.load_state_dict(conns[ctx.modality])
        except (CheckpointError, KeyError) as e:
            print(f"warning: {found}: {e}; step A is trained again", file=sys.stderr, flush=True)
        else:
            ctx.log["align"] = m["log"]["align"]
            _add_curve(ctx, m)
            ctx.log["align_shared"] = {"key": found.name, "trained_by": m.get("by"), "seconds": _result.seconds}
            return
    t0 = time.perf_counter()
    res = ctx.train(conn, assets.sets[ctx.modality].caption_train, "align")  # a plain list: train.align's lr_connector
    ctx.log["align"] = phase_log(res)
    if key:
        state = {k: v.detach().clone() for k, v in ctx.model.branches[ctx.modality].connector.state_dict().items()}
        store.put(key, StepResult(own=False, seconds=time.perf_counter() - t0), ctx, {ctx.modality: state},
                  by=f"{ctx.order} / {ctx.method} / stage {ctx.stage} (step A)", log={"align": ctx.log["align"]},
                  tensors={}, curve=[curve_entry("align", res)])


def _instruct(assets: Assets, ctx: StageContext, strategies: list, conn, llm_params) -> None:
    """Step B: the new connector and ``llm_params`` on the new modality's captions + QA, plus what
    the strategies add (data, parameter groups, loss terms)."""
    step = InstructStep(data=list(ctx.data(ctx.modality)))
    for s in strategies:
        s.prepare_instruct(ctx, step)
    pc = assets.cfg.train.instruct
    groups = [{"params": conn, "lr": pc.lr_connector}, {"params": llm_params, "lr": pc.lr_lora or pc.lr_connector}]
    groups += [{"params": params, "lr": pc.lr_connector} for _name, params in step.groups]
    res = ctx.train(groups, step.data, "instruct", extra_loss=_sum_losses(step.losses))
    ctx.log["instruct"] = phase_log(res)
    for s in strategies:
        s.after_instruct(ctx)
