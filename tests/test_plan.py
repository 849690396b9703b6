"""``mera plan``: parameter counts from configs alone (meta device), optimizer steps, and the memory
estimate against PyTorch's own accounting of micro training phases."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mera.cli import main
from mera.config import load_config
from mera.errors import ConfigError
from mera.runner.plan import plan
from mera.runner.run_config import RunConfig
from mera.train.plan import Phase, Preset, Shapes, layer_bytes, memory_per_gpu, optimizer_steps, read_preset, token_bytes

REPO = Path(__file__).resolve().parents[1]

# Llama-3-8B, by hand: embeddings and the untied output head 128256 x 4096 each; per block q, o
# 4096 x 4096, k, v 1024 x 4096, gate, up, down 14336 x 4096, two RMSNorms; the final norm
LLAMA3_8B = 2 * 128256 * 4096 + 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096) + 4096
ADAPTED = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)  # the linear layers of the blocks
LORA_R128 = 32 * 128 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))


def write_paper_model_configs(root: Path) -> None:
    """config.json files of the paper's models (no weights): Llama-3-8B, CLIP ViT-L/14-336, BERT
    base (the Q-Former's sizes), BEATs; Point-BERT needs none (its sizes are PointLLM's defaults)."""
    from transformers import BertConfig, CLIPVisionConfig, LlamaConfig

    from mera.model.encoders.beats import BEATsConfig

    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False).save_pretrained(root / "Meta-Llama-3-8B-Instruct")
    CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14, projection_dim=768).save_pretrained(root / "clip-vit-large-patch14-336")
    BertConfig().save_pretrained(root / "bert-base-uncased")
    (root / "beats").mkdir()
    (root / "beats" / "config.json").write_text(json.dumps(BEATsConfig().to_dict()))
    (root / "point_bert").mkdir()


@pytest.fixture(scope="module")
def paper_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_models")
    write_paper_model_configs(root)
    return root


def paper_plan(paper_models, config="mera_sequential.yaml", preset=None, **kw):
    cfg = load_config(REPO / "configs/paper" / config, [f"paths.models={paper_models}", "paths.data=/nonexistent"],
                      RunConfig)
    return plan(cfg, REPO / "configs/paper", preset or Preset("single", "single", 1), **kw)


def test_the_paper_config_is_planned_from_config_files_alone(paper_models):
    p = paper_plan(paper_models)
    llm, lora = p["models"]["llm"], p["models"]["lora"]
    assert llm["parameters"] == LLAMA3_8B == 8_030_261_248
    assert lora["parameters"] == LORA_R128 == 335_544_320 and lora["modules"] == 32 * 7
    assert lora["adapted_weight_parameters"] == ADAPTED == 6_979_321_856
    assert llm["decoder_layer_parameters"] == ADAPTED + 32 * 2 * 4096  # FSDP's units: the blocks and their norms
    assert p["cpu_master_copy_bytes"] == 4 * ADAPTED  # the bf16 LLM's fp32 master copies (27.9 GB)
    image = p["models"]["branches"]["image"]
    assert image["encoder_tokens"] == 576 and image["llm_tokens"] == 576  # (336 / 14)^2, CLS dropped
    # the mlp2x_gelu connector: 1024 -> 4096 -> 4096, with biases
    assert image["connector_params"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert p["models"]["branches"]["video"]["llm_tokens"] == 4 * 12 * 12  # 4 frames, 24 x 24 pooled 2x
    assert p["models"]["branches"]["audio"]["llm_tokens"] == 32  # the Q-Former's queries
    assert p["models"]["branches"]["point"]["llm_tokens"] == 513
    # no data files: the steps are unknown; every phase is there: 4 experts x (align, instruct), then
    # 3 stages x (align and instruct shared by both methods, MERA's realign)
    assert all(ph["samples"] is None and ph["steps"] is None for ph in p["phases"])
    rows = [(ph["label"], ph["phase"]) for ph in p["phases"]]
    assert len(rows) == 8 + 3 * 3
    assert ("sequential s4 point", "realign") in rows
    instruct = next(ph for ph in p["phases"] if ph["label"] == "sequential s2 video" and ph["phase"] == "instruct")
    assert sorted(instruct["methods"]) == ["Fine-Tuning", "MERA (10%)"]
    assert instruct["trainable"] == {"connectors": image["connector_params"], "LoRA": LORA_R128}


def test_folds_as_branches_trade_the_cpu_master_for_gpu_branches(paper_models):
    cfg = load_config(REPO / "configs/paper/mera_sequential.yaml",
                      [f"paths.models={paper_models}", "paths.data=/nonexistent", "model.folds=branches"], RunConfig)
    p = plan(cfg, REPO / "configs/paper", Preset("single", "single", 1))
    assert p["cpu_master_copy_bytes"] == 0
    assert p["fold_branch_bytes_per_stage"] == 4 * LORA_R128  # one fp32 r128 pair per adapted layer: 1.34 GB
    assert p["fold_branch_stages"] == 4
    assert paper_plan(paper_models)["fold_branch_bytes_per_stage"] == 0  # folds: weights (the default)


def test_the_activation_formula_by_hand_for_llama3_8b(paper_models):
    p = paper_plan(paper_models)
    t = p["per_token_activation_bytes"]
    # block: 2 RMSNorms (fp32 input + 1/rms), q, k, v, attention output in bf16 + log-sum-exp, MLP 3 x 14336
    assert t["block"] == 2 * (4 * 4096 + 4) + 2 * (4096 + 1024 + 1024 + 4096) + 4 * 32 + 3 * 2 * 14336 == 139_400
    # LoRA on 7 layers: fp32 input + dropout mask (1 byte on a GPU) per input feature, 4r per layer
    assert t["lora_per_block"] == 5 * (6 * 4096 + 14336) + 7 * 4 * 128 == 198_144
    v = 128256
    assert t["no_checkpointing"] == 32 * (139_400 + 198_144) + 4 * 4096 + 4 + 4 * v + 8 * v
    assert t["checkpointing"] == 32 * 2 * 4096 + max(4 * 4096 + 4 + 12 * v, 139_400 + 198_144 + 8 * 14336)
    expert = next(ph for ph in p["phases"] if ph["label"] == "expert image" and ph["phase"] == "instruct")
    mem = expert["memory"]
    enc = sum(b["encoder_bytes"] for b in p["models"]["branches"].values())
    assert mem["weights"] == 2 * LLAMA3_8B + enc + 4 * (expert["trainable"]["connectors"] + LORA_R128)
    assert mem["gradients"] == 4 * (expert["trainable"]["connectors"] + LORA_R128)
    assert mem["optimizer"] == 2 * mem["gradients"]  # AdamW: two fp32 states per trainable parameter
    assert mem["activations_checkpointing"] == 4 * ((128 + 576) * t["checkpointing"] + 4 * 576 * (1024 + 2 * 4096))
    assert mem["peak"] == mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations_checkpointing"]


def test_presets_shard_what_they_shard(tmp_path):
    ph = Phase("x", "instruct", ["m"], 100, 7, 4, 100, [], 0, {"LoRA": 10}, 1000, {"LLM": 100}, 5000)
    s = Shapes("llm", "bfloat16", 100, 1, 8, 16, 2, 8, 8, 32, 4, 0.0, 10, 1, 8, 1, 128)
    single = memory_per_gpu(ph, s, Preset("single", "single", 1), True)
    assert (single["weights"], single["gradients"], single["optimizer"]) == (6000, 1000, 2000)
    ddp = memory_per_gpu(ph, s, Preset("ddp", "ddp", 4), True)
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"]) == (6000, 2000, 2000)  # + the reducer's buckets
    m = memory_per_gpu(ph, s, Preset("fsdp", "fsdp", 4), True)
    assert (m["weights"], m["gradients"], m["optimizer"]) == (6000, 250, 500)
    # FSDP with one unit per decoder layer: the layers (10 of 8 parameters, bf16) sharded, two gathered
    layered = Shapes("llm", "bfloat16", 100, 10, 8, 16, 2, 8, 8, 32, 4, 0.0, 0, 1, 8, 1, 128,
                     layer_params=80, largest_layer_params=8)
    m = memory_per_gpu(ph, layered, Preset("fsdp", "fsdp", 4, "layer"), True)
    assert m["weights"] == 6000 - 2 * 80 + 2 * 80 // 4 + 2 * 2 * 8
    assert memory_per_gpu(ph, layered, Preset("fsdp", "fsdp", 4, "whole"), True)["weights"] == 6000
    assert read_preset("single").kind == "single"
    assert (read_preset("ddp").kind, read_preset("ddp").gpus) == ("ddp", 2)  # the preset file's num_processes
    fsdp = read_preset("fsdp", 8)
    assert (fsdp.kind, fsdp.gpus, fsdp.wrap) == ("fsdp", 8, "layer")  # the preset's TRANSFORMER_BASED_WRAP
    deepspeed = tmp_path / "ds.yaml"  # mera run refuses DeepSpeed: so does the plan, in one line
    deepspeed.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config: {zero_stage: 2}\n")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        read_preset(str(deepspeed))
    assert read_preset(str(REPO / "configs/accelerate/ddp.yaml"), 3).gpus == 3
    with pytest.raises(ConfigError, match="no such preset"):
        read_preset("zero3")
    with pytest.raises(ConfigError, match="one GPU"):
        read_preset("single", 2)


def test_steps_are_counted_as_the_training_loop_counts_them():
    # 37 samples, micro-batches of 4: 10 per epoch, accumulation 2: 5 steps; 87 samples over 2 epochs,
    # batch 16 of micro 4: 22 micro-batches per epoch, 44 in all, 11 steps; fractional epochs round
    assert optimizer_steps(37, 8, 4, 1.0) == 5
    assert optimizer_steps(87, 16, 4, 2.0) == 11
    assert optimizer_steps(10, 4, None, 0.5) == 2  # 3 micro-batches per epoch, round(1.5) = 2
    assert optimizer_steps(None, 8, 4, 1.0) is None and optimizer_steps(0, 8, 4, 1.0) == 0


def _write_set(path: Path, modality: str, task: str, n: int) -> str:
    ph = {"image": "<image>", "point": "<point>"}[modality]
    path.write_text(json.dumps([{"id": f"{task}{i}", "modality": modality, "task": task, "media": "x.png",
                                 "conversations": [{"from": "human", "value": f"{ph}\nq"}, {"from": "gpt", "value": "a"}]}
                                for i in range(n)]))
    return str(path)


def test_steps_from_the_data_files_and_counts_equal_the_built_models(micro_assets, tmp_path):
    """A config of the toy encoders and a Q-Former (loaded / built for real by the run) and a LoRA:
    the plan's counts equal those of the models the run builds; its steps come from the files."""
    from micro import micro_config

    from mera.continual.assets import load_assets
    from mera.train.lora import attach_lora, lora_parameters

    cfg_path = micro_config(micro_assets, tmp_path, methods=[{"name": "MERA", "strategies": ["cma", "realign"]},
                                                             {"name": "Replay", "strategies": ["replay"]}])
    raw = yaml.safe_load(cfg_path.read_text())
    sizes = {("image", "caption"): 37, ("image", "qa"): 50, ("point", "caption"): 21, ("point", "qa"): 30}
    raw["data"] = {"sets": {m: {f"{t}_{s}": _write_set(tmp_path / f"{m}_{t}_{s}.json", m, t, sizes[m, t])
                                for t in ("caption", "qa") for s in ("train", "test")} for m in ("image", "point")}}
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path, [], RunConfig)
    p = plan(cfg, tmp_path, Preset("single", "single", 1))
    assets = load_assets(cfg, tmp_path, data=False, judge=False)
    model = assets.base_model()
    assert p["models"]["llm"]["parameters"] == sum(x.numel() for x in model.llm.parameters())
    for m in ("image", "point"):
        assets.add_branch(model, m)
        b = p["models"]["branches"][m]
        assert b["connector_params"] == sum(x.numel() for x in model.branch(m).connector.parameters())
        assert b["encoder_params"] == sum(x.numel() for x in model.branch(m).encoder.parameters())
        assert b["llm_tokens"] == model.num_media_tokens(m)
    model.llm = attach_lora(model.llm, cfg.train.lora, 0)
    assert p["models"]["lora"]["parameters"] == sum(x.numel() for x in lora_parameters(model.llm).values())
    tc = cfg.train

    def row(label, phase, method):
        return next(ph for ph in p["phases"] if ph["label"] == label and ph["phase"] == phase and method in ph["methods"])

    assert row("expert image", "align", "expert")["samples"] == 37
    assert row("expert image", "align", "expert")["steps"] == math.ceil(
        round(math.ceil(37 / tc.align.batch_size) * tc.align.epochs))
    assert row("expert point", "instruct", "expert")["samples"] == 51
    assert row("sequential s2 point", "instruct", "Replay")["samples"] == 51 + round(0.1 * 87)  # + 10% of image
    assert row("sequential s2 point", "realign", "MERA")["samples"] == round(0.1 * 87) + round(0.1 * 51)
    # a missing file: unknown
    raw["data"]["sets"]["point"]["qa_train"] = str(tmp_path / "missing.json")
    cfg_path.write_text(yaml.safe_dump(raw))
    p2 = plan(load_config(cfg_path, [], RunConfig), tmp_path, Preset("single", "single", 1))
    assert next(ph for ph in p2["phases"] if ph["label"] == "expert point" and ph["phase"] == "instruct")["steps"] is None


