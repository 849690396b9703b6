"""What a training phase needs, worked out from the models' configs alone (docs/plan.md): the
models built on PyTorch's ``meta`` device (no weight read), their parameter counts, the bytes of
activations a token costs (:func:`token_bytes`), the optimizer steps of a phase as
:func:`mera.train.loop.train_phase` counts them, and the memory per GPU of a phase under a
distributed preset (single GPU, DDP, FSDP). ``mera plan``
(:mod:`mera.runner.plan`) lays a run config's phases out with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mera.errors import ConfigError, MeraError

GIB = 2**30
PRESET_NAMES = ("single", "ddp", "fsdp")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------- presets
@dataclass
class Preset:
    """How the processes share the work: ``kind`` single | ddp | fsdp, ``gpus`` processes;
    ``wrap`` (FSDP): ``layer`` (TRANSFORMER_BASED_WRAP: one unit per decoder layer) or ``whole``
    (NO_WRAP: the whole model one unit)."""

    name: str
    kind: str
    gpus: int = 1
    wrap: str = ""


def read_preset(name: str | None, gpus: int | None = None, root: Path | None = None) -> Preset:
    """``name``: single, ddp, fsdp (configs/accelerate/<name>.yaml) or the path of an
    accelerate config file (its ``distributed_type`` and ``num_processes``); ``gpus`` overrides
    the number of processes."""
    import yaml

    name = name or "single"
    if name == "single":
        if gpus not in (None, 1):
            raise ConfigError(f"--preset single is one GPU; got --gpus {gpus} (use ddp or fsdp)")
        return Preset("single", "single", 1)
    path = Path(name)
    if name in PRESET_NAMES:
        root = root or Path(__file__).resolve().parents[2]
        path = root / "configs" / "accelerate" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--preset {name}: no such preset or accelerate config file (presets: {', '.join(PRESET_NAMES)})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable accelerate config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not an accelerate config (a YAML mapping is expected)")
    dt = str(raw.get("distributed_type", "NO")).upper()
    kinds = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "NO": "single"}
    if dt not in kinds and dt != "DEEPSPEED":
        raise ConfigError(f"{path}: distributed_type {dt!r} is not planned (known: {', '.join(kinds)})")
    if dt == "DEEPSPEED":  # mera run refuses DeepSpeed (docs/distributed.md): nothing to plan
        raise ConfigError(f"{path}: DeepSpeed is not supported by mera run (docs/distributed.md, \"DeepSpeed "
                          "ZeRO-2: refused, and why\"); plan with ddp or fsdp")
    wrap = ""
    if dt == "FSDP":
        fc = raw.get("fsdp_config") or {}
        strategy = str(fc.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if strategy not in ("FULL_SHARD", "1"):
            raise ConfigError(f"{path}: fsdp_sharding_strategy {strategy!r}; the plan knows FULL_SHARD (the preset's)")
        policy = str(fc.get("fsdp_auto_wrap_policy", "NO_WRAP")).upper()
        if policy not in ("NO_WRAP", "TRANSFORMER_BASED_WRAP"):
            raise ConfigError(f"{path}: fsdp_auto_wrap_policy {policy!r} (mera runs NO_WRAP and TRANSFORMER_BASED_WRAP)")
        wrap = "layer" if policy == "TRANSFORMER_BASED_WRAP" else "whole"
    n = gpus if gpus is not None else int(raw.get("num_processes") or 1)
    if n < 1:
        raise ConfigError(f"--gpus must be >= 1, got {n}")
    return Preset(path.stem if name not in PRESET_NAMES else name, kinds[dt], n, wrap)


# ---------------------------------------------------------------------------------------- models
@dataclass
class Branch:
    modality: str
    family: str
    encoder_params: int
    encoder_bytes: int
    encoder_tokens: int  # feature tokens per sample
    encoder_dim: int
    connector_type: str
    connector_params: int  # fp32
    llm_tokens: int  # tokens the connector puts into the LLM per sample
    connector_act: int  # bytes of activations the connector saves per sample (fp32)
    note: str = ""


@dataclass
class Shapes:
    """What the plan knows of the models (all built on the meta device)."""

    llm_name: str
    dtype: str
    llm_params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width (kv heads x head dim)
    q_dim: int  # query width (heads x head dim)
    vocab: int
    lora_rank: int
    lora_dropout: float
    lora_params: int
    lora_modules: int
    lora_in_per_layer: int  # sum of the in-features of the adapted linear layers of one block
    lora_modules_per_layer: int
    target_weight_params: int  # elements of the adapted linear weights (what a fold changes)
    layer_params: int = 0  # the LLM's decoder layers (its _no_split_modules): FSDP's units
    largest_layer_params: int = 0
    branches: dict[str, Branch] = field(default_factory=dict)
    adapted_shapes: dict[tuple[int, int], int] = field(default_factory=dict)  # (in, out) -> adapted layers

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def _meta_llm(path: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.llm: {cfg_file} is missing (the plan reads the LLM's config.json; no weights)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{cfg_file}: not a transformers model config ({e})") from None
    with torch.device("meta"):
        try:
            llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as e:
            raise ConfigError(f"{cfg_file}: no causal LM for this config ({e})") from None
    return config, llm


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _meta_encoder(family: str, path: str | None, options: dict) -> tuple[nn.Module, str]:
    """An encoder of ``family`` built on the meta device from its config (no weights), and a note
    on what was assumed. Families without a meta builder here are loaded for real (said so)."""
    opts = dict(options or {})
    dtype = getattr(torch, opts.pop("dtype"), None) if opts.get("dtype") else None
    note = ""
    if family in ("hf_clip", "hf_clip_video"):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from mera.model.encoders.clip import ClipVisionEncoder

        if not path or not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{family}: {path}/config.json is missing (the plan reads the CLIP config; no weights)")
        vcfg = CLIPVisionConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            image = ClipVisionEncoder(CLIPVisionModel(vcfg), None, opts.get("feature_layer", -2))
        enc = image
        if family == "hf_clip_video":
            from mera.model.encoders.clip_video import ClipVideoEncoder

            enc = ClipVideoEncoder(image, frames=opts.get("frames", 4), pool=opts.get("pool", 2))
    elif family == "beats":
        from mera.model.encoders.beats import BEATsConfig, BEATsEncoder

        cfg, note = _beats_config(path, opts)
        with torch.device("meta"):
            enc = BEATsEncoder(BEATsConfig.from_dict(cfg, "beats config"), max_seconds=opts.get("max_seconds", 10.0))
    elif family == "point_bert":
        from dataclasses import fields

        from mera.model.encoders.point_bert import PointBertConfig, PointBertEncoder

        known = {f.name for f in fields(PointBertConfig)}
        with torch.device("meta"):
            enc = PointBertEncoder(PointBertConfig(**{k: v for k, v in opts.items() if k in known}),
                                   num_points=opts.get("num_points", 8192))
    elif family == "hf_ast":
        from transformers import ASTConfig, ASTModel

        if not path or not (Path(path) / "config.json").is_file():
            raise ConfigError(f"hf_ast: {path}/config.json is missing (the plan reads the AST config; no weights)")
        from mera.model.encoders.ast import ASTAudioEncoder

        acfg = ASTConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            enc = ASTAudioEncoder(ASTModel(acfg), keep_special_tokens=opts.get("keep_special_tokens", False))
    else:  # the toy encoders (kilobytes) and plug-in families: loaded as a run loads them
        from mera.model.encoders.base import load_encoder

        enc = load_encoder(family, path, **options)
        dtype = None
        if not family.startswith("toy_"):
            note = "loaded (no meta builder for this family)"
    if dtype is not None:
        enc = enc.to(dtype)
    return enc, note


def _beats_config(path: str | None, opts: dict) -> tuple[dict, str]:
    """The BEATs cfg: config.json beside a converted checkpoint, or the ``cfg`` entry of the official
    ``.pt`` (memory-mapped: its weights are not read), else BEATs' defaults (iter3+ AS2M's sizes)."""
    if opts.get("config"):
        return dict(opts["config"]), ""
    p = Path(path) if path else None
    if p is not None and p.is_dir():
        if (p / "config.json").is_file():
            raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
            return (raw["cfg"] if isinstance(raw.get("cfg"), dict) else {k: v for k, v in raw.items() if k != "family"}), ""
        pts = sorted(p.glob("*.pt"))
        p = pts[0] if pts else None
    if p is not None and p.is_file() and p.suffix == ".pt":
        try:
            ck = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            return dict(ck.get("cfg") or {}), ""
        except Exception as e:  # noqa: BLE001 - any unreadable file: the defaults, said so
            return {}, f"BEATs defaults assumed ({p} unreadable: {type(e).__name__})"
    return {}, "BEATs defaults assumed (no config.json or .pt found)"


def _meta_connector(conn_cfg, in_dim: int, out_dim: int) -> nn.Module:
    from mera.model.connectors import QFormerConnector, build_connector

    if conn_cfg.type == "qformer" and conn_cfg.init_from:  # the BERT folder's config.json gives the sizes
        from transformers import BertConfig

        folder = Path(conn_cfg.init_from)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"qformer init_from: {folder}/config.json is missing (the plan reads the BERT config)")
        bert = BertConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            return QFormerConnector(in_dim, out_dim, QFormerConnector.make_config(conn_cfg, in_dim, bert),
                                    conn_cfg.num_queries)
    with torch.device("meta"):
        return build_connector(conn_cfg, in_dim, out_dim)


def _connector_act(conn: nn.Module, in_tokens: int) -> int:
    """Bytes (fp32) a connector saves for its backward per sample. An MLP saves the input of every
    Linear and of every GELU: ``4 * T * (D + 2 * sum(hidden))``. A Q-Former (Q queries, width d,
    L layers, cross-attention to T features every k-th layer): about ``4 * (L * 12 * Q * d +
    (L / k) * 2 * T * d)`` (its queries' activations and the features' keys and values)."""
    from mera.model.connectors import MLPConnector, QFormerConnector

    if isinstance(conn, MLPConnector):
        lins = [m for m in conn if isinstance(m, nn.Linear)]
        return 4 * in_tokens * (lins[0].in_features + 2 * sum(m.out_features for m in lins[:-1]))
    if isinstance(conn, QFormerConnector):
        c = conn.qformer.config
        cross = math.ceil(c.num_hidden_layers / max(1, c.cross_attention_frequency))
        return 4 * (c.num_hidden_layers * 12 * conn.num_queries * c.hidden_size + cross * 2 * in_tokens * c.hidden_size)
    return 4 * in_tokens * sum(p.shape[-1] for p in conn.parameters() if p.dim() == 2)  # rough: a plug-in connector


def build_shapes(cfg, config_dir: str | Path, resolve=None) -> Shapes:
    """Every model of ``cfg`` on the meta device (``resolve``: path -> absolute path, as the run's)."""
    from peft import LoraConfig, get_peft_model

    resolve = resolve or (lambda p: str(p if Path(p).is_absolute() else Path(config_dir) / p))
    dtype = getattr(torch, cfg.model.dtype)
    llm_path = resolve(cfg.model.llm)
    config, llm = _meta_llm(llm_path, dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    llm_params = _count(llm)
    # the decoder layers, as mera.train.fsdp wraps them (TRANSFORMER_BASED_WRAP: the LLM's _no_split_modules)
    unit_names = {n for m in llm.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    units = [_count(m) for m in llm.modules() if type(m).__name__ in unit_names]
    lora = cfg.train.lora
    with torch.device("meta"):
        peft = get_peft_model(llm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                              target_modules=lora.target_modules, bias="none"))
    from peft.tuners.lora import LoraLayer

    adapted = [m for m in peft.modules() if isinstance(m, LoraLayer)]
    lora_params = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    layers = int(text.num_hidden_layers)
    in_sum = sum(m.base_layer.in_features for m in adapted)
    target_weights = sum(m.base_layer.weight.numel() for m in adapted)
    hidden = int(text.hidden_size)
    shapes = Shapes(llm_name=Path(llm_path).name, dtype=cfg.model.dtype, llm_params=llm_params, layers=layers,
                    hidden=hidden, intermediate=int(getattr(text, "intermediate_size", 4 * hidden)), heads=heads,
                    kv_dim=kv_heads * head_dim, q_dim=heads * head_dim, vocab=int(text.vocab_size),
                    lora_rank=lora.r, lora_dropout=lora.dropout, lora_params=lora_params,
                    lora_modules=len(adapted), lora_in_per_layer=in_sum // max(1, layers),
                    lora_modules_per_layer=len(adapted) // max(1, layers), target_weight_params=target_weights,
                    layer_params=sum(units), largest_layer_params=max(units, default=0))
    for m in adapted:
        key = (m.base_layer.in_features, m.base_layer.out_features)
        shapes.adapted_shapes[key] = shapes.adapted_shapes.get(key, 0) + 1
    for m, b in cfg.model.branches.items():
        path = resolve(b.encoder.path) if b.encoder.path else None
        try:
            enc, note = _meta_encoder(b.encoder.family, path, b.encoder.options)
        except MeraError as e:
            raise type(e)(f"model.branches.{m}.encoder: {e}") from None
        conn_cfg = b.connector
        if conn_cfg.type == "qformer" and conn_cfg.init_from:
            conn_cfg = conn_cfg.model_copy(update={"init_from": resolve(conn_cfg.init_from)})
        conn = _meta_connector(conn_cfg, int(enc.output_dim), hidden)
        t_in = int(enc.num_tokens)
        shapes.branches[m] = Branch(m, b.encoder.family, _count(enc), _bytes(enc), t_in, int(enc.output_dim),
                                    b.connector.type, _count(conn), int(conn.num_tokens(t_in)), _connector_act(conn, t_in),
                                    note)
    return shapes


# ---------------------------------------------------------------------------------------- formulas
def layer_bytes(s: Shapes, mask_bytes: int = 1) -> tuple[int, int]:
    """Bytes one decoder block saves for its backward, per token: (the frozen block, its LoRA).

    Block (model dtype, ``b`` bytes; RMSNorm computes in fp32): two RMSNorms ``2 * (4h + 4)`` (their
    fp32 input and 1/rms), attention ``b * (2 q_dim + 2 kv_dim) + 4 * heads`` (q, k, v, the output,
    the log-sum-exp of a fused kernel; no seq x seq matrix), MLP ``3 b I`` (gate, act(gate), up).
    The frozen linear layers save no input. LoRA (fp32 adapter): each adapted layer saves its input
    cast to fp32 (``4 * in``), the dropout mask (``mask_bytes * in``, when dropout > 0: 1 on a GPU,
    4 on the CPU) and the rank-r bottleneck (``4 r``)."""
    b = s.dtype_bytes
    block = 2 * (4 * s.hidden + 4) + b * (2 * s.q_dim + 2 * s.kv_dim) + 4 * s.heads + 3 * b * s.intermediate
    per_in = 4 + (mask_bytes if s.lora_dropout > 0 else 0)
    lora = per_in * s.lora_in_per_layer + 4 * s.lora_rank * s.lora_modules_per_layer
    return block, lora


def token_bytes(s: Shapes, *, lora: int, checkpointing: bool, mask_bytes: int = 1) -> int:
    """Peak activation bytes per token of a training micro-batch (see docs/plan.md):

    - without checkpointing: ``L * (block + lora) + tail + 8 V``
    - with checkpointing: ``L * b * h + max(tail + 8 V, block + lora + 4 b * max(h, I))``

    ``tail`` = the final norm (``4h + 4``) and the fp32 log-softmax the loss saves (``4 V``); ``8 V``:
    the fp32 gradients of the logits in the loss's backward (the peak of a phase without
    checkpointing is at the start of the backward pass). With checkpointing every block keeps its
    input (``b h``) and one block at a time is recomputed, with its gradients in flight. ``lora``: the
    number of LoRA-sized adapters on the path (0: the LLM frozen, as in align and realign)."""
    block, extra = layer_bytes(s, mask_bytes)
    extra *= lora
    tail = 4 * s.hidden + 4 + 4 * s.vocab
    if not checkpointing:
        return s.layers * (block + extra) + tail + 8 * s.vocab
    b = s.dtype_bytes
    return s.layers * b * s.hidden + max(tail + 8 * s.vocab, block + extra + 4 * b * max(s.hidden, s.intermediate))


def optimizer_steps(n: int | None, batch_size: int, micro_batch_size: int | None, epochs: float) -> int | None:
    """Optimizer steps of a phase on ``n`` samples, as mera.train.loop.train_phase counts them."""
    if n is None:
        return None
    if n == 0:
        return 0
    micro = min(micro_batch_size or batch_size, batch_size)
    accum = max(1, batch_size // micro)
    total_micro = max(1, int(round(math.ceil(n / micro) * epochs)))
    return math.ceil(total_micro / accum)


# ---------------------------------------------------------------------------------------- phases
@dataclass
class Phase:
    label: str  # e.g. "expert image", "sequential s2 video"
    phase: str  # align | instruct | realign
    methods: list[str]
    samples: int | None
    steps: int | None
    micro_per_gpu: int
    tokens: int  # the longest sample: text tokens + media tokens
    media: list[str]  # modalities of the samples (their connectors' activations)
    lora_copies: int  # LoRA-sized adapters on the activations' path (0: none; PathWeave: its path's adapters)
    trainable: dict[str, int]  # part -> parameters
    trainable_bytes: int
    frozen: dict[str, int]
    frozen_bytes: int
    extra_state_bytes: int = 0  # a strategy's tensors on the GPU during the phase (EWC: Fisher, anchor)
    memory: dict[str, int] = field(default_factory=dict)  # bytes per GPU
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        d = asdict(self)
        d.pop("methods")
        return json.dumps(d, sort_keys=True)


def memory_per_gpu(ph: Phase, s: Shapes, preset: Preset, checkpointing: bool, mask_bytes: int = 1) -> dict[str, int]:
    """Bytes per GPU during a phase (see docs/plan.md): weights, gradients, AdamW, extra state,
    activations. (Between phases every process holds the whole model under every preset.)"""
    n = preset.gpus
    weights = ph.frozen_bytes + ph.trainable_bytes
    grads = ph.trainable_bytes  # gradients in the parameters' dtype
    optim = 2 * ph.trainable_bytes  # AdamW's exp_avg and exp_avg_sq, in the parameters' dtype
    if preset.kind == "ddp":
        grads *= 2  # DDP's reducer keeps its gradient buckets beside the gradients
    elif preset.kind == "fsdp":  # sharded over the processes
        grads, optim = math.ceil(grads / n), math.ceil(optim / n)
    if preset.kind == "fsdp" and preset.wrap == "layer":
        # one FSDP unit per decoder layer (mera.train.fsdp): the layers (with their LoRA) are sharded
        # and gathered one at a time (two with the next one prefetched); the rest (embeddings, head,
        # encoders, connectors) is the root unit, whole. (NO_WRAP: one unit, gathered whole.)
        b = s.dtype_bytes
        lora_share = s.lora_params * 4 * ph.lora_copies // max(1, s.layers) if ph.lora_copies else 0
        layer = s.largest_layer_params * b + lora_share
        in_layers = s.layer_params * b + lora_share * s.layers
        weights = weights - in_layers + math.ceil(in_layers / n) + 2 * layer
    media = max((s.branches[m].connector_act for m in ph.media), default=0)
    acts = {gc: ph.micro_per_gpu * (ph.tokens * token_bytes(s, lora=ph.lora_copies, checkpointing=gc,
                                                              mask_bytes=mask_bytes) + media)
            for gc in (False, True)}
    fixed = weights + grads + optim + ph.extra_state_bytes
    return {"weights": weights, "gradients": grads, "optimizer": optim, "extra_state": ph.extra_state_bytes,
            "activations_checkpointing": acts[True], "activations_no_checkpointing": acts[False],
            "peak": fixed + acts[checkpointing], "peak_other_choice": fixed + acts[not checkpointing]}
