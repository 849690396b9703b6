"""Moving models in and out of mera: ``mera import-llava`` and ``mera export``.

``import_llava(LLAVA_DIR, MODEL_DIR)`` splits a transformers ``LlavaForConditionalGeneration``
folder (``save_pretrained`` layout, safetensors) into what a mera run config uses::

    MODEL_DIR/llm/                       the language model alone (plain HF causal LM + tokenizer)
    MODEL_DIR/encoders/image/            the CLIP vision tower (``CLIPVisionModel`` + preprocessor_config.json)
    MODEL_DIR/connectors/image.safetensors   the projector under MLPConnector names (0.*, 2.*)
    MODEL_DIR/import.json                source, key mapping, sizes
    MODEL_DIR/example_config.yaml        the ``model`` section of a run config using it

The image branch then uses ``pretrained_connector``: its expert is the base LLM + that
connector, not trained (LLaVA's stage 1 is already done).

``export_stage(STAGE_DIR, DIR)`` writes a finished stage as a self-contained model::

    DIR/llm/                             the LLM with every delta of the stage chain folded in
    DIR/connectors/<modality>.safetensors
    DIR/manifest.json                    per modality: encoder (family, absolute path, options),
                                         connector config and file; the source stage

and ``load_exported(DIR)`` rebuilds the :class:`~mera.model.mllm.MultimodalLM` from it (what
``mera generate DIR`` uses). Everything is safetensors; nothing is loaded with pickle or
``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


from mera.errors import CheckpointError, ConfigError, MeraError
from mera.io import atomic_path, write_json, write_text

IMPORT_FORMAT = "mera-llava-import-v1"
EXPORT_FORMAT = "mera-export-v1"
SHARD_BYTES = 4 << 30  # LLM shard size when importing

# LLaVA-1.5's conversation format (vicuna_v1), for tokenizers without a chat template that takes
# string contents (mera's collator renders [{"role": "user", "content": "<image>\n..."}]).
LLAVA15_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA15_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}{{ '" + LLAVA15_SYSTEM.replace("'", "\\'") + " ' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is not string %}"
    "{{ raise_exception('LLaVA-1.5 chat template: message content must be a string') }}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('LLaVA-1.5 chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ============================================================================ helpers


def _prepare_out(out: Path, force: bool, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise MeraError(f"{out}: already exists and is not empty; choose another --out or pass --force "
                            f"to replace it with the {what}")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    import torch
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    import torch
    return str(dtype).replace("torch.", "")


# ============================================================================ import-llava

# (prefix in the LLaVA checkpoint, part); the first match wins, so longer prefixes come first.
# Layouts: transformers < 4.52 and >= 5 (on disk) use the first ones, 4.52-4.57 the "model." ones.
_LLAVA_PREFIXES = (
    ("model.vision_tower.", "vision"),
    ("vision_tower.", "vision"),
    ("model.multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "projector"),
    ("language_model.lm_head.", "lm_head"),
    ("lm_head.", "lm_head"),
    ("model.language_model.", "lm"),
    ("language_model.model.", "lm"),
    ("language_model.", "lm"),
)
_PROJECTOR_NAMES = {"linear_1.weight": "0.weight", "linear_1.bias": "0.bias",
                    "linear_2.weight": "2.weight", "linear_2.bias": "2.bias"}


def _classify_llava_key(key: str) -> tuple[str, str, str] | None:
    """``(part, prefix, rest)`` of a LLaVA checkpoint key, or None for a key of no known part."""
    for prefix, part in _LLAVA_PREFIXES:
        if key.startswith(prefix):
            return part, prefix, key[len(prefix):]
    return None


def _llava_weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable safetensors index ({e})") from None
        files = sorted({src / f for f in wmap.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files are missing: {missing[:3]}")
        return files
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    if any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise CheckpointError(f"{src}: only pickle weights (*.bin / *.pt) found; mera reads safetensors only "
                              "(load the model with transformers once and save_pretrained it to get safetensors)")
    raise CheckpointError(f"{src}: no model.safetensors or model.safetensors.index.json")


def _load_llava_config(src: Path):
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (expected a LlavaForConditionalGeneration folder "
                              "saved by save_pretrained)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
    mt = raw.get("model_type") if isinstance(raw, dict) else None
    if mt != "llava":
        raise ConfigError(f"{cfg_file}: model_type is {mt!r}; import-llava supports 'llava' "
                          "(LlavaForConditionalGeneration, LLaVA-1.5 style) only")
    from transformers import LlavaConfig

    try:
        cfg = LlavaConfig.from_pretrained(str(src))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: not a valid LLaVA config ({e})") from None
    problems = []
    vmt = getattr(cfg.vision_config, "model_type", None)
    if vmt != "clip_vision_model":
        problems.append(f"vision tower {vmt!r} (only a CLIP vision tower, clip_vision_model, is supported)")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        problems.append(f"vision_feature_layer {layer!r} (one layer is supported, not a concatenation of several)")
    elif not -(cfg.vision_config.num_hidden_layers + 1) <= layer <= cfg.vision_config.num_hidden_layers:
        problems.append(f"vision_feature_layer {layer} (the tower has {cfg.vision_config.num_hidden_layers} layers)")
    if cfg.vision_feature_select_strategy != "default":
        problems.append(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} "
                        "(only 'default', CLS token dropped, as mera's hf_clip encoder does)")
    if cfg.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {cfg.projector_hidden_act!r} (only 'gelu', as MLPConnector)")
    if problems:
        raise ConfigError(f"{cfg_file}: unsupported LLaVA variant: " + "; ".join(problems))
    return cfg


def _tokenizer_with_template(tok_src: str):
    """The tokenizer of ``tok_src`` and what was done to its chat template (mera renders string contents)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split())  # one line
        raise CheckpointError(f"{tok_src}: cannot load a tokenizer ({msg}); give one with --tokenizer DIR") from None
    probe = "<image>\nzq probe text"
    ok = False
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                           add_generation_prompt=True)
            ok = isinstance(text, str) and text.count(probe) == 1
        except Exception:  # jinja errors of templates that expect list contents
            ok = False
    if ok:
        return tok, "kept (renders string contents)"
    why = "had none" if not getattr(tok, "chat_template", None) else "did not render string contents"
    tok.chat_template = LLAVA15_CHAT_TEMPLATE
    return tok, f"set to LLaVA-1.5's conversation format (the tokenizer's template {why})"


