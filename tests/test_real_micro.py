"""The real-architecture path end to end, at micro size: a random HF Llama (toy tokenizer), a random
``CLIPVisionModel`` saved with ``save_pretrained`` (family ``hf_clip``, with its image processor) and a
random Point-BERT saved as PointLLM's checkpoint file (family ``point_bert``), on the toy world's PNG
images and (N, 6) point clouds; orders [image, point], Fine-Tuning and MERA (10%), with the paper
configs' settings that change code paths (a bfloat16 LLM and CLIP, MLP depth 3 with hidden sizes for
the point connector, gradient checkpointing, step checkpoints, no feature cache: the encoders run
inside every step).

Nothing here is trained to be good: the assertions are about the plumbing (rows, merge coefficient,
checkpoint contents, reproducible reload).
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from mera.config import load_config
from mera.continual import checkpoint as ckpt
from mera.continual.assets import load_assets
from mera.continual.stages import load_stage
from mera.runner.loop import StageLoop
from mera.runner.run_config import RunConfig

pytestmark = pytest.mark.slow

POINT_SIZES = dict(trans_dim=32, depth=2, num_heads=4, num_group=16, group_size=8, encoder_dims=32)
NUM_POINTS = 256  # the toy world's clouds have 256 points
CLIP_SIZE, CLIP_PATCH, CLIP_WIDTH = 28, 7, 32  # a 4 x 4 grid: 16 tokens of width 32
LLM_WIDTH = 48
MAX_NEW = 6


def _save_tiny_llama(tok, folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=LLM_WIDTH, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, initializer_range=0.3)
    # a large init (0.3, not 0.02): greedy outputs then depend on the media features instead of
    # collapsing to one answer, so that the reload check below can fail
    LlamaForCausalLM(cfg).save_pretrained(folder)


def _save_tiny_clip(folder: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    cfg = CLIPVisionConfig(image_size=CLIP_SIZE, patch_size=CLIP_PATCH, hidden_size=CLIP_WIDTH, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    CLIPVisionModel(cfg).save_pretrained(folder)
    # the real checkpoint folder has a preprocessor_config.json: the hf_clip family then uses it
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}
                       ).save_pretrained(folder)


def _save_tiny_point_bert(folder: Path) -> None:
    """Random weights (BatchNorm statistics included) in PointLLM's file layout:
    ``{"state_dict": {"module.point_encoder.<name>": tensor}}`` as ``point_bert_v1.2.pt``."""
    from test_point_bert import _randomise  # random weights and BatchNorm statistics

    from mera.model.encoders.point_bert import PointBertConfig, PointBertEncoder

    model = _randomise(PointBertEncoder(PointBertConfig(**POINT_SIZES), num_points=NUM_POINTS), seed=2)
    folder.mkdir(parents=True)
    state = {f"module.point_encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state}, folder / "point_bert_v1.2.pt")


def save_real_assets(root: Path, point_bert: bool = True) -> Path:
    """The tiny real-architecture checkpoints in ``root``: tokenizer, llm, clip (and point_bert)."""
    from mera.data.toy_world import vocabulary
    from mera.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary(), root / "tokenizer")
    _save_tiny_llama(tok, root / "llm")
    _save_tiny_clip(root / "clip")
    if point_bert:
        _save_tiny_point_bert(root / "point_bert")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_real_assets(tmp_path_factory.mktemp("real_assets"))


def micro_config(assets: Path, tmp_path: Path) -> Path:
    cfg = {
        "name": "real-micro",
        "paths": {"models": str(assets)},
        "model": {
            "llm": "${paths.models}/llm",
            "tokenizer": "${paths.models}/tokenizer",
            "dtype": "bfloat16",  # as configs/paper (the LLM; LoRA and connectors train in float32)
            "branches": {
                "image": {"encoder": {"family": "hf_clip", "path": "${paths.models}/clip",
                                      "options": {"dtype": "bfloat16"}},
                          "connector": {"type": "mlp", "depth": 2}},
                "point": {"encoder": {"family": "point_bert", "path": "${paths.models}/point_bert",
                                      "options": {"num_points": NUM_POINTS, **POINT_SIZES}},
                          "connector": {"type": "mlp", "depth": 3, "hidden_sizes": [40, 56]}},
            },
        },
        "data": {"toy": {"n_train_caption": 24, "n_train_qa": 48, "n_test_caption": 6, "n_test_qa": 12}},
        "orders": {"sequential": ["image", "point"]},
        "methods": [{"name": "Fine-Tuning", "strategies": ["finetune"]},
                    {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1}],
        "train": {"align": {"epochs": 1, "batch_size": 8, "lr_connector": 1e-3},
                  "instruct": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "lr_connector": 1e-3,
                               "lr_lora": 5e-3},
                  "realign": {"epochs": 1, "batch_size": 4, "lr_connector": 1e-3},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "gradient_checkpointing": True,
                  "cache_features": False,
                  "checkpoint_every": 2},
        "eval": {"batch_size": 9, "max_new_tokens": MAX_NEW},
    }
    path = tmp_path / "real_micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _micro_run(assets, tmp_path_factory, name: str, edit=None):
    """The real micro config run to its end in a fresh MERA_HOME (``edit`` changes the raw config)."""
    tmp = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.setenv("MERA_HOME", str(tmp / "home"))
    cfg_path = micro_config(assets, tmp)
    if edit is not None:
        raw = yaml.safe_load(cfg_path.read_text())
        edit(raw)
        cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path, [], RunConfig)
    out = tmp / "out"
    StageLoop(cfg, out, config_dir=tmp, progress=False, log=lambda m: None).run()
    yield cfg_path, cfg, out
    mp.undo()


@pytest.fixture(scope="module")
def real_run(assets, tmp_path_factory):
    yield from _micro_run(assets, tmp_path_factory, "real_run")


def _rows(out: Path) -> list[dict]:
    import csv

    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_config_resolves_paths_to_the_saved_folders(real_run, assets):
    _, cfg, _ = real_run
    assert cfg.model.llm == str(assets / "llm")
    assert cfg.model.branches["image"].encoder.path == str(assets / "clip")
    assert cfg.model.branches["point"].encoder.path == str(assets / "point_bert")


def test_run_completes_with_rows_for_both_methods_and_modalities(real_run):
    _, _, out = real_run
    rows = _rows(out)
    experts = {(r["modality"], r["task"]) for r in rows if r["method"] == "expert"}
    assert experts == {("image", "caption"), ("image", "qa"), ("point", "caption"), ("point", "qa")}
    for method in ("Fine-Tuning", "MERA (10%)"):
        got = sorted((r["stage"], r["modality"], r["task"]) for r in rows if r["method"] == method)
        want = sorted([("1", "image", t) for t in ("caption", "qa")]
                      + [("2", m, t) for m in ("image", "point") for t in ("caption", "qa")])
        assert got == want, method
        for r in rows:
            if r["method"] == method:
                assert r["dataset"] == f"toy-{r['modality']}-{r['task']}" and float(r["score"]) >= 0.0
    for d in ("experts/image", "experts/point", "sequential/fine-tuning/stage_2_point",
              "sequential/mera-10/stage_2_point"):
        assert ckpt.is_done(out / d), d
    # step checkpoints (checkpoint_every, as in configs/paper) are removed once their stage is done
    assert not any(p.is_file() for p in (out / ".steps").rglob("*"))


def test_mera_merges_by_cumulative_average_and_realigns(real_run):
    _, _, out = real_run
    ft = ckpt.read_manifest(out / "sequential/fine-tuning/stage_2_point")
    mera = ckpt.read_manifest(out / "sequential/mera-10/stage_2_point")
    assert [d["coef"] for d in ft["folds"]] == [1.0]
    assert [d["coef"] for d in mera["folds"]] == [0.5]  # W_1 + dW_2 / 2
    # R_2 = 10% of D_1 and of D_2 (24 captions + 48 QA each: round(7.2) = 7 each)
    assert mera["log"]["realign"]["samples"] == 14
    assert "realign" not in ft["log"]


def test_stage_holds_lora_of_every_llama_linear_and_the_connectors_only(real_run, assets):
    from safetensors.torch import load_file

    _, _, out = real_run
    folder = out / "sequential/mera-10/stage_2_point"
    lora = load_file(str(folder / "delta.safetensors"))
    names = {k.rsplit(".", 1)[0] for k in lora}
    projs = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in projs}
    assert lora["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, LLM_WIDTH)
    conn = load_file(str(folder / "connectors.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in conn.items()}
    # image: LLaVA's mlp2x_gelu from the CLIP width; point: depth 3 with the configured hidden sizes
    assert shapes == {"image.0.weight": (LLM_WIDTH, CLIP_WIDTH), "image.0.bias": (LLM_WIDTH,),
                      "image.2.weight": (LLM_WIDTH, LLM_WIDTH), "image.2.bias": (LLM_WIDTH,),
                      "point.0.weight": (40, POINT_SIZES["trans_dim"]), "point.0.bias": (40,),
                      "point.2.weight": (56, 40), "point.2.bias": (56,),
                      "point.4.weight": (LLM_WIDTH, 56), "point.4.bias": (LLM_WIDTH,)}


def test_methods_differ_after_stage_2(real_run):
    """Fine-tuning and MERA share stage 1 (the image expert) and differ after stage 2."""
    _, _, out = real_run

    def preds(stage):
        return [json.loads(line)["prediction"] for line in (out / stage / "predictions.jsonl").read_text().splitlines()]

    rows = _rows(out)
    expert = {r["task"]: r["score"] for r in rows if r["method"] == "expert" and r["modality"] == "image"}
    for method in ("Fine-Tuning", "MERA (10%)"):
        assert {r["task"]: r["score"] for r in rows if r["method"] == method and r["stage"] == "1"} == expert
    assert preds("sequential/fine-tuning/stage_2_point") != preds("sequential/mera-10/stage_2_point")


def test_loaded_stage_reproduces_the_saved_predictions(real_run):
    from mera.eval.evaluate import generate_answers
    from mera.model.encoders.clip import ClipVisionEncoder
    from mera.model.encoders.point_bert import PointBertEncoder

    cfg_path, cfg, out = real_run
    assets = load_assets(cfg, cfg_path.parent, judge=False)
    for stage in ("sequential/fine-tuning/stage_2_point", "sequential/mera-10/stage_2_point"):
        folder = out / stage
        model = load_stage(assets, folder)
        assert isinstance(model.branch("image").encoder, ClipVisionEncoder)
        assert isinstance(model.branch("point").encoder, PointBertEncoder)
        # CLIP: (28 / 7)^2 patches, CLS dropped; Point-BERT: CLS + 16 groups
        assert model.num_media_tokens("image") == 16 and model.num_media_tokens("point") == 17
        # the dtypes of configs/paper: bfloat16 LLM and CLIP, float32 Point-BERT and connectors
        assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
        assert next(model.branch("image").encoder.parameters()).dtype == torch.bfloat16
        assert next(model.branch("point").encoder.parameters()).dtype == torch.float32
        assert {p.dtype for p in model.connector_parameters()} == {torch.float32}
        saved = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(saved) == 2 * (6 + 12)
        assert len({p["prediction"] for p in saved}) >= 6  # media-dependent, not one constant answer
        for m in ("image", "point"):
            # batched as the run's evaluation batched them (captions, then QA): in bf16 the batch's
            # composition changes the numbers on some CPUs (AMX kernels)
            preds = [p for samples in (assets.sets[m].caption_test, assets.sets[m].qa_test)
                     for p in generate_answers(model, assets.tokenizer, samples, assets.provider, 9, MAX_NEW,
                                               progress=False)]
            want = [p["prediction"] for p in saved if p["modality"] == m]
            assert preds == want, (stage, m)


def _mera_stage_2(run):
    """MERA (10%)'s stage 2 of ``run`` rebuilt (load_stage), with the base LLM's modules and the
    chain's folds (the expert's delta at 1, stage 2's at 1/2)."""
    cfg_path, cfg, out = run
    assets = load_assets(cfg, cfg_path.parent, judge=False)
    base = dict(assets.base_model().llm.named_modules())
    folder = out / "sequential/mera-10/stage_2_point"
    model = load_stage(assets, folder)
    folds = [f for stage in ckpt.chain(folder) for f in ckpt.load_folds(stage)]
    assert [c for _, c in folds] == [1.0, 0.5]
    return assets, base, folder, model, folds


