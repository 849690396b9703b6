"""GPU check: mera's own code paths at the paper's real sizes on one GPU, with random weights (no
download), measured against the paper's Table 3.

    python benchmarks/gpu_check.py                          # one H100/H200-class GPU: a few minutes
    python benchmarks/gpu_check.py --json gpu_check.json    # also write the results as JSON
    python benchmarks/gpu_check.py --only infer --only fold # some parts only
    python benchmarks/gpu_check.py --tiny                   # the same script on the CPU at toy sizes (CI)

Sizes (random weights, built from configs): a Llama-3-8B-shaped LLM in bfloat16 (hidden 4096, 32
layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256); CLIP ViT-L/14-336 (576 tokens of
1024, bfloat16) + LLaVA-1.5's MLP; BEATs iter3+ (10 s -> 496 tokens of 768) + a bert-base-sized
Q-Former (32 queries); Point-BERT v1.2 (8192 points -> 513 tokens of 384) + PointLLM's 3-layer MLP;
LoRA r 128 (alpha 128) on every linear module; micro-batches of 4 with gradient checkpointing, the
encoders run inside every step (configs/paper: ``cache_features: false``). Samples are real media
files (PNG, WAV, .npy) of random content read through mera's data pipeline; the texts come from the
toy tokenizer's words (the real tokenizer is not downloaded): a prompt and an answer of 40 words.

Parts (each short: a warm-up call, then a few measured steps, ``torch.cuda.synchronize`` around
every timing, peak memory reset per part; an out-of-memory or other error is reported for its part
and the others still run):

  align      step A: the image connector through the frozen LLM (mera.train.loop.train_phase)
  instruct   step B: the image connector + a fresh LoRA (mera.train.lora, PEFT)
  fold       MERA's merge: the CMA rule (mera.continual.merges.cma) folding a LoRA r128 delta
             (coefficient 1/2, as at stage 2) into the LLM (mera.continual.deltas.Delta.fold)
  realign    every connector (image, audio, point) on a batch mixing the three, LLM frozen
  pathweave  step B of PathWeave (mera.continual.strategies.pathweave) at stage 2: the image
             expert's LoRA as adapter 0, the point path's adapter, in-adapters and gate
  infer      ms per generated token at batch 1 (mera.eval.profile.profile_inference: greedy,
             fixed length, prefill included), prompts of image, point and audio in turn: the merged
             model vs PathWeave after 3 modalities (the paper's Table 3: its final model, after 4)
  eval       evaluation throughput (mera.eval.evaluate.generate_answers) at batch 1 vs 32

A part that needs an earlier one's result builds it when that part did not run (``--only``): a
random LoRA delta of the right shape instead of the trained one.

Prints one line per part and a table beside the paper's figures; ``--json PATH`` writes everything.
Exit status 1 if any part failed (its error is in the table and the JSON).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

try:
    import mera  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamings (gradient checkpointing)

# The paper's Table 3 (one RTX A6000 48G, fp16, 4 modalities; METHOD.md section 6), copied here:
# the project never reads the specs at run time.
PAPER = {
    "train_gpu_hours": {"Fine-Tuning": 53, "MERA (1%)": 54, "MERA (10%)": 61, "PathWeave": 81},
    "train_peak_gb_batch4": 37.43,
    "infer_peak_gb": {"merged": 17.71, "PathWeave": 20.32},
    "infer_ms_per_token": {"merged": 34.0, "PathWeave": 111.0},
}

PARTS = ("align", "instruct", "fold", "realign", "pathweave", "infer", "eval")

FULL = {
    "llm": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False),
    "clip": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, projection_dim=768),
    "image_hw": (360, 480),  # the files' size (padded to a square and resized to 336 by the processor)
    "beats": {},  # BEATsConfig's defaults are the real iter3+ AS2M model's
    "audio_seconds": 10.0,
    "point": {},  # PointBertConfig's defaults are PointLLM v1.2's
    "num_points": 8192,
    "qformer": dict(num_queries=32, qformer_hidden=768, qformer_layers=12, qformer_heads=12,
                    qformer_intermediate=3072, cross_attention_frequency=2),
    "point_mlp": dict(depth=3, hidden_sizes=[1024, 2048]),
    "lora": dict(r=128, alpha=128.0, dropout=0.05),
    "micro": 4, "warmup": 1, "steps": 4, "answer_words": 40,
    "new_tokens": 32, "infer_prompts": 2, "eval_samples": 32, "eval_batch": 32,
}

TINY = {
    "llm": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
    "clip": dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=16),
    "image_hw": (24, 32),
    "beats": dict(embed_dim=32, encoder_embed_dim=64, encoder_layers=2, encoder_attention_heads=4,
                  encoder_ffn_embed_dim=128),
    "audio_seconds": 1.0,
    "point": dict(trans_dim=32, depth=2, num_heads=4, num_group=16, group_size=8, encoder_dims=32),
    "num_points": 256,
    "qformer": dict(num_queries=4, qformer_hidden=32, qformer_layers=2, qformer_heads=4, qformer_intermediate=64,
                    cross_attention_frequency=2),
    "point_mlp": dict(depth=3, hidden_sizes=[40, 56]),
    "lora": dict(r=8, alpha=16.0, dropout=0.05),
    "micro": 4, "warmup": 1, "steps": 2, "answer_words": 12,
    "new_tokens": 6, "infer_prompts": 2, "eval_samples": 32, "eval_batch": 32,
}

MODALITIES = ("image", "audio", "point")
LR = {"align": 1e-3, "instruct": 2e-5, "lora": 2e-4, "realign": 2e-5}  # the paper's recipe


class Check:
    """The model, its data and what the parts leave for each other."""

    def __init__(self, sizes: dict, device: torch.device, dtype: torch.dtype, grad_ckpt: bool, workdir: Path):
        self.sizes, self.device, self.dtype, self.grad_ckpt = sizes, device, dtype, grad_ckpt
        self.workdir = workdir
        # the instruct part's LoRA delta (adapter 0 of PathWeave) and the pathweave part's modules, kept on
        # the CPU between parts so that they add nothing to another part's device memory
        self.delta = None
        self.folded = False  # whether the LLM holds W + delta (the image expert)
        self.pathweave = None  # (layout, tensors) of the trained PathWeave modules
        self.build()

    # ------------------------------------------------------------------ building
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def build(self) -> None:
        from transformers import AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

        from mera.data.pipeline import FeatureProvider
        from mera.data.toy_world import vocabulary
        from mera.model.connectors import ConnectorConfig, build_connector
        from mera.model.encoders.beats import BEATsConfig, BEATsEncoder
        from mera.model.encoders.clip import ClipVisionEncoder
        from mera.model.encoders.point_bert import PointBertConfig, PointBertEncoder
        from mera.model.mllm import MultimodalLM
        from mera.zoo.tokenizer import build_tokenizer

        s, dev = self.sizes, self.device
        t0 = time.perf_counter()
        self.words = [w for w in vocabulary() if w.isalpha()]
        tok = build_tokenizer(vocabulary())
        self.tok = tok
        llm_cfg = LlamaConfig(**{**s["llm"], "vocab_size": max(s["llm"]["vocab_size"], len(tok))},
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device(dev):  # random weights made where they live (8B parameters: no CPU round trip)
            llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=self.dtype)
        llm.requires_grad_(False)  # as mera.continual.assets.Assets.base_model
        self.model = MultimodalLM(llm, tok)
        torch.manual_seed(1)
        clip_cfg = CLIPVisionConfig(**s["clip"])
        size = clip_cfg.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        with torch.device(dev):
            clip = ClipVisionEncoder(CLIPVisionModel(clip_cfg).to(self.dtype), processor)  # configs/paper: bf16 CLIP
        torch.manual_seed(2)
        beats = BEATsEncoder(BEATsConfig(**s["beats"]), max_seconds=s["audio_seconds"]).to(dev)
        torch.manual_seed(3)
        point = PointBertEncoder(PointBertConfig(**s["point"]), num_points=s["num_points"]).to(dev)
        self.encoders = {"image": clip, "audio": beats, "point": point}
        connectors = {"image": ConnectorConfig(type="mlp", depth=2),
                      "audio": ConnectorConfig(type="qformer", **s["qformer"]),
                      "point": ConnectorConfig(type="mlp", **s["point_mlp"])}
        hidden = self.model.hidden_size
        for k, m in enumerate(MODALITIES):
            torch.manual_seed(10 + k)
            conn = build_connector(connectors[m], self.encoders[m].output_dim, hidden).to(dev)  # fp32, as mera
            self.model.add_branch(m, self.encoders[m], conn)
        # encoders run inside every step (configs/paper: cache_features false)
        self.provider = FeatureProvider(self.encoders, cache=False, progress=False)
        self.samples = {m: self._samples(m) for m in MODALITIES}
        self.sync()
        self.build_seconds = time.perf_counter() - t0
        self.llm_params_m = sum(p.numel() for p in llm.parameters()) / 1e6

    def _samples(self, modality: str) -> list:
        """Real media files (random content) and mera Samples pointing at them."""
        from mera import PLACEHOLDERS
        from mera.data.format import Sample
        from mera.data.media import write_audio, write_image, write_points

        s = self.sizes
        rng = np.random.default_rng(MODALITIES.index(modality))
        folder = self.workdir / modality
        folder.mkdir(parents=True, exist_ok=True)
        n_files = 4
        files = []
        for i in range(n_files):
            if modality == "image":
                p = folder / f"{i}.png"
                write_image(p, rng.integers(0, 256, (*s["image_hw"], 3), dtype=np.uint8))
            elif modality == "audio":
                p = folder / f"{i}.wav"
                n = int(s["audio_seconds"] * 16000)
                write_audio(p, (np.round(rng.uniform(-0.5, 0.5, n) * 32768) / 32768, 16000))
            else:
                p = folder / f"{i}.npy"
                pts = np.concatenate([rng.normal(size=(s["num_points"], 3)), rng.uniform(size=(s["num_points"], 3))], 1)
                write_points(p, pts.astype(np.float32))
            files.append(str(p))
        need = max(s["micro"] * (s["warmup"] + s["steps"]), s["eval_samples"] + s["eval_batch"])
        out = []
        for i in range(need):
            answer = " ".join(rng.choice(self.words, s["answer_words"]))
            out.append(Sample(id=f"{modality}-{i}", modality=modality, task="caption", media=files[i % n_files],
                              prompt=f"{PLACEHOLDERS[modality]} describe the {modality} .", answer=answer))
        return out

    # ------------------------------------------------------------------ helpers
    def train(self, phase: str, groups: list[dict], samples: list) -> dict:
        """A warm-up call of train_phase, then a measured one (micro-batches of ``micro``, one optimizer
        step each) with the trainable parameters and gradient checkpointing as mera's run_phase sets
        them; tokens are every sequence's tokens, media tokens included."""
        from mera.data.pipeline import ItemDataset
        from mera.eval.profile import PeakMemory
        from mera.model.collate import MultimodalCollator
        from mera.train.loop import train_only, train_phase

        s, model = self.sizes, self.model
        micro = s["micro"]
        train_only(model, groups)
        collate = MultimodalCollator(self.tok, model, train=True)
        warm, meas = samples[:micro * s["warmup"]], samples[micro * s["warmup"]:micro * (s["warmup"] + s["steps"])]

        def run(part):
            return train_phase(model, groups, ItemDataset(part, self.provider), collate, batch_size=micro,
                               micro_batch_size=micro, epochs=1.0, warmup_ratio=0.0, seed=0, desc=f"gpu-check {phase}",
                               progress=False)

        gc_on = self.grad_ckpt and hasattr(model.llm, "gradient_checkpointing_enable")
        if gc_on:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            run(warm)
            tokens = sum(len(collate.encode_sample({"modality": x.modality, "prompt": x.prompt, "answer": x.answer})[0])
                         for x in meas)
            self.sync()
            with PeakMemory(self.device) as pm:
                t0 = time.perf_counter()
                res = run(meas)
                self.sync()
                seconds = time.perf_counter() - t0
        finally:
            if gc_on:
                model.llm.gradient_checkpointing_disable()
            for p in model.parameters():
                p.requires_grad_(False)
        return {"tokens_per_s": tokens / seconds, "samples_per_s": len(meas) / seconds, "seconds": seconds,
                "steps": res.steps, "micro_batch": micro, "tokens_per_sample": tokens / len(meas),
                "peak_mib": pm.peak_mib, "memory_kind": pm.kind,
                "trainable_m": sum(p.numel() for g in groups for p in g["params"]) / 1e6,
                "loss_last": res.losses[-1] if res.losses else None}

    def lora_settings(self):
        from mera.train.lora import LoraSettings

        return LoraSettings(**self.sizes["lora"])

    def need_delta(self):
        """The instruct part's LoRA delta, or (that part not run) a random one of the same shape."""
        if self.delta is None:
            from mera.continual.deltas import Delta

            g = torch.Generator(device="cpu").manual_seed(7)
            r = self.sizes["lora"]["r"]
            pairs = {}
            for name, mod in self.model.llm.named_modules():
                if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                    a = torch.randn(r, mod.in_features, generator=g) / math.sqrt(mod.in_features)
                    b = torch.randn(mod.out_features, r, generator=g) * 1e-3
                    pairs[name] = {"A": a, "B": b, "scaling": self.sizes["lora"]["alpha"] / r}
            self.delta = Delta.lora(pairs)
        return self.delta

    def need_expert(self) -> None:
        """The LLM as the image expert: W + delta (folded whole when the fold part did not do it)."""
        if not self.folded:
            self.need_delta().fold(self.model.llm, 1.0)
            self.folded = True

    def install_pathweave(self, trained: bool, more: tuple[str, ...] = ()):
        """PathWeave at stage 2 through its own strategy: the expert's delta taken back out of the
        weights as adapter 0, then the point path (adapter 1, in-adapters, gate). ``trained``: load the
        pathweave part's modules into it; ``more``: the paths of later stages (untrained: stage 3,
        ...). Returns (strategy, the stage-2 context, its OwnModules)."""
        from mera.config import registry
        from mera.continual.strategies import StageContext
        from mera.continual.strategies.pathweave import install_from_state

        self.need_expert()
        delta = self.need_delta()

        class History:  # the parent chain, as mera.continual.checkpoint.ChainView answers it
            folder = None

            def last_trained(self):
                return delta, 1.0

        strategy = registry.build("strategy", "pathweave")
        ctx = StageContext(model=self.model, order="gpu-check", method="PathWeave", stage=2, modality="point",
                           seen=["image", "point"], seed=2, train=None, data=None, replay=None, batch=None,
                           history=History())
        torch.manual_seed(4)
        own = strategy.adapter(ctx)  # folds the delta out: the LLM is W again
        self.folded = False
        if trained and self.pathweave is not None:
            layout, tensors = self.pathweave
            self.remove_pathweave(refold=False)
            install_from_state(self.model.llm, layout, tensors, route=self.model.batch_modalities)
        seen = ["image", "point"]
        for stage, m in enumerate(more, 3):
            seen.append(m)
            strategy.adapter(StageContext(model=self.model, order="gpu-check", method="PathWeave", stage=stage,
                                          modality=m, seen=list(seen), seed=stage, train=None, data=None,
                                          replay=None, batch=None, history=History()))
        return strategy, ctx, own

    def remove_pathweave(self, refold: bool = True) -> None:
        """The plain LLM again (each wrapper replaced by its base Linear), the expert's delta folded back."""
        from mera.continual.strategies.pathweave import wrapped_modules

        llm = self.model.llm
        for name, m in wrapped_modules(llm).items():
            parent, _, attr = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, attr, m.base)
        if refold and not self.folded:
            self.need_delta().fold(llm, 1.0)
            self.folded = True

    def prompts(self) -> list:
        """Prompts of every modality, in turn (the first len(MODALITIES) warm each one up)."""
        n = self.sizes["infer_prompts"]
        return [s for group in zip(*(self.samples[m][-n:] for m in MODALITIES)) for s in group]


