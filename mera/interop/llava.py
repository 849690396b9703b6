"""Moving a model into mera: ``mera import-llava``.

``import_llava(LLAVA_DIR, MODEL_DIR)`` splits a transformers ``LlavaForConditionalGeneration``
folder (``save_pretrained`` layout, safetensors) into what a mera run config uses::

    MODEL_DIR/llm/                       the language model alone (plain HF causal LM + tokenizer)
    MODEL_DIR/encoders/image/            the CLIP vision tower (``CLIPVisionModel`` + preprocessor_config.json)
    MODEL_DIR/connectors/image.safetensors   the projector under MLPConnector names (0.*, 2.*)
    MODEL_DIR/import.json                source, key mapping, sizes
    MODEL_DIR/example_config.yaml        the ``model`` section of a run config using it

The image branch then uses ``pretrained_connector``: its expert is the base LLM + that
connector, not trained (LLaVA's stage 1 is already done). Everything is safetensors; nothing is
loaded with pickle or ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mera.errors import CheckpointError, ConfigError
from mera.interop._common import _dtype_name, _prepare_out, _save_tensors
from mera.io import write_json, write_text

IMPORT_FORMAT = "mera-llava-import-v1"
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
        cfg = LlavaConfig.from_pretrained(str(src), local_files_only=True)
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
        tok = AutoTokenizer.from_pretrained(tok_src, local_files_only=True)
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
        return CLIPImageProcessor.from_pretrained(str(src), local_files_only=True), "copied from the LLaVA folder"
    except Exception as e:  # optional: hf_clip falls back to the CLIP constants
        return None, f"not copied: unreadable ({type(e).__name__}: {' '.join(str(e).split())})"


def import_llava(llava_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | None = None,
                 force: bool = False, shard_bytes: int = SHARD_BYTES, log=None) -> dict:
    """Split a LLaVA checkpoint folder into mera's pieces (see the module docstring); returns import.json."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForCausalLM, CLIPVisionModel, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from mera.io import atomic_dir

    log = log or (lambda msg: None)
    src = Path(llava_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder (expected a LLaVA checkpoint folder)")
    _prepare_out(out, force, "imported model", src, "import.json", IMPORT_FORMAT)
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
                GenerationConfig.from_pretrained(str(src), local_files_only=True).save_pretrained(str(llm_dir))
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