def test_a_bfloat16_stage_holds_its_folds_rounded_once(real_run):
    """MERA's stage 2 on the bfloat16 Llama: every adapted weight is the base weight plus the
    expert's delta (1) and stage 2's (1/2), summed in fp32 and rounded to bfloat16 once
    (mera.train.precision), not rounded after each fold as before."""
    assets, base, folder, model, folds = _mera_stage_2(real_run)
    from mera.train.lora import lora_delta

    def update(delta, coef, name):  # what the fold adds (mera.train.lora.fold_delta)
        d = delta.modules[name]
        return lora_delta(d["A"], d["B"], d["scaling"] * coef)

    rounded_twice = 0
    for name, m in model.llm.named_modules():
        if name not in folds[0][0].modules:
            continue
        acc = base[name].weight.float()
        for delta, coef in folds:
            acc = acc + update(delta, coef, name)
        assert torch.equal(m.weight, acc.to(torch.bfloat16)), name
        twice = base[name].weight
        for delta, coef in folds:
            twice = (twice.float() + update(delta, coef, name)).to(torch.bfloat16)
        rounded_twice += int((twice != m.weight).sum())
    assert rounded_twice > 0  # the old fold gives other weights: the check above can fail


@pytest.fixture(scope="module")
def branch_run(assets, tmp_path_factory):
    """MERA (10%) on the bfloat16 Llama with ``model.folds: branches`` (folds kept as fp32 branches)."""
    def edit(raw):
        raw["model"]["folds"] = "branches"
        raw["methods"] = raw["methods"][1:]

    yield from _micro_run(assets, tmp_path_factory, "branch_run", edit)