def on_device(delta, device: torch.device):
    """``delta`` with its LoRA pairs on ``device``."""
    from mera.continual.deltas import Delta

    return Delta.lora({n: {"A": d["A"].to(device), "B": d["B"].to(device), "scaling": d["scaling"]}
                       for n, d in delta.modules.items()})


def allocated_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------- the parts
def part_align(c: Check) -> dict:
    return c.train("align", [{"params": c.model.connector_parameters("image"), "lr": LR["align"]}],
                   c.samples["image"])


def part_instruct(c: Check) -> dict:
    from mera.continual.deltas import Delta
    from mera.train.lora import attach_lora, detach_lora, extract_lora, lora_parameters

    if c.folded:  # the instruct step trains from the base LLM here (its delta is the image expert's)
        c.need_delta().fold(c.model.llm, -1.0)
        c.folded = False
    model = c.model
    model.llm = attach_lora(model.llm, c.lora_settings(), seed=5)
    try:
        groups = [{"params": model.connector_parameters("image"), "lr": LR["instruct"]},
                  {"params": list(lora_parameters(model.llm).values()), "lr": LR["lora"]}]
        out = c.train("instruct", groups, c.samples["image"])
        c.delta = on_device(Delta.lora(extract_lora(model.llm)), torch.device("cpu"))
    finally:
        model.llm = detach_lora(model.llm)
    out["lora_r"] = c.sizes["lora"]["r"]
    return out


