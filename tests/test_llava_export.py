"""``mera export --format llava``: a stage written as a transformers LlavaForConditionalGeneration
folder, loaded by ``from_pretrained`` as it is and checked against mera's own forward of the stage:

- the round trip import-llava -> (stage 1, nothing trained) -> export gives back the original
  LLaVA, tensor for tensor;
- a stage after a MERA merge (a LoRA delta folded into the LLM): the LLaVA's logits on the
  processor's inputs equal mera's on the same image and prompt;
- a stage whose tokenizer lacks ``<image>``: the token is added, the LLM grows one row;
- a bfloat16 stage: exported in bfloat16, the run's float32 encoder untouched;
- ``mera generate`` on the export (image from the LLaVA weights, point from ``mera_branches/``)
  reproduces the run's own predictions;
- refusals (no CLIP + MLP image branch, naming what is missing) and ``--force``.

Uses the micro run of test_import_export.py (a tiny imported LLaVA + a toy point branch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

# the same module-scoped fixtures (an imported tiny LLaVA + a toy point branch, run once)
from test_import_export import assets, imported, llava_dir, run  # noqa: F401

from mera.errors import ConfigError, MeraError
from mera.interop.export import export_stage, is_export

PROMPT = "what colour is the shape ?"


def _load_llava(folder: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(folder), local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(str(folder), local_files_only=True)


def _images(assets) -> list[np.ndarray]:
    """A toy-world test image and a non-square random one (LLaVA-1.5's pad-to-square matters)."""
    from mera.data.media import read_media

    rng = np.random.default_rng(3)
    return [read_media("image", assets.sets["image"].caption_test[0].media),
            rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)]


def _both_logits(stage_model, llava, processor, image: np.ndarray, prompt: str = PROMPT):
    """(mera's logits of the stage, the LLaVA's logits) on one image + prompt: mera's collator on one
    side; on the other the LLaVA tokenizer's chat template and its processor, as a transformers user
    would run it. The inputs are checked equal first (image tokens where mera has its sentinels)."""
    from mera.model.collate import MultimodalCollator
    from mera.model.mllm import media_token_id

    text = "<image>\n" + prompt
    item = {"modality": "image", "prompt": text, "answer": None,
            "media": stage_model.branch("image").encoder.preprocess(image)}
    batch = MultimodalCollator(stage_model.tokenizer, stage_model, train=False)([item])
    chat = processor.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
    inputs = processor(text=chat, images=image, return_tensors="pt", add_special_tokens=False)
    want = batch["input_ids"].clone()
    want[want == media_token_id("image")] = llava.config.image_token_id
    assert torch.equal(inputs["input_ids"], want)
    assert torch.equal(inputs["pixel_values"], batch["media"]["image"])
    with torch.no_grad():
        return stage_model(batch).logits, llava(**inputs).logits


@pytest.fixture(scope="module")
def stage_models(run, assets):
    from mera.continual.stages import load_stage

    return {k: load_stage(assets, run[k]).eval() for k in ("stage1", "stage2")}


@pytest.fixture(scope="module")
def llava_exports(run, assets):
    out = {}
    for k in ("stage1", "stage2"):
        out[k] = run["base"] / f"llava-export-{k}"
        if not (out[k] / "mera_branches/manifest.json").is_file():
            export_stage(run[k], out[k], assets=assets, fmt="llava")
    return out


# ------------------------------------------------------------------------------ round trip


@pytest.mark.slow
def test_round_trip_gives_back_the_original_llava(run, llava_exports):
    """import-llava, a stage that changes nothing (the imported image branch is not trained), export:
    the original LLaVA again, every tensor equal, the same config, the same logits."""
    out = llava_exports["stage1"]
    ours, processor = _load_llava(out)
    original, _ = _load_llava(run["llava"])
    a, b = original.state_dict(), ours.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    want = json.loads((run["llava"] / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    for k in ("model_type", "image_token_index", "image_seq_length", "vision_feature_layer",
              "vision_feature_select_strategy", "projector_hidden_act", "multimodal_projector_bias",
              "tie_word_embeddings", "architectures"):
        assert got[k] == want[k], k
    for sub in ("vision_config", "text_config"):
        assert {k: v for k, v in got[sub].items() if k != "dtype"} == want[sub]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
    chat = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}],
                                                   tokenize=False, add_generation_prompt=True)
    inputs = processor(text=chat, images=image, return_tensors="pt", add_special_tokens=False)
    assert int((inputs["input_ids"] == 96).sum()) == 16  # image_seq_length copies of <image> (CLS dropped)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, original(**inputs).logits)
    # nothing else in the folder than a transformers LLaVA folder + mera_branches/ (no pickle)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "mera_branches"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]


