"""Back to LLaVA: ``mera export STAGE --out DIR --format llava``.

A finished stage whose image branch is LLaVA-1.5's (a CLIP vision tower, family ``hf_clip``, and
the ``mlp2x_gelu`` projector, an ``mlp`` connector of depth 2) is written as a transformers
``LlavaForConditionalGeneration`` folder that ``from_pretrained`` loads and runs as it is (no
``trust_remote_code``)::

    DIR/config.json, generation_config.json, model*.safetensors
                                   LlavaConfig (vision_config, text_config, vision_feature_layer,
                                   vision_feature_select_strategy "default", image_token_index,
                                   image_seq_length) and the weights: the CLIP tower, the projector
                                   (connector 0.* / 2.* as multi_modal_projector.linear_1 / linear_2),
                                   the LLM with every fold of the stage chain applied
    DIR/tokenizer*, chat_template.jinja, processor_config.json
                                   the stage's tokenizer with the <image> token, and a LlavaProcessor
                                   whose image processor is the encoder's CLIP one plus LLaVA-1.5's
                                   pad-to-square (``do_pad``), as mera's hf_clip preprocessing
    DIR/mera_branches/manifest.json, connectors/<m>.safetensors
                                   mera's export manifest (layout "llava") and the other modalities'
                                   connectors: ``mera generate DIR`` answers with every branch

:func:`load_llava_parts` is the way back: a LLaVA folder split into the causal LM, the CLIP encoder
and the MLP connector mera's :class:`~mera.model.mllm.MultimodalLM` uses (sharing the loaded tensors).
"""

from __future__ import annotations

import copy
from pathlib import Path

from mera.errors import CheckpointError, ConfigError
from mera.interop._common import (
    EXPORT_FORMAT,
    _dtype_name,
    _prepare_out,
    assets_for,
    branch_entry,
    existing_manifest,
    stage_source,
)
from mera.io import atomic_dir, write_json

IMAGE_TOKEN = "<image>"
BRANCHES_DIR = "mera_branches"
# CLIPImageProcessor settings carried into the LlavaImageProcessor of the export
_IMAGE_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                         "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _requirements(stage: Path, manifest: dict, cfg) -> None:
    """Refuse, before any work, a stage whose image branch is not CLIP + LLaVA's MLP, naming what is missing."""
    have = list(manifest.get("modalities") or [])
    need = ("--format llava needs an image branch made of a CLIP vision tower (encoder family hf_clip) and "
            "LLaVA's mlp2x_gelu projector (connector type mlp, depth 2, hidden size = the LLM's width)")
    b = cfg.model.branches.get("image")
    if "image" not in have or b is None:
        raise ConfigError(f"{stage}: {need}; this stage has no image branch (it has: {', '.join(have) or 'none'})")
    problems = []
    if b.encoder.family != "hf_clip":
        problems.append(f"its image encoder is {b.encoder.family!r}, not hf_clip")
    c = b.connector
    if c.type != "mlp":
        problems.append(f"its image connector is {c.type!r}, not mlp")
    elif c.depth != 2:
        problems.append(f"its image connector is an mlp of depth {c.depth}, not 2")
    if problems:
        raise ConfigError(f"{stage}: {need}; " + "; ".join(problems))


def _check_loaded(stage: Path, model) -> tuple:
    """The stage's CLIP encoder and MLP connector, checked on the loaded objects (sizes included)."""
    from torch import nn

    from mera.model.connectors import MLPConnector
    from mera.model.encoders.clip import ClipVisionEncoder

    enc, conn = model.branch("image").encoder, model.branch("image").connector
    hidden = model.hidden_size
    if not isinstance(enc, ClipVisionEncoder):
        raise ConfigError(f"{stage}: the image encoder is a {type(enc).__name__}, not the hf_clip CLIP encoder")
    layers = list(conn) if isinstance(conn, MLPConnector) else []
    if not (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.GELU)
            and layers[1].approximate == "none" and isinstance(layers[2], nn.Linear)
            and layers[0].in_features == enc.output_dim and layers[0].out_features == hidden
            and layers[2].in_features == hidden and layers[2].out_features == hidden):
        raise ConfigError(f"{stage}: the image connector is not LLaVA's mlp2x_gelu projector Linear({enc.output_dim}, "
                          f"{hidden}) - GELU - Linear({hidden}, {hidden}) (it is {conn}); hidden_sizes other than "
                          "the LLM's width have no place in LlavaForConditionalGeneration")
    n_layers = int(enc.model.config.num_hidden_layers)
    if not -(n_layers + 1) <= enc.feature_layer <= n_layers:
        raise ConfigError(f"{stage}: the image encoder's feature_layer {enc.feature_layer} is outside its "
                          f"{n_layers} layers")
    return enc, conn