def part_fold(c: Check) -> dict:
    from mera.config import registry
    from mera.eval.profile import PeakMemory

    if c.folded:
        c.need_delta().fold(c.model.llm, -1.0)
        c.folded = False
    delta = on_device(c.need_delta(), c.device)  # as in a run: the delta step B just trained, on its device
    base = allocated_mib(c.device)
    rule = registry.build("merge", "cma")
    merged = rule.merge(delta, [delta], 2)  # stage 2: [(delta, 1/2)]
    times = []
    c.sync()
    with PeakMemory(c.device) as pm:
        for _ in range(2):  # two halves: the LLM ends as W + delta, the image expert
            t0 = time.perf_counter()
            for d, coef in merged:
                d.fold(c.model.llm, coef)
            c.sync()
            times.append(time.perf_counter() - t0)
    c.folded = True
    return {"seconds": min(times), "seconds_each": times, "coef": merged[0][1], "modules": len(delta.modules),
            "rank": c.sizes["lora"]["r"], "peak_mib": pm.peak_mib, "memory_kind": pm.kind,
            "peak_extra_mib": None if base is None else pm.peak_mib - base}


def part_realign(c: Check) -> dict:
    mixed = [s for trio in zip(*(c.samples[m] for m in MODALITIES)) for s in trio]
    return c.train("realign", [{"params": c.model.connector_parameters(), "lr": LR["realign"]}], mixed)


