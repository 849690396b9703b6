"""``mera plan``: what a config trains, phase by phase, and what each phase needs per GPU, worked
out before any GPU is rented (docs/plan.md has the formulas).

Every model is built on PyTorch's ``meta`` device from its config alone (:mod:`mera.train.plan`:
the LLM from its ``config.json``, the LoRA adapter by PEFT on that meta LLM, the encoders and
connectors from their configs): no weight is read, nothing is downloaded. For each phase of the
run (each expert's align and instruct, then for every order, stage and method: align, instruct,
and realign where the method has it) the plan gives

- the parameters, trainable and frozen, by part (LLM, LoRA or a strategy's modules, connectors,
  encoders);
- the memory per GPU under a preset (single GPU, DDP, FSDP: ``configs/accelerate``):
  weights, gradients, AdamW states, a strategy's extra state, activations with and without
  gradient checkpointing, and the peak (with the config's ``train.gradient_checkpointing``);
- the number of optimizer steps, from the data sets' sizes (their files are read when present,
  else "unknown"), epochs, batch size and accumulation.

The estimate is checked against PyTorch's own accounting of the memory of micro training phases
(tests/test_plan.py); the memory the CPU needs (the fp32 master copies of folded bfloat16 weights,
:mod:`mera.train.precision`) is given per process.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from mera.continual.strategies import OwnModuleCounts
from mera.errors import ConfigError
from mera.runner.rundir import RunDir
from mera.train.plan import GIB, Phase, Preset, Shapes, build_shapes, layer_bytes, memory_per_gpu, optimizer_steps, token_bytes


def _set_sizes(cfg, resolve) -> dict[str, dict[str, int | None]]:
    """Samples per modality and set (caption_train, qa_train): the files' lengths, the toy world's
    configured sizes, or None where a file is missing."""
    out: dict[str, dict[str, int | None]] = {}
    toy = cfg.data.toy
    for m in cfg.model.branches:
        sets = cfg.data.sets.get(m)
        if sets is None and toy is not None:
            from mera.data.toy_world import ToyWorldConfig

            w = ToyWorldConfig.model_validate(toy)
            out[m] = {"caption_train": w.n_train_caption, "qa_train": w.n_train_qa}
            continue
        sizes: dict[str, int | None] = {}
        for key in ("caption_train", "qa_train"):
            f = Path(resolve(getattr(sets, key))) if sets is not None else None
            sizes[key] = None
            if f is not None and f.is_file():
                try:
                    data = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise ConfigError(f"{f}: unreadable data set ({e})") from None
                if not isinstance(data, list):
                    raise ConfigError(f"{f}: a data set is a JSON list of samples")
                sizes[key] = len(data)
        out[m] = sizes
    return out


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _share(n: int | None, ratio: float) -> int | None:
    """The replay memory's size (mera.continual.replay): ``max(1, round(r * n))``."""
    return None if n is None else (min(n, max(1, int(round(ratio * n)))) if n else 0)


def _resolver(cfg, config_dir: Path):
    """path -> absolute path, as a run resolves it (``zoo:`` parts of the toy zoo, which must be built)."""
    zoo = None
    refs = [cfg.model.llm] + [b.encoder.path or "" for b in cfg.model.branches.values()]
    if any(str(r).startswith("zoo:") for r in refs):
        from mera.zoo.build import run_zoo_config, zoo_paths

        zoo = zoo_paths(run_zoo_config(cfg.zoo, cfg.data.toy))

    def resolve(p: str) -> str:
        if p.startswith("zoo:") and zoo is not None:
            key = p[4:]
            return str(zoo["encoders"][key.split("/", 1)[1]] if key.startswith("encoders/") else zoo[key])
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else config_dir / q)

    return resolve