def test_the_command_prints_a_table_and_json(paper_models, capsys):
    args = ["plan", str(REPO / "configs/paper/mera_sequential.yaml"), f"paths.models={paper_models}",
            "paths.data=/nonexistent"]
    assert main(args + ["--preset", "fsdp", "--gpus", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == {"name": "fsdp", "kind": "fsdp", "gpus": 4, "wrap": "layer"}
    assert out["models"]["llm"]["parameters"] == LLAMA3_8B
    assert all(ph["micro_per_gpu"] == 1 for ph in out["phases"])  # micro-batches of 4 split over 4 GPUs
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "8,030,261,248 parameters" in text and "sequential s4 point / realign" in text
    assert main(["plan", str(REPO / "configs/paper/mera_sequential.yaml"), "paths.models=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------- the estimate against measurements
@pytest.fixture(scope="module")
def real_assets(tmp_path_factory):
    from test_real_micro import save_real_assets

    return save_real_assets(tmp_path_factory.mktemp("plan_assets"), point_bert=False)


def _peak_increment(fn, folder: Path) -> int:
    """Bytes: the highest memory the CPU allocator held during ``fn()`` above what it held when it
    started, from PyTorch's profiler (its memory timeline: every allocation and free of a tensor)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        result = fn()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA in favour of memory snapshots
        prof.export_memory_timeline(str(folder / "memory.json"), device="cpu")
    _times, sizes = json.loads((folder / "memory.json").read_text())
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0], result


@pytest.mark.slow
@pytest.mark.parametrize("phase,checkpointing,dropout", [("instruct", False, 0.05), ("instruct", True, 0.05),
                                                          ("instruct", True, 0.0), ("align", False, 0.05)])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(real_assets, tmp_path, monkeypatch, phase,
                                                               checkpointing, dropout):
    """A bfloat16 Llama + CLIP, as tests/test_real_micro.py builds them, trains one phase with the run's
    own run_phase; what the allocator held above its start (gradients, AdamW, activations) is within
    25% of the plan's estimate of those, and the phase takes the steps the plan counted."""
    from mera.continual.assets import load_assets
    from mera.continual.training import run_phase
    from mera.model.collate import MultimodalCollator
    from mera.train.lora import attach_lora, lora_parameters

    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    root = real_assets
    raw = {"name": "plan-micro", "model": {"llm": str(root / "llm"), "tokenizer": str(root / "tokenizer"),
                                           "dtype": "bfloat16",
                                           "branches": {"image": {"encoder": {"family": "hf_clip", "path": str(root / "clip"),
                                                                              "options": {"dtype": "bfloat16"}},
                                                                  "connector": {"type": "mlp", "depth": 2}}}},
           "data": {"toy": {"n_train_caption": 16, "n_train_qa": 16, "n_test_caption": 2, "n_test_qa": 2}},
           "orders": {"o": ["image"]}, "methods": [{"name": "FT", "strategies": ["finetune"]}],
           "train": {"align": {"epochs": 1, "batch_size": 8, "lr_connector": 1e-3},
                     "instruct": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "lr_connector": 1e-3,
                                  "lr_lora": 1e-3},
                     "lora": {"r": 4, "alpha": 8, "dropout": dropout}, "gradient_checkpointing": checkpointing,
                     "cache_features": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml", [], RunConfig)
    assets = load_assets(cfg, tmp_path, judge=False)
    model = assets.base_model()
    assets.add_branch(model, "image")
    groups = [{"params": model.connector_parameters("image"), "lr": 1e-3}]
    samples = assets.sets["image"].caption_train
    if phase == "instruct":
        samples = assets.sets["image"].train
        model.llm = attach_lora(model.llm, cfg.train.lora, 0)
        groups.append({"params": list(lora_parameters(model.llm).values()), "lr": 1e-3})
    collate = MultimodalCollator(assets.tokenizer, model, train=True)
    longest = max(collate([assets.provider.item(s)])["input_ids"].shape[1] for s in samples)
    p = plan(cfg, tmp_path, Preset("single", "single", 1), text_tokens=longest - model.num_media_tokens("image"),
             device="cpu")
    row = next(ph for ph in p["phases"] if ph["label"] == "expert image" and ph["phase"] == phase)
    mem = row["memory"]
    estimate = mem["peak"] - mem["weights"]  # what the phase allocates: the weights are there before it
    measured, result = _peak_increment(lambda: run_phase(assets, model, groups, samples, phase, 0, "plan"), tmp_path)
    print(f"\n{phase} checkpointing={checkpointing} dropout={dropout}: estimate {estimate / 2**20:.2f} MiB, "
          f"measured {measured / 2**20:.2f} MiB, ratio {estimate / measured:.3f}")
    assert result.steps == row["steps"]
    assert 0.75 < estimate / measured < 1.25, (estimate, measured)
    # and the formula's parts are not negligible there: activations are most of it
    assert mem[f"activations_{'' if checkpointing else 'no_'}checkpointing"] > 0.5 * measured


def test_the_formula_follows_its_inputs():
    s = Shapes("llm", "bfloat16", 0, 2, 64, 128, 4, 32, 64, 100, 4, 0.1, 0, 14, 6 * 64 + 128, 7, 0)
    block, lora = layer_bytes(s, mask_bytes=1)
    assert block == 2 * (4 * 64 + 4) + 2 * (2 * 64 + 2 * 32) + 4 * 4 + 3 * 2 * 128
    assert lora == 5 * (6 * 64 + 128) + 4 * 4 * 7
    assert layer_bytes(s, mask_bytes=4)[1] == 8 * (6 * 64 + 128) + 4 * 4 * 7  # a float mask on the CPU
    assert token_bytes(s, lora=0, checkpointing=False) == 2 * block + 4 * 64 + 4 + 12 * 100
    assert token_bytes(s, lora=2, checkpointing=False) == 2 * (block + 2 * lora) + 4 * 64 + 4 + 12 * 100
    assert token_bytes(s, lora=1, checkpointing=True) == 2 * 2 * 64 + max(4 * 64 + 4 + 12 * 100,
                                                                          block + lora + 4 * 2 * 128)