def test_folds_kept_as_branches_train_evaluate_rebuild_and_export_exactly(branch_run, tmp_path):
    from mera.eval.evaluate import generate_answers
    from mera.interop.export import export_stage
    from mera.train import branches
    from mera.train.lora import lora_delta

    cfg_path = branch_run[0]
    assets, base, folder, model, folds = _mera_stage_2(branch_run)
    n = 0
    for name, m in model.llm.named_modules():
        if name not in folds[0][0].modules:
            continue
        assert torch.equal(m.weight, base[name].weight)  # bfloat16 weights untouched
        want = sum(lora_delta(d.modules[name]["A"], d.modules[name]["B"], d.modules[name]["scaling"] * c)
                   for d, c in folds)
        assert torch.allclose(branches.merged_update(m), want, rtol=1e-6, atol=1e-9), name
        n += 1
    assert n > 0
    # the rebuilt stage (branches replayed) gives the run's own predictions
    saved = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    for mod in ("image", "point"):
        preds = [p for samples in (assets.sets[mod].caption_test, assets.sets[mod].qa_test)
                 for p in generate_answers(model, assets.tokenizer, samples, assets.provider, 9, MAX_NEW,
                                           progress=False)]
        assert preds == [p["prediction"] for p in saved if p["modality"] == mod], mod
    # export bakes the branches into the weights, rounded once
    export_stage(folder, tmp_path / "export", config_dir=cfg_path.parent)
    from transformers import AutoModelForCausalLM

    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "llm", local_files_only=True,
                                                         dtype=torch.bfloat16).named_modules())
    for name in folds[0][0].modules:
        m = dict(model.llm.named_modules())[name]
        assert torch.equal(exported[name].weight, (base[name].weight.float() + branches.merged_update(m)).to(
            torch.bfloat16)), name