def part_pathweave(c: Check) -> dict:
    strategy, ctx, own = c.install_pathweave(trained=False)
    try:
        groups = [{"params": c.model.connector_parameters("point"), "lr": LR["instruct"]},
                  {"params": own.params, "lr": LR["lora"]}]
        out = c.train("pathweave", groups, c.samples["point"])
        strategy.after_instruct(ctx)
        c.pathweave = (ctx.llm_modules, {k: v.cpu() for k, v in ctx.tensors.items()})
        out["modules"] = ctx.log["pathweave"]["modules"]
        out["adapters"] = ctx.log["pathweave"]["adapters"]
    finally:
        c.remove_pathweave()
    return out


def part_infer(c: Check) -> dict:
    from mera.eval.profile import profile_inference

    n = c.sizes["new_tokens"]
    c.need_expert()
    warm = len(MODALITIES)
    merged = profile_inference(c.model, c.tok, c.prompts(), c.provider, new_tokens=n, warmup=warm)
    c.install_pathweave(trained=True, more=("audio",))  # the paths of image, point and audio
    try:
        pw = profile_inference(c.model, c.tok, c.prompts(), c.provider, new_tokens=n, warmup=warm)
    finally:
        c.remove_pathweave()
    return {"merged": merged, "pathweave": pw, "new_tokens": n, "batch": 1, "modalities": list(MODALITIES),
            "ratio_ms_per_token": pw["ms_per_token"] / merged["ms_per_token"],
            "ratio_peak": pw["peak_mib"] / merged["peak_mib"] if merged["peak_mib"] else None}