# ------------------------------------------------------------------------------ a merged stage


@pytest.mark.slow
def test_merged_stage_runs_unchanged_in_transformers(run, assets, stage_models, llava_exports):
    """Stage 2 of MERA (the point expert's LoRA delta folded into the LLM at 0.5): the exported
    LLaVA's logits equal mera's forward of the stage on the same image + prompt."""
    from mera.continual import checkpoint as ckpt

    llava, processor = _load_llava(llava_exports["stage2"])
    original, _ = _load_llava(run["llava"])
    stage = stage_models["stage2"]
    for image in _images(assets):
        ours, theirs = _both_logits(stage, llava, processor, image)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the merge changed the model: the check has teeth
            inputs = processor(text=processor.tokenizer.apply_chat_template(
                [{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False, add_generation_prompt=True),
                images=image, return_tensors="pt", add_special_tokens=False)
            assert (original(**inputs).logits - theirs).abs().max() > 1e-3
    # the projector is the stage's image connector, renamed
    conn = ckpt.load_connectors(run["stage2"])["image"]
    sd = llava.state_dict()
    for i, name in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            assert torch.equal(sd[f"model.multi_modal_projector.{name}.{p}"], conn[f"{i}.{p}"])
    m = json.loads((llava_exports["stage2"] / "mera_branches/manifest.json").read_text())
    assert m["layout"] == "llava" and m["llm"] == ".." and m["source"]["stage"] == str(run["stage2"].resolve())
    assert m["modalities"]["image"]["from"] == "llava" and m["modalities"]["point"]["encoder"]["family"] == "toy_point"
    assert m["llava"]["image_token_added"] is False and m["llava"]["embedding_rows_added"] == 0


@pytest.mark.slow
def test_generate_on_the_llava_export_reproduces_the_run(run, assets, llava_exports, stage_models):
    """``mera generate`` on the LLaVA export: image from the LLaVA weights, point from mera_branches/;
    the run's own predictions of stage 2, exactly; the same logits as the stage."""
    from mera.interop.generate import answer_batch, load_target, make_item

    out = llava_exports["stage2"]
    assert is_export(out) and is_export(out / "mera_branches")
    loaded = load_target(out)
    assert loaded.kind == "export" and sorted(loaded.modalities) == ["image", "point"]
    assert loaded.max_new_tokens == 4
    preds = [json.loads(line) for line in (run["stage2"] / "predictions.jsonl").read_text().splitlines()]
    for m in ("image", "point"):
        samples = assets.sets[m].caption_test
        want = {p["id"]: p["prediction"] for p in preds if p["modality"] == m and p["task"] == "caption"}
        items = [{"id": s.id, "media": s.media, "modality": m, "prompt": s.prompt} for s in samples]
        rows = answer_batch(loaded, items, batch_size=assets.cfg.eval.batch_size)
        assert {r["id"]: r["answer"] for r in rows} == want
    from mera.model.collate import MultimodalCollator

    s = assets.sets["point"].qa_test[0]
    for model in (loaded.model, stage_models["stage2"]):
        batch = MultimodalCollator(model.tokenizer, model, train=False)(
            [make_item(loaded, "point", s.media, s.prompt)])
        with torch.no_grad():
            if model is loaded.model:
                a = model(batch).logits
            else:
                torch.testing.assert_close(model(batch).logits, a, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the image token added


def _fake_stage(run_dir: Path, cfg: dict, modality_connectors: dict, name: str = "stage_1_image") -> Path:
    """A finished stage (no folds) of a run whose config is ``cfg``: enough for load_stage and export."""
    from mera.continual import checkpoint as ckpt

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    stage = run_dir / "sequential/fine-tuning" / name
    ckpt.save_stage(stage, parent=None, folds=[], connectors=modality_connectors, info={"kind": "stage", "stage": 1})
    ckpt.mark_done(stage)
    return stage


def _run_config(model: dict) -> dict:
    return {"name": "fake", "threads": 1, "model": model, "data": {"toy": {}},
            "orders": {"sequential": list(model["branches"])}, "methods": [{"name": "Fine-Tuning", "strategies": ["finetune"]}]}


@pytest.mark.slow
def test_tokenizer_without_image_token_gets_one_and_a_row(run, tmp_path):
    """A stage whose LLM and tokenizer know no <image> (the LLM exactly as wide as the tokenizer):
    the export adds the token and one zero row; the old logits are unchanged, the new one is 0, and
    generation suppresses it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mera.continual.stages import load_stage
    from mera.data.toy_world import vocabulary
    from mera.interop.export import assets_for
    from mera.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary(), tmp_path / "llm")  # the toy tokenizer without <image>
    n = len(tok)
    llm = AutoModelForCausalLM.from_pretrained(str(run["imported"] / "llm"))
    llm.resize_token_embeddings(n)  # drops <image>'s row (and the spare ones)
    llm.save_pretrained(str(tmp_path / "llm"))
    branch = yaml.safe_load((run["imported"] / "example_config.yaml").read_text())["model"]["branches"]["image"]
    stage = _fake_stage(tmp_path / "run", _run_config({"llm": str(tmp_path / "llm"), "branches": {"image": branch}}),
                        {"image": load_file(branch["pretrained_connector"])})
    out = tmp_path / "export"
    info = export_stage(stage, out, fmt="llava")
    assert info["llava"]["image_token_added"] is True and info["llava"]["embedding_rows_added"] == 1
    assert info["llava"]["image_token_index"] == n
    llava, processor = _load_llava(out)
    assert llava.config.image_token_id == n and llava.config.text_config.vocab_size == n + 1
    assert llava.generation_config.suppress_tokens == [n]
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == n
    stage_model = load_stage(assets_for(tmp_path / "run"), stage).eval()
    rng = np.random.default_rng(1)
    ours, theirs = _both_logits(stage_model, llava, processor, rng.integers(0, 256, (32, 20, 3), dtype=np.uint8))
    assert theirs.shape[-1] == ours.shape[-1] + 1
    torch.testing.assert_close(theirs[..., :n], ours, rtol=1e-5, atol=1e-5)
    assert torch.all(theirs[..., n] == 0)


@pytest.mark.slow
def test_bfloat16_stage_is_exported_in_bfloat16(run, tmp_path):
    """A bfloat16 LLM with a float32 CLIP tower and connector: the export is all bfloat16 (the tower
    cast on a copy: the run's shared encoder stays float32); logits within bfloat16 rounding of
    mera's (the projector is rounded, mera keeps it in float32)."""
    from safetensors.torch import load_file

    from mera.continual.stages import load_stage
    from mera.interop.export import assets_for

    branch = yaml.safe_load((run["imported"] / "example_config.yaml").read_text())["model"]["branches"]["image"]
    stage = _fake_stage(tmp_path / "run", _run_config({"llm": str(run["imported"] / "llm"), "dtype": "bfloat16",
                                                       "branches": {"image": branch}}),
                        {"image": load_file(branch["pretrained_connector"])})
    assets = assets_for(tmp_path / "run")
    info = export_stage(stage, tmp_path / "out", fmt="llava", assets=assets)
    assert info["dtype"] == "bfloat16" and info["llava"]["connector_dtype"] == {"stage": "float32",
                                                                                "export": "bfloat16"}
    assert next(assets.encoders["image"].parameters()).dtype == torch.float32
    llava, processor = _load_llava(tmp_path / "out")
    assert {v.dtype for v in llava.state_dict().values()} == {torch.bfloat16}
    ours, theirs = _both_logits(load_stage(assets, stage).eval(), llava, processor,
                                np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(theirs.float(), ours.float(), rtol=0, atol=1e-2)


# ------------------------------------------------------------------------------ refusals and --force


def _clip_branch(connector: dict | None = None) -> dict:
    return {"encoder": {"family": "hf_clip", "path": "clip"}, "connector": connector or {"type": "mlp"}}


@pytest.mark.parametrize("branches,connectors,needle", [
    ({"point": {"encoder": {"family": "toy_point", "path": "p"}}}, ["point"],
     "this stage has no image branch (it has: point)"),
    ({"image": {"encoder": {"family": "toy_image", "path": "i"}}}, ["image"],
     "its image encoder is 'toy_image', not hf_clip"),
    ({"image": _clip_branch({"type": "qformer"})}, ["image"], "its image connector is 'qformer', not mlp"),
    ({"image": _clip_branch({"type": "mlp", "depth": 3})}, ["image"], "an mlp of depth 3, not 2"),
])
def test_llava_export_refuses_a_stage_without_a_clip_mlp_image_branch(tmp_path, branches, connectors, needle):
    stage = _fake_stage(tmp_path / "run", _run_config({"llm": "llm", "branches": branches}),
                        {m: {"w": torch.zeros(1)} for m in connectors})
    with pytest.raises(ConfigError) as e:
        export_stage(stage, tmp_path / "out", fmt="llava")
    msg = str(e.value)
    assert msg.startswith(str(stage.resolve())) and "--format llava needs an image branch" in msg and needle in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--format 'onnx': unknown export format; known: mera, llava"):
        export_stage(stage, tmp_path / "out", fmt="onnx")


def test_connector_of_another_width_is_refused(imported):
    """An mlp of depth 2 whose hidden width is not the LLM's has no place in LLaVA's projector."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mera.interop.llava_export import _check_loaded
    from mera.model.connectors import MLPConnector
    from mera.model.encoders.base import load_encoder
    from mera.model.mllm import MultimodalLM

    out = imported[0]
    llm = AutoModelForCausalLM.from_pretrained(str(out / "llm"))
    enc = load_encoder("hf_clip", str(out / "encoders/image"))
    for hidden, ok in ((None, True), ([64], False)):
        model = MultimodalLM(llm, AutoTokenizer.from_pretrained(str(out / "llm")))
        model.add_branch("image", enc, MLPConnector(32, 48, depth=2, hidden_sizes=hidden))
        if ok:
            assert _check_loaded(Path("S"), model)[0] is enc
        else:
            with pytest.raises(ConfigError, match=r"S: the image connector is not LLaVA's mlp2x_gelu projector "
                                                  r"Linear\(32, 48\) - GELU - Linear\(48, 48\)"):
                _check_loaded(Path("S"), model)


@pytest.mark.slow
def test_force_replaces_only_an_export(run, assets, tmp_path):
    out = tmp_path / "out"
    export_stage(run["stage1"], out, assets=assets)  # mera's format
    assert (out / "manifest.json").is_file()
    with pytest.raises(MeraError, match="already exists and is not empty"):
        export_stage(run["stage1"], out, assets=assets, fmt="llava")
    export_stage(run["stage1"], out, assets=assets, fmt="llava", force=True)  # an export of the other format
    assert (out / "mera_branches/manifest.json").is_file() and not (out / "manifest.json").exists()
    export_stage(run["stage1"], out, assets=assets, force=True)  # and back
    assert (out / "manifest.json").is_file() and not (out / "mera_branches").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MeraError, match="--force replaces only a folder written by the same command"):
        export_stage(run["stage1"], other, assets=assets, fmt="llava", force=True)
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic: no temporary folder left behind


def test_cli_format_option():
    import argparse

    from mera.cli import export

    p = argparse.ArgumentParser()
    export.add_parser(p.add_subparsers(dest="command"))
    assert p.parse_args(["export", "S", "--out", "D"]).fmt == "mera"
    assert p.parse_args(["export", "S", "--out", "D", "--format", "llava"]).fmt == "llava"
    with pytest.raises(SystemExit):
        p.parse_args(["export", "S", "--out", "D", "--format", "onnx"])