def plan(cfg, config_dir: str | Path, preset: Preset, text_tokens: int = 128, device: str = "cuda",
         shapes: Shapes | None = None) -> dict:
    """The plan of ``cfg`` (see the module docstring) as a JSON-able dict."""
    from mera.continual.methods import build_method

    config_dir = Path(config_dir)
    resolve = _resolver(cfg, config_dir)
    s = shapes or build_shapes(cfg, config_dir, resolve)
    sizes = _set_sizes(cfg, resolve)
    mask_bytes = 1 if device == "cuda" else 4
    dt_bytes = s.dtype_bytes
    llm_bytes = s.llm_params * dt_bytes
    enc_params = sum(b.encoder_params for b in s.branches.values())
    enc_bytes = sum(b.encoder_bytes for b in s.branches.values())  # every branch's encoder is loaded at start
    tc = cfg.train
    phases: list[Phase] = []

    def phase(label: str, name: str, method: str, samples: int | None, media: list[str], *,
              connectors: int, frozen_connectors: int = 0, lora: bool = False, own: OwnModuleCounts | None = None,
              extra: int = 0, notes: tuple = ()) -> None:
        """One phase: ``connectors`` trainable connector parameters (fp32), a LoRA or a strategy's own LLM
        modules (``own``: trainable, frozen, adapters on the path; in the LLM's dtype), the frozen rest."""
        pc = getattr(tc, name)
        micro = min(pc.micro_batch_size or pc.batch_size, pc.batch_size)
        trainable, frozen = {"connectors": connectors}, {"LLM": s.llm_params, "encoders": enc_params}
        tb, fb = 4 * connectors, llm_bytes + enc_bytes
        copies = 0
        if lora:
            trainable["LoRA"] = s.lora_params
            tb += 4 * s.lora_params
            copies = 1
        if own is not None:  # a strategy's own LLM modules (its plan_counts), in the LLM's dtype
            trainable[own.label], frozen[own.label] = own.trainable, own.frozen
            tb, fb = tb + dt_bytes * own.trainable, fb + dt_bytes * own.frozen
            copies = own.lora_copies
        if frozen_connectors:
            frozen["connectors"] = frozen_connectors
            fb += 4 * frozen_connectors
        ph = Phase(label, name, [method], samples, optimizer_steps(samples, pc.batch_size, pc.micro_batch_size, pc.epochs),
                   math.ceil(micro / preset.gpus), text_tokens + max(s.branches[m].llm_tokens for m in media),
                   list(media), copies, trainable, tb, frozen, fb, extra_state_bytes=extra, notes=list(notes))
        ph.memory = memory_per_gpu(ph, s, preset, tc.gradient_checkpointing, mask_bytes)
        phases.append(ph)

    def conn(mods) -> int:
        return sum(s.branches[m].connector_params for m in mods)

    def train_set(m) -> int | None:
        return _add(sizes[m]["caption_train"], sizes[m]["qa_train"])

    # ---- experts (trained once per seed, reused by every method and order)
    rd = RunDir(".", cfg)  # the plan's stages (the first seed's: every seed trains the same)
    for m in rd.experts():
        if cfg.model.branches[m].pretrained_connector:  # an imported branch: nothing to train
            continue
        phase(f"expert {m}", "align", "expert", sizes[m]["caption_train"], [m], connectors=conn([m]))
        phase(f"expert {m}", "instruct", "expert", train_set(m), [m], connectors=conn([m]), lora=True)
    # ---- every order, method and stage but the expert's copy (rundir.expert_modality)
    for oname in cfg.orders:
        for meth in cfg.methods:
            strategies, _merge = build_method(meth)
            by_name = {x.name: x for x in strategies}
            for st in rd.chain(oname, meth):
                if st.is_expert:
                    continue
                i, m, seen, old = st.index, st.modality, list(st.seen), list(st.seen[:-1])
                label = f"{oname} s{i} {m}"
                phase(label, "align", meth.name, sizes[m]["caption_train"], [m], connectors=conn([m]),
                      frozen_connectors=conn(old))
                data, media, extra, notes = train_set(m), [m], 0, []
                trained, frozen_old = conn([m]), conn(old)
                if "replay" in by_name:  # the r% memories of the old modalities; their connectors train too
                    for o in old:
                        data = _add(data, _share(train_set(o), by_name["replay"].params.ratio))
                    trained, frozen_old, media = trained + frozen_old, 0, list(seen)
                if "ewc" in by_name:
                    if by_name["ewc"].params.adapter == "fresh":
                        extra += 4 * s.target_weight_params + 4 * s.lora_params
                        notes.append("EWC (fresh adapter): fp32 Fisher of the adapted weights and the LoRA anchor")
                    else:
                        extra += 2 * 4 * s.lora_params
                        notes.append("EWC: fp32 Fisher and anchor of the LoRA")
                    if preset.kind == "fsdp":
                        notes.append("EWC is refused under FSDP (docs/distributed.md): use DDP for it")
                own = None  # a strategy with its own LLM modules trains them instead of a LoRA (its plan_counts)
                for x in strategies:
                    own = own or x.plan_counts(s, i)
                if own is not None and own.note:
                    notes.append(own.note)
                phase(label, "instruct", meth.name, data, media, connectors=trained, frozen_connectors=frozen_old,
                      lora=own is None, own=own, extra=extra, notes=tuple(notes))
                if "realign" in by_name:  # every connector on the r% memories of every seen modality
                    n: int | None = 0
                    for o in seen:
                        n = _add(n, _share(train_set(o), by_name["realign"].params.ratio))
                    phase(label, "realign", meth.name, n, list(seen), connectors=conn(seen))
    # methods whose phase is the same: one row naming them all; experts first, then by order, stage, phase
    merged: dict[str, Phase] = {}
    for ph in phases:
        if ph.key in merged:
            merged[ph.key].methods += [x for x in ph.methods if x not in merged[ph.key].methods]
        else:
            merged[ph.key] = ph
    orders = list(cfg.orders)
    names = [meth.name for meth in cfg.methods]

    def rank(ph: Phase):
        o, _, rest = ph.label.partition(" s")
        stage = int(rest.split()[0]) if o in orders else 0
        return (orders.index(o) + 1 if o in orders else 0, stage, ("align", "instruct", "realign").index(ph.phase),
                min((names.index(x) for x in ph.methods if x in names), default=-1))

    as_branches = cfg.model.folds == "branches"  # folds kept as fp32 branches: no master copies
    cpu_master = 4 * s.target_weight_params if cfg.model.dtype != "float32" and not as_branches else 0
    folds = max((len(o) for o in cfg.orders.values()), default=1)
    return {
        "config": cfg.name,
        "preset": asdict(preset),
        "gradient_checkpointing": bool(tc.gradient_checkpointing),
        "text_tokens": text_tokens,
        "seeds": len(cfg.run_seeds),
        "models": {
            "llm": {"name": s.llm_name, "dtype": s.dtype, "parameters": s.llm_params, "bytes": llm_bytes,
                    "layers": s.layers, "hidden": s.hidden, "intermediate": s.intermediate, "heads": s.heads,
                    "kv_dim": s.kv_dim, "vocab": s.vocab, "decoder_layer_parameters": s.layer_params},
            "lora": {"rank": s.lora_rank, "alpha": cfg.train.lora.alpha, "dropout": s.lora_dropout,
                     "modules": s.lora_modules, "parameters": s.lora_params, "bytes": 4 * s.lora_params,
                     "adapted_weight_parameters": s.target_weight_params},
            "branches": {m: asdict(b) for m, b in s.branches.items()},
        },
        "cpu_master_copy_bytes": cpu_master,
        # model.folds: branches: one fp32 LoRA pair per adapted module and fold, on every GPU
        "fold_branch_bytes_per_stage": 4 * s.lora_params if as_branches else 0,
        "fold_branch_stages": folds if as_branches else 0,
        "per_token_activation_bytes": {
            "block": layer_bytes(s, mask_bytes)[0], "lora_per_block": layer_bytes(s, mask_bytes)[1],
            "checkpointing": token_bytes(s, lora=1, checkpointing=True, mask_bytes=mask_bytes),
            "no_checkpointing": token_bytes(s, lora=1, checkpointing=False, mask_bytes=mask_bytes)},
        "phases": [asdict(ph) for ph in sorted(merged.values(), key=rank)],
    }