def part_eval(c: Check) -> dict:
    from mera.eval.evaluate import generate_answers

    s = c.sizes
    c.need_expert()
    samples = c.samples["image"][:s["eval_samples"]]
    warm = c.samples["image"][s["eval_samples"]:s["eval_samples"] + s["eval_batch"]]
    out = {"samples": len(samples), "max_new_tokens": s["new_tokens"]}
    for b in (1, s["eval_batch"]):
        generate_answers(c.model, c.tok, warm[:b], c.provider, b, s["new_tokens"], progress=False)  # warm-up
        c.sync()
        t0 = time.perf_counter()
        generate_answers(c.model, c.tok, samples, c.provider, b, s["new_tokens"], progress=False)
        c.sync()
        seconds = time.perf_counter() - t0
        out[f"batch_{b}"] = {"seconds": seconds, "samples_per_s": len(samples) / seconds}
    out["speedup_per_sample"] = out[f"batch_{s['eval_batch']}"]["samples_per_s"] / out["batch_1"]["samples_per_s"]
    return out


FUNCS = {"align": part_align, "instruct": part_instruct, "fold": part_fold, "realign": part_realign,
         "pathweave": part_pathweave, "infer": part_infer, "eval": part_eval}


# ---------------------------------------------------------------------- running and reporting
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_part(c: Check, name: str) -> dict:
    if c.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(c.device)
    t0 = time.perf_counter()
    try:
        out = FUNCS[name](c)
    except Exception as e:  # one part's failure is reported; the others still run
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out = {"error": f"{'out of memory' if _is_oom(e) else type(e).__name__}: {first[:300]}"}
        if not _is_oom(e):
            traceback.print_exc(file=sys.stderr)
        gc.collect()
        if c.device.type == "cuda":
            torch.cuda.empty_cache()
    out["wall_s"] = time.perf_counter() - t0
    return out