def _image_processor(src: Path):
    if not ((src / "preprocessor_config.json").is_file() or (src / "processor_config.json").is_file()):
        return None, "none in the LLaVA folder (hf_clip uses the CLIP constants)"
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(str(src)), "copied from the LLaVA folder"
    except Exception as e:  # optional: hf_clip falls back to the CLIP constants
        return None, f"not copied: unreadable ({type(e).__name__}: {' '.join(str(e).split())})"


def import_llava(llava_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | None = None,
                 force: bool = False, shard_bytes: int = SHARD_BYTES, log=None) -> dict:
    """Split a LLaVA checkpoint folder into mera's pieces (see the module docstring); returns import.json."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM, CLIPVisionModel, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from mera.zoo.lm import atomic_dir

    log = log or (lambda msg: None)
    src = Path(llava_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder (expected a LLaVA checkpoint folder)")
    if out == src or src in out.parents:
        raise ConfigError(f"{out}: the output folder may not be inside the LLaVA folder")
    _prepare_out(out, force, "imported model")
    cfg = _load_llava_config(src)
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    tmt = getattr(tcfg, "model_type", None)
    if tmt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{src / 'config.json'}: text model {tmt!r} has no causal-LM class in transformers")
    files = _llava_weight_files(src)
    tok_src = str(Path(tokenizer).expanduser().resolve()) if tokenizer else str(src)
    tok, template_note = _tokenizer_with_template(tok_src)  # before the heavy work: fail fast

    # ---- sort every key into its part (reading headers only)
    parts: dict[str, dict[str, tuple[Path, str]]] = {"vision": {}, "projector": {}, "lm": {}, "lm_head": {}}
    prefixes: dict[str, set] = {p: set() for p in parts}
    unknown, sizes = [], {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    c = _classify_llava_key(k)
                    if c is None:
                        unknown.append(k)
                        continue
                    part, prefix, rest = c
                    if rest in parts[part]:
                        raise CheckpointError(f"{src}: two tensors map to {part} {rest!r}")
                    parts[part][rest] = (f, k)
                    prefixes[part].add(prefix)
                    sl = h.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= int(d)
                    sizes[k] = n
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    if unknown:
        raise CheckpointError(f"{src}: tensors of no known LLaVA part (vision_tower, multi_modal_projector, "
                              f"language_model, lm_head): {unknown[:5]}")
    for part in ("vision", "projector", "lm"):
        if not parts[part]:
            raise CheckpointError(f"{src}: the checkpoint has no {part} tensors")

    def read(part: str, rest: str) -> torch.Tensor:
        f, k = parts[part][rest]
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(k)

    notes: list[str] = []
    with atomic_dir(out) as tmp:
        # ---- the vision tower -> CLIPVisionModel
        log("vision tower")
        vision = CLIPVisionModel(vcfg)
        want = vision.state_dict()
        vstate = {}
        for rest in parts["vision"]:
            core = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
            name = core if core in want else f"vision_model.{core}"
            if name not in want:
                if core.endswith("position_ids"):  # a buffer older checkpoints stored
                    continue
                raise CheckpointError(f"{src}: vision tensor {parts['vision'][rest][1]!r} has no place in "
                                      "CLIPVisionModel")
            vstate[name] = read("vision", rest)
        missing = sorted(set(want) - set(vstate))
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise CheckpointError(f"{src}: vision tower weights missing: {missing[:5]}")
        vdtype = next(iter(vstate.values())).dtype
        vision.to(vdtype)
        try:
            vision.load_state_dict(vstate, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"{src}: vision tower weights do not fit its config ({e})") from None
        enc_dir = tmp / "encoders" / "image"
        vision.save_pretrained(str(enc_dir))
        processor, proc_note = _image_processor(src)
        if processor is not None:
            processor.save_pretrained(str(enc_dir))
            crop = getattr(processor, "crop_size", None)
            crop_h = (crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)) if crop else None
            if crop_h is not None and int(crop_h) != int(vcfg.image_size):
                notes.append(f"the image processor crops to {crop_h}, the vision tower expects {vcfg.image_size}")
        n_vision = sum(v.numel() for v in vstate.values())
        del vision, vstate

        # ---- the projector -> MLPConnector (depth 2)
        log("projector")
        proj = {}
        for rest in parts["projector"]:
            if rest not in _PROJECTOR_NAMES:
                raise CheckpointError(f"{src}: projector tensor {parts['projector'][rest][1]!r} is not "
                                      "linear_1 / linear_2 (LLaVA-1.5's mlp2x_gelu)")
            proj[_PROJECTOR_NAMES[rest]] = read("projector", rest).float()
        for k in ("0.weight", "2.weight"):
            if k not in proj:
                raise CheckpointError(f"{src}: projector weight {k} (linear_{1 if k[0] == '0' else 2}) is missing")
        d_in, hidden = int(vcfg.hidden_size), int(tcfg.hidden_size)
        if tuple(proj["0.weight"].shape) != (hidden, d_in) or tuple(proj["2.weight"].shape) != (hidden, hidden):
            raise CheckpointError(f"{src}: projector shapes {tuple(proj['0.weight'].shape)}, "
                                  f"{tuple(proj['2.weight'].shape)} do not fit vision width {d_in} and LLM width "
                                  f"{hidden}")
        for i in ("0", "2"):  # multimodal_projector_bias=False: zero biases are the same map
            proj.setdefault(f"{i}.bias", torch.zeros(hidden))
        _save_tensors(tmp / "connectors" / "image.safetensors", proj)

        # ---- the language model -> a plain causal LM folder, streamed shard by shard
        log("language model")
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        tcfg.tie_word_embeddings = tie
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[tmt]
        tcfg.architectures = [cls_name]
        with torch.device("meta"):
            meta_llm = AutoModelForCausalLM.from_config(tcfg)
        base = meta_llm.base_model_prefix
        want_llm = set(meta_llm.state_dict())
        tied_keys = {"lm_head.weight"} if tie else set()
        del meta_llm
        names = {f"{base}.{rest}": ("lm", rest) for rest in parts["lm"]}
        for rest in parts["lm_head"]:
            if tie:
                notes.append(f"lm_head.{rest} dropped: LLaVA ties the output head to the input embeddings")
                continue
            names[f"lm_head.{rest}"] = ("lm_head", rest)
        rotary = {k for k in set(names) - want_llm if "rotary_emb" in k}
        for k in rotary:  # buffers some old checkpoints stored
            del names[k]
        missing = sorted(want_llm - set(names) - tied_keys)
        extra = sorted(set(names) - want_llm)
        if missing or extra:
            raise CheckpointError(f"{src}: the language model's tensors do not fit {cls_name}: "
                                  f"missing {missing[:4]}, unexpected {extra[:4]}")
        llm_dir = tmp / "llm"
        llm_dir.mkdir(parents=True)
        shards, cur, cur_bytes = [], [], 0
        first_file, first_key = parts["lm"][next(iter(parts["lm"]))]
        with safe_open(str(first_file), "pt") as h:
            elem = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(h.get_slice(first_key).get_dtype(), 4)
        for name, (part, rest) in names.items():
            nbytes = sizes[parts[part][rest][1]] * elem
            if cur and cur_bytes + nbytes > shard_bytes:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append(name)
            cur_bytes += nbytes
        if cur:
            shards.append(cur)
        weight_map, total, n_llm, dtype = {}, 0, 0, None
        for i, shard in enumerate(shards, 1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: read(*names[n]) for n in shard}
            for n, t in tensors.items():
                dtype = dtype or t.dtype
                total += t.numel() * t.element_size()
                n_llm += t.numel() if n not in tied_keys else 0
                weight_map[n] = fname
            _save_tensors(llm_dir / fname, tensors)
            del tensors
        if len(shards) > 1:
            write_json(llm_dir / "model.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        tcfg.dtype = dtype
        tcfg.save_pretrained(str(llm_dir))
        if (src / "generation_config.json").is_file():
            try:
                GenerationConfig.from_pretrained(str(src)).save_pretrained(str(llm_dir))
            except (OSError, ValueError) as e:
                notes.append(f"generation_config.json not copied ({e})")
        else:
            GenerationConfig.from_model_config(tcfg).save_pretrained(str(llm_dir))

        tok.save_pretrained(str(llm_dir))
        image_token = "<image>"
        in_vocab = image_token in tok.get_vocab()

        # ---- import.json and the example config
        layer = int(cfg.vision_feature_layer)
        enc_opts = {} if layer == -2 else {"feature_layer": layer}
        n_tokens = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
        info = {
            "format": IMPORT_FORMAT,
            "source": str(src),
            "source_files": [f.name for f in files],
            "transformers_version": __import__("transformers").__version__,
            "mapping": {
                "vision": {"from": sorted(prefixes["vision"]), "to": "encoders/image (CLIPVisionModel)"},
                "projector": {"from": sorted(prefixes["projector"]),
                              "to": "connectors/image.safetensors (MLPConnector, depth 2)",
                              "names": _PROJECTOR_NAMES,
                              "zero_biases": not bool(cfg.multimodal_projector_bias)},
                "llm": {"from": sorted(prefixes["lm"] | prefixes["lm_head"]),
                        "to": f"llm ({cls_name}: {base}.*, lm_head.*)", "tied_head": tie},
            },
            "vision_feature_layer": layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "sizes": {
                "vision_params": n_vision,
                "projector_params": sum(v.numel() for v in proj.values()),
                "llm_params": n_llm,
                "llm_hidden": hidden,
                "llm_layers": int(tcfg.num_hidden_layers),
                "vocab_size": int(tcfg.vocab_size),
                "feature_dim": d_in,
                "image_tokens": n_tokens,
                "image_size": int(vcfg.image_size),
                "llm_shards": len(shards),
            },
            "dtype": {"llm": _dtype_name(dtype), "vision": _dtype_name(vdtype), "connector": "float32"},
            "tokenizer": {"source": tok_src, "chat_template": template_note, "image_token_in_vocab": in_vocab},
            "image_processor": proc_note,
            "notes": notes,
        }
        write_json(tmp / "import.json", info)
        write_text(tmp / "example_config.yaml", example_config(out, info, enc_opts))
    log(f"imported into {out}")
    return info


def example_config(out: Path, info: dict, enc_opts: dict) -> str:
    import yaml

    dtype = info["dtype"]["llm"]
    branch = {"encoder": {"family": "hf_clip", "path": str(out / "encoders" / "image")},
              "connector": {"type": "mlp"},
              "pretrained_connector": str(out / "connectors" / "image.safetensors")}
    if enc_opts:
        branch["encoder"]["options"] = enc_opts
    model = {"llm": str(out / "llm"),
             "dtype": dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
             "branches": {"image": branch}}
    head = (f"# mera run config snippet for the LLaVA model imported from {info['source']}.\n"
            "# The image branch is LLaVA's own (encoder + projector): its expert is not trained\n"
            "# (pretrained_connector). Add the other modalities' branches, then data, orders and methods.\n"
            "# dtype is the checkpoint's; bfloat16 is the usual choice for training on a GPU.\n")
    return head + yaml.safe_dump({"model": model}, sort_keys=False)


# ============================================================================ export


def find_run_dir(stage: Path) -> Path:
    """The run directory holding the stage folder ``stage`` (the nearest parent with config.yaml)."""
    for p in [stage, *stage.parents][:5]:
        if (p / "config.yaml").is_file():
            return p
    raise CheckpointError(f"{stage}: no run directory with config.yaml above this stage folder")


def _relative_refs(cfg) -> list[str]:
    refs = [cfg.model.llm, cfg.model.tokenizer or ""]
    for b in cfg.model.branches.values():
        refs += [b.encoder.path or "", b.pretrained_connector or ""]
    for p in cfg.data.sets.values():
        refs += [p.caption_train, p.caption_test, p.qa_train, p.qa_test]
    return [r for r in refs if r and not r.startswith("zoo:") and not Path(r).expanduser().is_absolute()]


def guess_config_dir(cfg, run_dir: Path, config_dir: str | os.PathLike | None = None) -> Path:
    """The folder that relative paths of a run's config are relative to: ``config_dir`` when given,
    else the first of (working folder, run folder, its parent) where they all exist."""
    if config_dir is not None:
        return Path(config_dir).resolve()
    refs = _relative_refs(cfg)
    for cand in (Path.cwd(), run_dir, run_dir.parent):
        if all((cand / r).exists() for r in refs):
            return cand.resolve()
    return Path.cwd()


def runner_for(run_dir: Path, config_dir=None, progress: bool = False, data: bool = False):
    """A set-up :class:`~mera.continual.runner.Runner` of the finished run in ``run_dir``: enough to
    load and use its stages (``data=True`` also loads its data sets; the judge is never built)."""
    from mera.config import load_config
    from mera.continual.runner import Runner
    from mera.run_config import RunConfig

    cfg = load_config(run_dir / "config.yaml", [], RunConfig)
    runner = Runner(cfg, run_dir, config_dir=guess_config_dir(cfg, run_dir, config_dir), resume=True,
                    progress=progress, log=lambda msg: None)
    runner.setup(data=data, judge=False)
    return runner


def check_stage(stage: Path) -> dict:
    from mera.continual import checkpoint as ckpt

    if not stage.is_dir():
        raise CheckpointError(f"{stage}: not a folder")
    if not ckpt.is_done(stage):
        raise CheckpointError(f"{stage}: not a finished stage (no DONE file)")
    return ckpt.read_manifest(stage)


def export_stage(stage_dir: str | os.PathLike, out_dir: str | os.PathLike, *, config_dir=None, force: bool = False,
                 runner=None) -> dict:
    """Write the model of a finished stage as a folder ``mera generate`` (and plain HF, for the LLM) can
    load; returns the manifest. ``runner``: an already set-up runner of the stage's run (else one is made)."""
    from mera.continual import checkpoint as ckpt
    from mera.zoo.lm import atomic_dir

    stage = Path(stage_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    manifest = check_stage(stage)
    if manifest.get("llm_modules"):
        kind = manifest["llm_modules"].get("kind", "?")
        raise CheckpointError(f"{stage}: a {kind} stage: its LLM holds extra modules (PathWeave's adapters) that "
                              "cannot be folded into a plain HF model, so it cannot be exported; "
                              "`mera generate` works on the stage folder itself")
    if out == stage or stage in out.parents:
        raise ConfigError(f"{out}: the export folder may not be inside the stage folder")
    _prepare_out(out, force, "exported model")
    run_dir = find_run_dir(stage)
    runner = runner or runner_for(run_dir, config_dir)
    model = runner.load_stage(stage)
    cfg = runner.cfg
    modalities = {}
    with atomic_dir(out) as tmp:
        model.llm.save_pretrained(str(tmp / "llm"))
        runner.tokenizer.save_pretrained(str(tmp / "llm"))
        for m in model.modalities:
            b = cfg.model.branches.get(m)
            if b is None:
                raise CheckpointError(f"{stage}: has a {m!r} connector but the run's config has no such branch")
            if not b.encoder.path:
                raise CheckpointError(f"{stage}: the {m!r} encoder ({b.encoder.family}) has no path in the run's "
                                      "config, so the export cannot refer to it")
            conn_cfg = b.connector.model_dump(mode="json")
            if conn_cfg.get("init_from"):  # the BERT folder fixes the Q-Former's sizes
                conn_cfg["init_from"] = os.path.abspath(conn_cfg["init_from"])
            file = f"connectors/{m}.safetensors"
            _save_tensors(tmp / file, model.branch(m).connector.state_dict())
            modalities[m] = {
                "encoder": {"family": b.encoder.family, "path": str(Path(runner.resolve(b.encoder.path)).resolve()),
                            "options": dict(b.encoder.options)},
                "connector": conn_cfg,
                "connector_file": file,
            }
        info = {
            "format": EXPORT_FORMAT,
            "source": {"run": str(run_dir), "stage": str(stage), "kind": manifest.get("kind"),
                       "stage_index": manifest.get("stage"), "modality": manifest.get("modality"),
                       "chain": [str(p) for p in ckpt.chain(stage)]},
            "llm": "llm",
            "dtype": cfg.model.dtype,
            "modalities": modalities,
            "generation": {"max_new_tokens": cfg.eval.max_new_tokens},
        }
        write_json(tmp / "manifest.json", info)
    return info


def is_export(folder: str | os.PathLike) -> bool:
    f = Path(folder) / "manifest.json"
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_export_manifest(folder: Path) -> dict:
    f = folder / "manifest.json"
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT or not isinstance(m.get("modalities"), dict):
        raise CheckpointError(f"{f}: not a mera export manifest")
    return m


def load_exported(folder: str | os.PathLike, device: str | torch.device | None = None):
    """The :class:`~mera.model.mllm.MultimodalLM` of an exported folder, and its manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mera.model.connectors import ConnectorConfig, build_connector
    from mera.model.encoders.base import load_encoder
    from mera.model.mllm import MultimodalLM

    folder = Path(folder).expanduser().resolve()
    m = read_export_manifest(folder)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    llm_dir = folder / m.get("llm", "llm")
    dtype = getattr(torch, m.get("dtype") or "float32")
    try:
        tok = AutoTokenizer.from_pretrained(str(llm_dir))
        llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{llm_dir}: cannot load the exported language model ({e})") from None
    llm.requires_grad_(False)
    model = MultimodalLM(llm.to(device), tok)
    hidden = model.hidden_size
    for mod, entry in m["modalities"].items():
        enc_ref = entry["encoder"]
        enc = load_encoder(enc_ref["family"], enc_ref.get("path"), **(enc_ref.get("options") or {})).to(device)
        try:
            ccfg = ConnectorConfig.model_validate(entry["connector"])
        except Exception as e:
            raise CheckpointError(f"{folder / 'manifest.json'}: bad connector config of {mod!r} ({e})") from None
        conn = build_connector(ccfg, enc.output_dim, hidden)
        state = _load_tensors(folder / entry["connector_file"])
        try:
            conn.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{folder / entry['connector_file']}: does not fit the {mod!r} connector ({e})") from None
        model.add_branch(mod, enc, conn.to(device))
    model.eval()
    return model, m


# ============================================================================ CLI


def add_import_llava_parser(sub):
    p = sub.add_parser("import-llava", help="turn a transformers LLaVA checkpoint into an LLM, a CLIP encoder "
                                            "and a pretrained image connector usable by a run config")
    p.add_argument("llava_dir", help="folder of a LlavaForConditionalGeneration saved by save_pretrained "
                                     "(safetensors)")
    p.add_argument("--out", required=True, help="output folder (llm/, encoders/image/, connectors/, "
                                                "import.json, example_config.yaml)")
    p.add_argument("--tokenizer", help="tokenizer folder, when the LLaVA folder has none")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_import_llava)
    return p


def cmd_import_llava(args) -> int:
    import sys

    info = import_llava(args.llava_dir, args.out, tokenizer=args.tokenizer, force=args.force,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(args.out).resolve()
    s = info["sizes"]
    print(f"imported {info['source']}\n"
          f"  llm:        {out / 'llm'} ({s['llm_params'] / 1e6:.1f}M parameters, {info['dtype']['llm']})\n"
          f"  encoder:    {out / 'encoders' / 'image'} (hf_clip, {s['image_tokens']} tokens x {s['feature_dim']})\n"
          f"  connector:  {out / 'connectors' / 'image.safetensors'} (mlp, depth 2)\n"
          f"  tokenizer:  chat template {info['tokenizer']['chat_template']}\n"
          f"  config:     {out / 'example_config.yaml'}")
    for n in info["notes"]:
        print(f"  note: {n}")
    return 0


def add_export_parser(sub):
    p = sub.add_parser("export", help="write a finished stage as a plain HF LLM (deltas folded) + connectors "
                                      "+ a manifest of its encoders")
    p.add_argument("stage_dir", help="a finished stage folder (with DONE) of a run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config-dir", help="folder the run config's relative paths are relative to "
                                        "(default: found from the working folder or the run folder)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    info = export_stage(args.stage_dir, args.out, config_dir=args.config_dir, force=args.force)
    out = Path(args.out).resolve()
    print(f"exported {info['source']['stage']}\n  llm:        {out / 'llm'}\n"
          f"  modalities: {', '.join(info['modalities'])}\n  manifest:   {out / 'manifest.json'}")
    return 0