def _tokenizer_with_image_token(tokenizer):
    """A copy of the stage's tokenizer (the assets' one is shared) holding the image token; whether
    it was added."""
    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN in tok.get_vocab():
        return tok, False
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)  # as LLaVA's tokenizers have it
    return tok, True


def _image_processor(enc):
    """LLaVA-1.5's image processing as mera's hf_clip does it: pad to a square with the mean colour,
    then the encoder's CLIPImageProcessor settings (or, without one, a plain resize with the CLIP
    constants); and a note of which."""
    from transformers import LlavaImageProcessor

    from mera.model.encoders.clip import CLIP_MEAN, CLIP_STD

    src = enc.image_processor
    if src is not None:
        d = src.to_dict()
        kw = {k: d[k] for k in _IMAGE_PROCESSOR_KEYS if d.get(k) is not None}
        return LlavaImageProcessor(do_pad=True, **kw), \
            f"the encoder's {type(src).__name__.removesuffix('Pil')} settings + do_pad (LLaVA-1.5's expand2square)"
    s = enc.image_size
    ip = LlavaImageProcessor(do_pad=True, do_resize=True, size={"height": s, "width": s}, do_center_crop=False,
                             resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return ip, ("the CLIP constants, resize to the tower's size, + do_pad (the encoder folder has no "
                "preprocessor_config.json: mera resizes with torch's antialiased bicubic, the processor with its "
                "own bicubic, so pixel values differ slightly)")


def export_llava(stage: Path, out: Path, manifest: dict, run_dir: Path, *, config_dir=None, force: bool = False,
                 assets=None) -> dict:
    """Write the stage as a transformers LLaVA folder (module docstring); returns the manifest of
    ``mera_branches/``. Called by :func:`mera.interop.export.export_stage` after its checks."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from mera.config import load_config
    from mera.continual.stages import load_stage
    from mera.runner.run_config import RunConfig

    cfg = assets.cfg if assets is not None else load_config(run_dir / "config.yaml", [], RunConfig)
    _requirements(stage, manifest, cfg)
    _prepare_out(out, force, "exported model", stage, existing_manifest(out), EXPORT_FORMAT)
    assets = assets or assets_for(run_dir, config_dir)
    model = load_stage(assets, stage)  # the base LLM with every fold of the chain applied
    from mera.train.branches import bake

    bake(model.llm)  # folds kept as branches (model.folds: branches) go into the weights, rounded once
    enc, conn = _check_loaded(stage, model)
    llm = model.llm
    dtype = llm.get_input_embeddings().weight.dtype

    tok, added = _tokenizer_with_image_token(assets.tokenizer)
    image_id = int(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    rows = int(llm.get_input_embeddings().weight.shape[0])
    grown = 0
    if image_id >= rows:  # the LLM needs a row for the image token (overwritten by the image features)
        grown = image_id + 1 - rows
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():  # deterministic new rows: zero (its logit is 0, and generation suppresses it)
            llm.get_input_embeddings().weight[rows:] = 0
            out_emb = llm.get_output_embeddings()
            if out_emb is not None:
                out_emb.weight[rows:] = 0
    tie = llm.get_output_embeddings() is not None and \
        llm.get_output_embeddings().weight is llm.get_input_embeddings().weight

    # the tower in the export's one dtype; a copy when it must be cast (the assets' encoder is shared)
    tower = enc.model
    if next(tower.parameters()).dtype != dtype:
        tower = copy.deepcopy(tower).to(dtype)
    text_cfg, vision_cfg = copy.deepcopy(llm.config), copy.deepcopy(tower.config)
    text_cfg.tie_word_embeddings = tie
    for c in (text_cfg, vision_cfg):  # no local paths or standalone class names inside the LLaVA config
        c._name_or_path, c.architectures = "", None
    config = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_id,
                         image_seq_length=int(enc.num_tokens), vision_feature_layer=int(enc.feature_layer),
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         multimodal_projector_bias=True, tie_word_embeddings=tie)
    projector = LlavaMultiModalProjector(config)
    with torch.no_grad():
        for i, lin in ((0, projector.linear_1), (2, projector.linear_2)):
            lin.weight.copy_(conn[i].weight)
            lin.bias.copy_(conn[i].bias)
    projector.to(dtype)
    # The LLaVA model is assembled from the loaded parts (no second copy of the LLM in memory):
    # built on the meta device, its three parts replaced by the stage's modules.
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = tower
    llava.model.multi_modal_projector = projector
    llava.model.language_model = getattr(llm, llm.base_model_prefix)
    llava.lm_head = llm.get_output_embeddings()
    left = [n for n, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{stage}: the LLaVA model could not be assembled from the stage's modules "
                              f"(still unset: {left[:4]})")
    llava.generation_config = copy.deepcopy(llm.generation_config)
    if added:  # a token the LLM never produced: never generated
        llava.generation_config.suppress_tokens = [image_id]
    llava.eval()

    image_processor, ip_note = _image_processor(enc)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=int(tower.config.patch_size),
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)  # CLIP's CLS token, dropped by "default"

    with atomic_dir(out) as tmp:
        llava.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))  # the tokenizer too
        branches = tmp / BRANCHES_DIR
        branches.mkdir()
        modalities = {"image": {"from": "llava",
                                "encoder": {"family": "hf_clip", "options": {"feature_layer": int(enc.feature_layer)}},
                                "connector": {"type": "mlp", "depth": 2}}}
        for m in model.modalities:
            if m != "image":
                modalities[m] = branch_entry(branches, model, assets, stage, m)
        info = {
            "format": EXPORT_FORMAT,
            "layout": "llava",
            "source": stage_source(stage, run_dir, manifest),
            "llm": "..",  # the LLaVA folder holding this manifest's folder
            "dtype": _dtype_name(dtype),
            "modalities": modalities,
            "generation": {"max_new_tokens": cfg.eval.max_new_tokens},
            "llava": {"image_token": IMAGE_TOKEN, "image_token_index": image_id, "image_token_added": added,
                      "embedding_rows_added": grown, "image_seq_length": int(enc.num_tokens),
                      "vision_feature_layer": int(enc.feature_layer), "vision_feature_select_strategy": "default",
                      "tied_head": tie, "image_processor": ip_note,
                      "connector_dtype": {"stage": "float32", "export": _dtype_name(dtype)}},
        }
        write_json(branches / "manifest.json", info)
    return info


def load_llava_parts(llava_dir: Path, dtype):
    """``(llm, tokenizer, {"image": (encoder, connector)})`` of a LLaVA folder (an export of
    ``--format llava``): the causal LM, mera's hf_clip encoder and MLP connector, sharing the
    loaded LLaVA's tensors (the connector in float32, as mera keeps connectors)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from mera.model.connectors import MLPConnector
    from mera.model.encoders.clip import ClipVisionEncoder

    try:
        llava = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(llava_dir), local_files_only=True)
        ip = AutoImageProcessor.from_pretrained(str(llava_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{llava_dir}: cannot load the exported LLaVA model ({' '.join(str(e).split())})") from None
    cfg = llava.config
    layer = cfg.vision_feature_layer
    if (getattr(cfg.vision_config, "model_type", None) != "clip_vision_model" or not isinstance(layer, int)
            or cfg.vision_feature_select_strategy != "default" or cfg.projector_hidden_act != "gelu"):
        raise CheckpointError(f"{llava_dir / 'config.json'}: not a LLaVA of mera's kind (a CLIP tower, one "
                              "vision_feature_layer, select strategy 'default', a gelu projector)")
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(cfg.text_config)
    setattr(llm, llm.base_model_prefix, llava.model.language_model)
    llm.set_output_embeddings(llava.lm_head)
    llm.generation_config = llava.generation_config
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{llava_dir}: the language model could not be taken out of the LLaVA model "
                              f"(still unset: {left[:4]})")
    enc = ClipVisionEncoder(llava.model.vision_tower, ip, feature_layer=int(layer))
    proj = llava.model.multi_modal_projector
    conn = MLPConnector(enc.output_dim, int(cfg.text_config.hidden_size), depth=2)
    with torch.no_grad():
        for i, lin in ((0, proj.linear_1), (2, proj.linear_2)):
            conn[i].weight.copy_(lin.weight)
            if lin.bias is not None:
                conn[i].bias.copy_(lin.bias)
            else:
                conn[i].bias.zero_()
    return llm, tok, {"image": (enc, conn)}