def _gib(mib):
    return None if mib is None else mib / 1024


def comparison(results: dict) -> list[dict]:
    """Our figures beside the paper's (where the paper has one)."""
    rows = []
    ins, pw, inf = results.get("instruct", {}), results.get("pathweave", {}), results.get("infer", {})
    if "peak_mib" in ins:
        rows.append({"what": f"train peak memory, step B + LoRA, micro-batch {ins['micro_batch']} (GiB) [1]",
                     "ours": _gib(ins["peak_mib"]), "paper": PAPER["train_peak_gb_batch4"]})
    if "tokens_per_s" in ins and "tokens_per_s" in pw:
        h = PAPER["train_gpu_hours"]
        rows.append({"what": "train time PathWeave / LoRA fine-tuning [2]", "ours": ins["tokens_per_s"] / pw["tokens_per_s"],
                     "paper": h["PathWeave"] / h["Fine-Tuning"]})
    if "merged" in inf:
        m, p = inf["merged"], inf["pathweave"]
        ms, gb = PAPER["infer_ms_per_token"], PAPER["infer_peak_gb"]
        rows += [{"what": "inference ms/token, merged model (MERA), batch 1", "ours": m["ms_per_token"],
                  "paper": ms["merged"]},
                 {"what": "inference ms/token, PathWeave, batch 1", "ours": p["ms_per_token"], "paper": ms["PathWeave"]},
                 {"what": "inference ms/token, PathWeave / merged", "ours": inf["ratio_ms_per_token"],
                  "paper": ms["PathWeave"] / ms["merged"]},
                 {"what": "inference peak memory, merged (GiB) [1]", "ours": _gib(m["peak_mib"]), "paper": gb["merged"]},
                 {"what": "inference peak memory, PathWeave (GiB) [1]", "ours": _gib(p["peak_mib"]),
                  "paper": gb["PathWeave"]},
                 {"what": "inference peak memory, PathWeave / merged", "ours": inf["ratio_peak"],
                  "paper": gb["PathWeave"] / gb["merged"]}]
    return rows