# ---------------------------------------------------------------------------------------- output
def _g(x: int | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _n(x: int | None) -> str:
    if x is None:
        return "unknown"
    if x >= 10**9:
        return f"{x / 1e9:.2f}B"
    if x >= 10**6:
        return f"{x / 1e6:.1f}M"
    if x >= 10**3:
        return f"{x / 1e3:.1f}K"
    return str(x)


def render(p: dict) -> str:
    """The plan as plain text: the models, then one row per phase (identical rows of several methods
    once), then the formulas' inputs."""
    m = p["models"]
    llm, lora = m["llm"], m["lora"]
    pr = p["preset"]
    wrap = {"layer": ", one unit per decoder layer", "whole": ", the whole model one unit"}.get(pr.get("wrap"), "")
    lines = [f"plan of {p['config']}: preset {pr['name']} ({pr['kind']}{wrap}, {pr['gpus']} GPU{'s' if pr['gpus'] > 1 else ''}), "
             f"gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}, "
             f"{p['text_tokens']} text tokens per sample assumed (--text-tokens)",
             "models (built on the meta device from their configs; no weights read):",
             f"  LLM   {llm['name']}: {llm['parameters']:,} parameters ({llm['dtype']}, {_g(llm['bytes'])} GiB); "
             f"{llm['layers']} layers, hidden {llm['hidden']}, intermediate {llm['intermediate']}, "
             f"{llm['heads']} heads, kv width {llm['kv_dim']}, vocab {llm['vocab']:,}",
             f"  LoRA  r={lora['rank']} alpha={lora['alpha']:g} dropout={lora['dropout']:g} on {lora['modules']} "
             f"linear layers: {lora['parameters']:,} parameters (float32, {_g(lora['bytes'])} GiB)"]
    for name, b in m["branches"].items():
        lines.append(f"  {name:5s} {b['family']}: {b['encoder_params']:,} parameters ({_g(b['encoder_bytes'])} GiB), "
                     f"{b['encoder_tokens']} x {b['encoder_dim']} features -> {b['connector_type']} connector "
                     f"{b['connector_params']:,} parameters (float32) -> {b['llm_tokens']} LLM tokens"
                     + (f"  [{b['note']}]" if b["note"] else ""))
    if p["cpu_master_copy_bytes"]:
        lines.append(f"  CPU: fp32 master copies of the adapted weights (exact folds, docs/merging_precision.md): "
                     f"{_g(p['cpu_master_copy_bytes'])} GiB per process")
    if p["fold_branch_bytes_per_stage"]:
        lines.append(f"  GPU: fold branches (model.folds: branches, docs/merging_precision.md): "
                     f"{_g(p['fold_branch_bytes_per_stage'])} GiB per folded stage, "
                     f"{_g(p['fold_branch_bytes_per_stage'] * p['fold_branch_stages'])} GiB at stage "
                     f"{p['fold_branch_stages']} (not in the peaks below)")
    head = (f"{'phase':30s} {'methods':26s} {'samples':>8s} {'steps':>7s} {'tok':>5s} {'mb/GPU':>6s} "
            f"{'trainable':>10s} {'frozen':>8s} | GiB per GPU: {'weights':>7s} {'grads':>6s} {'AdamW':>6s} "
            f"{'extra':>6s} {'act GC':>7s} {'act':>7s} {'peak':>7s}")
    lines += ["", f"phases (per seed{'; x ' + str(p['seeds']) + ' seeds' if p['seeds'] > 1 else ''}):", head]
    groups: list[list[str]] = []  # method lists too long for the column: named in a legend below
    for ph in p["phases"]:
        meths = ", ".join(ph["methods"])
        if len(meths) > 26:
            if ph["methods"] not in groups:
                groups.append(ph["methods"])
            meths = f"group {groups.index(ph['methods']) + 1} ({len(ph['methods'])} methods)"
        mem = ph["memory"]
        lines.append(f"{(ph['label'] + ' / ' + ph['phase'])[:30]:30s} {meths:26s} {_n(ph['samples']):>8s} "
                     f"{_n(ph['steps']):>7s} {ph['tokens']:>5d} {ph['micro_per_gpu']:>6d} "
                     f"{_n(sum(ph['trainable'].values())):>10s} {_n(sum(ph['frozen'].values())):>8s} | "
                     f"{'':13s}{_g(mem['weights']):>7s} {_g(mem['gradients']):>6s} {_g(mem['optimizer']):>6s} "
                     f"{_g(mem['extra_state']):>6s} {_g(mem['activations_checkpointing']):>7s} "
                     f"{_g(mem['activations_no_checkpointing']):>7s} {_g(mem['peak']):>7s}")
    for k, g in enumerate(groups, 1):
        lines.append(f"  group {k}: {', '.join(g)}")
    for ph in p["phases"]:
        for note in ph["notes"]:
            line = f"  note: {note}"
            if line not in lines:
                lines.append(line)
    t = p["per_token_activation_bytes"]
    lines += ["", f"activations per token (bytes): one block {t['block']:,} + its LoRA {t['lora_per_block']:,}; "
                  f"whole LLM {t['no_checkpointing']:,} without, {t['checkpointing']:,} with gradient checkpointing "
                  "(formulas: docs/plan.md)",
              "peak (during the phase) = weights + gradients + AdamW + extra state + activations of the config's "
              "choice; between phases every process holds the whole model (all presets); "
              "'act GC' / 'act': with / without gradient checkpointing; 'tok': text + media tokens of the longest "
              "sample; 'mb/GPU': samples per micro-batch on one GPU"]
    return "\n".join(lines)