def report(out: dict) -> str:
    n = out["llm_params_m"]
    lines = [f"gpu check ({out['sizes']} sizes) on {out['device_name']}: LLM {n:.{0 if n > 100 else 3}f}M parameters "
             f"({out['dtype']}), built in {out['build_seconds']:.1f} s; gradient checkpointing "
             f"{'on' if out['gradient_checkpointing'] else 'off'}", ""]
    lines.append(f"{'part':10s} {'tokens/s':>10s} {'samples/s':>10s} {'peak MiB':>10s}  other")
    for name, r in out["parts"].items():
        if "error" in r:
            lines.append(f"{name:10s} FAILED: {r['error']}")
            continue
        if "tokens_per_s" in r:
            extra = f"{r['tokens_per_sample']:.0f} tokens/sample, {r['steps']} steps, {r['trainable_m']:.2f}M trained"
            lines.append(f"{name:10s} {r['tokens_per_s']:10.1f} {r['samples_per_s']:10.2f} {r['peak_mib']:10.0f}  {extra}")
        elif name == "fold":
            lines.append(f"{name:10s} {'':>10s} {'':>10s} {r['peak_mib']:10.0f}  {r['seconds']:.3f} s to fold a rank-"
                         f"{r['rank']} delta x {r['coef']} into {r['modules']} modules")
        elif name == "infer":
            m, p = r["merged"], r["pathweave"]
            lines.append(f"{name:10s} {'':>10s} {'':>10s} {m['peak_mib']:10.0f}  merged {m['ms_per_token']:.2f} ms/token; "
                         f"PathWeave {p['ms_per_token']:.2f} ms/token (peak {p['peak_mib']:.0f} MiB); "
                         f"ratio {r['ratio_ms_per_token']:.2f}")
        elif name == "eval":
            b = [k for k in r if k.startswith("batch_") and k != "batch_1"][0]
            lines.append(f"{name:10s} {'':>10s} {r['batch_1']['samples_per_s']:10.2f} {'':>10s}  batch 1: "
                         f"{r['batch_1']['samples_per_s']:.2f} samples/s; {b.replace('_', ' ')}: "
                         f"{r[b]['samples_per_s']:.2f} samples/s; x{r['speedup_per_sample']:.2f} per sample")
    rows = out["comparison"]
    if rows:
        lines += ["", f"{'beside the paper (Table 3: one RTX A6000 48G, fp16)':62s} {'ours':>10s} {'paper':>10s}"]
        for row in rows:
            ours = "-" if row["ours"] is None else f"{row['ours']:.2f}"
            lines.append(f"{row['what']:62s} {ours:>10s} {row['paper']:10.2f}")
        lines += ["[1] the paper's memory is GB on its card in fp16, ours GiB of this device (CUDA: max allocated; "
                  "CPU: the process's resident memory)",
                  "[2] the paper's: GPU-hours of whole runs through 4 modalities (53 h and 81 h); ours: seconds per "
                  "token of a few steps of step B (LoRA on image, PathWeave's point path at stage 2)"]
    lines.append(f"\ntotal {out['total_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (well under a minute): the CI check")
    ap.add_argument("--device", help="cuda or cpu (default: cuda for the real sizes, cpu with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the LLM's and CLIP's weights (default bfloat16, as configs/paper)")
    ap.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                    help=f"run only this part (repeatable): {', '.join(PARTS)}")
    ap.add_argument("--steps", type=int, help="measured optimizer steps per training part (default 4; --tiny 2)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep the LLM's activations (configs/paper recomputes them)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)

    sizes = dict(TINY if args.tiny else FULL)
    if args.steps:
        sizes["steps"] = max(1, args.steps)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; --tiny runs the check at toy sizes on the CPU "
              "(--device cpu runs the real sizes on the CPU: hours)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 4))
    parts = [p for p in PARTS if not args.only or p in args.only]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mera-gpu-check-") as tmp:
        c = Check(sizes, device, getattr(torch, args.dtype), not args.no_gradient_checkpointing, Path(tmp))
        results = {}
        for name in parts:
            results[name] = run_part(c, name)
            r = results[name]
            print(f"[{name}] {'FAILED: ' + r['error'] if 'error' in r else 'done'} in {r['wall_s']:.1f} s", flush=True)
    out = {"sizes": "tiny" if args.tiny else "full", "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "dtype": args.dtype, "gradient_checkpointing": c.grad_ckpt,
           "llm_params_m": c.llm_params_m, "build_seconds": c.build_seconds, "parts": results,
           "comparison": comparison(results), "paper": PAPER, "total_seconds": time.perf_counter() - t0}
    print()
    print(report(out))
    if args.json:
        from mera.io import write_json

        write_json(args.json, out)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
