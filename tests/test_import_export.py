"""``mera import-llava`` checked numerically against transformers' own LLaVA (three checkpoint
layouts, tied head, bias-free projector, another feature layer), its refusals, a micro run whose
image branch is the imported LLaVA (expert not trained), and ``mera export`` of a stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mera.errors import CheckpointError, ConfigError, MeraError
from mera.interop.export import export_stage
from mera.interop.llava import LLAVA15_CHAT_TEMPLATE, import_llava

# LLaVA's processor template: list contents ({"type": "image"}, {"type": "text"}), as in llava-hf folders
PROCESSOR_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ------------------------------------------------------------------------------ a tiny LLaVA


def toy_llava_tokenizer():
    from mera.data.toy_world import vocabulary
    from mera.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary())
    tok.add_tokens(["<image>"], special_tokens=True)  # as LLaVA's tokenizer has it
    return tok


def tiny_llava(folder: Path, *, layout: str = "saved", tie: bool = False, bias: bool = True, layer=-2,
               strategy: str = "default", template: str | None = "toy", seed: int = 0) -> Path:
    """A random LLaVA (tiny CLIP + tiny Llama) saved the transformers way, with a tokenizer and a
    CLIP image processor. ``layout``: "saved" (what transformers 5 writes), "memory" (the
    ``model.vision_tower`` / ``model.language_model`` names of transformers 4.52-4.57) or
    "llava-hf" (``vision_tower.vision_model.*``, as the llava-hf checkpoints)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = toy_llava_tokenizer()
    if template != "toy":
        tok.chat_template = template
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=len(tok) + 4, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=tie)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=16, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      multimodal_projector_bias=bias, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # biases are zero at init: make them matter
        for n, p in llava.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    llava.save_pretrained(str(folder))
    file = folder / "model.safetensors"
    if layout == "memory":
        state = {k: v.detach().clone().contiguous() for k, v in llava.state_dict().items()}
        if tie:
            state.pop("lm_head.weight")
        save_file(state, str(file), metadata={"format": "pt"})
    elif layout == "llava-hf":
        state = load_file(str(file))
        state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                 for k, v in state.items()}
        save_file(state, str(file), metadata={"format": "pt"})
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                   vision_feature_select_strategy=strategy).save_pretrained(str(folder))
    return folder


def imported_branch(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "example_config.yaml").read_text())["model"]["branches"]["image"]


def check_against_llava(llava_dir: Path, model_dir: Path) -> None:
    """The imported encoder + connector give LLaVA's image features; the imported LLM its logits."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from mera.model.connectors import ConnectorConfig, build_connector
    from mera.model.encoders.base import load_encoder

    ref = LlavaForConditionalGeneration.from_pretrained(str(llava_dir)).eval()
    branch = imported_branch(model_dir)
    enc = load_encoder(branch["encoder"]["family"], branch["encoder"]["path"], **branch["encoder"].get("options", {}))
    llm = AutoModelForCausalLM.from_pretrained(str(model_dir / "llm")).eval()
    conn = build_connector(ConnectorConfig(**branch["connector"]), enc.output_dim, llm.config.hidden_size)
    conn.load_state_dict(load_file(branch["pretrained_connector"]))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    pixels = torch.stack([enc.preprocess(im) for im in images])
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    with torch.no_grad():
        ours = conn(enc(pixels))
        theirs = torch.stack(list(ref.get_image_features(pixel_values=pixels).pooler_output))
        assert ours.shape == theirs.shape == (2, 16, 48)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(llm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        # a wrong feature layer would not match: the check has teeth
        other = -1 if enc.feature_layer != -1 else -2
        wrong = conn(enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states[other][:, 1:])
        assert not torch.allclose(wrong, theirs, atol=1e-3)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def imported(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "model"
    return out, import_llava(llava_dir, out)


# ------------------------------------------------------------------------------ import-llava


def test_import_reproduces_llava(llava_dir, imported):
    check_against_llava(llava_dir, imported[0])


@pytest.mark.parametrize("layout,kw", [
    ("memory", {"tie": True, "bias": False, "layer": -1}),  # transformers 4.52-4.57 names
    ("llava-hf", {"layer": -3}),  # vision_tower.vision_model.*
])
def test_import_other_layouts_and_variants(tmp_path, layout, kw):
    src = tiny_llava(tmp_path / "llava", layout=layout, seed=1, **kw)
    info = import_llava(src, tmp_path / "model")
    check_against_llava(src, tmp_path / "model")
    assert info["vision_feature_layer"] == kw["layer"]
    assert imported_branch(tmp_path / "model")["encoder"]["options"] == {"feature_layer": kw["layer"]}
    assert info["mapping"]["llm"]["tied_head"] is kw.get("tie", False)
    assert info["mapping"]["projector"]["zero_biases"] is (not kw.get("bias", True))
    if kw.get("tie"):
        assert "lm_head.weight" not in load_file(str(tmp_path / "model" / "llm" / "model.safetensors"))


def test_import_files_tokenizer_and_collator(imported):
    from transformers import AutoTokenizer

    from mera.model.collate import MultimodalCollator
    from mera.model.mllm import media_token_id

    out, info = imported
    assert json.loads((out / "import.json").read_text()) == info
    assert info["sizes"]["image_tokens"] == 16 and info["sizes"]["feature_dim"] == 32
    assert info["sizes"]["llm_hidden"] == 48 and info["sizes"]["projector_params"] == 32 * 48 + 48 + 48 * 48 + 48
    assert info["image_processor"].startswith("copied") and (out / "encoders/image/preprocessor_config.json").is_file()
    assert set(load_file(str(out / "connectors/image.safetensors"))) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert not list((out / "llm").glob("*.bin")) and (out / "llm/model.safetensors").is_file()
    branch = imported_branch(out)
    assert branch["encoder"] == {"family": "hf_clip", "path": str(out / "encoders/image")}
    assert branch["connector"] == {"type": "mlp"}
    # the <image> token stays in the vocabulary, and does not disturb mera's placeholder splicing
    tok = AutoTokenizer.from_pretrained(str(out / "llm"))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert info["tokenizer"]["image_token_in_vocab"] and image_id != tok.unk_token_id

    class _Model:
        def media_token_id(self, m):
            return media_token_id(m)

        def num_media_tokens(self, m):
            return 16

    batch = MultimodalCollator(tok, _Model(), train=True)(
        [{"modality": "image", "prompt": "<image>\ndescribe the image .", "answer": "a red circle .",
          "features": torch.zeros(16, 32)}])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(media_token_id("image")) == 16 and image_id not in ids and tok.unk_token_id not in ids


def test_import_sets_llava15_template_when_the_tokenizer_has_none_for_strings(tmp_path):
    from transformers import AutoTokenizer

    src = tiny_llava(tmp_path / "llava", template=PROCESSOR_TEMPLATE)
    info = import_llava(src, tmp_path / "model")
    assert info["tokenizer"]["chat_template"] == ("set to LLaVA-1.5's conversation format "
                                                  "(the tokenizer's template did not render string contents)")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model/llm"))
    assert tok.chat_template == LLAVA15_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nwhat colour ?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<s>A chat between") and text.endswith(" USER: <image>\nwhat colour ? ASSISTANT:")


def _edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,needle", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full'"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer [-2, -1]"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu'"),
    ({"model_type": "llava_next"}, "model_type is 'llava_next'"),
])
def test_import_refuses_unsupported_variants(llava_dir, tmp_path, changes, needle):
    src = _edited(llava_dir, tmp_path / "src", **changes)
    with pytest.raises(ConfigError, match=None) as e:
        import_llava(src, tmp_path / "out")
    assert needle in str(e.value) and str(src / "config.json") in str(e.value)
    assert not (tmp_path / "out").exists()


def test_import_refuses_pickle_and_existing_output(llava_dir, imported, tmp_path):
    src = shutil.copytree(llava_dir, tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        import_llava(src, tmp_path / "out")
    (src / "pytorch_model.bin").rename(src / "model.safetensors")
    for f in src.iterdir():  # no tokenizer in the folder: refused before any work, --tokenizer named
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            f.unlink()
    with pytest.raises(CheckpointError, match="cannot load a tokenizer .*give one with --tokenizer DIR"):
        import_llava(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    info = import_llava(src, tmp_path / "out", tokenizer=str(imported[0] / "llm"))
    assert info["tokenizer"]["source"] == str(imported[0] / "llm")
    with pytest.raises(MeraError, match="already exists and is not empty"):
        import_llava(llava_dir, imported[0])


# ------------------------------------------------------------------------------ a micro run on the import


def micro_run(base: Path) -> dict:
    """Tiny LLaVA -> import -> run [image (imported, not trained), point (toy encoder)] with MERA.

    Built once under ``base`` (a session folder) and reused by test_generate.py; MERA_HOME must
    point to ``base / "home"``."""
    from mera.config import load_config
    from mera.model.encoders.toy import build_toy_encoder, save_toy_encoder
    from mera.runner.loop import StageLoop
    from mera.runner.run_config import RunConfig

    ready = base / "READY.json"
    if ready.is_file():
        return {k: Path(v) for k, v in json.loads(ready.read_text()).items()}
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    llava = tiny_llava(base / "llava")
    model_dir = base / "imported"
    import_llava(llava, model_dir)
    torch.manual_seed(1)
    save_toy_encoder(build_toy_encoder("point", n_points=64, num_groups=8, group_size=8, dim=32, width=32),
                     base / "point")
    model = yaml.safe_load((model_dir / "example_config.yaml").read_text())["model"]
    model["branches"]["point"] = {"encoder": {"family": "toy_point", "path": str(base / "point")}}
    cfg = {
        "name": "llava-micro", "threads": 1, "model": model,
        "data": {"toy": {"n_train_caption": 8, "n_train_qa": 8, "n_test_caption": 4, "n_test_qa": 4,
                         "n_points": 64}},
        "orders": {"sequential": ["image", "point"]},
        "methods": [{"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1}],
        "train": {"align": {"epochs": 1, "batch_size": 8, "lr_connector": 1e-3},
                  "instruct": {"epochs": 1, "batch_size": 8, "lr_connector": 1e-3, "lr_lora": 5e-3},
                  "realign": {"epochs": 1, "batch_size": 4, "lr_connector": 1e-3},
                  "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "eval": {"batch_size": 8, "max_new_tokens": 4},
    }
    (base / "micro.yaml").write_text(yaml.safe_dump(cfg))
    run = base / "run"
    StageLoop(load_config(base / "micro.yaml", [], RunConfig), run, config_dir=base, progress=False,
              log=lambda m: None).run()
    paths = {"base": base, "llava": llava, "imported": model_dir, "run": run,
             "stage1": run / "sequential/mera-10/stage_1_image", "stage2": run / "sequential/mera-10/stage_2_point"}
    ready.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "llava-micro"
    mp = pytest.MonkeyPatch()
    mp.setenv("MERA_HOME", str(base / "home"))
    yield micro_run(base)
    mp.undo()


@pytest.mark.slow
def test_micro_run_with_the_imported_image_branch(run):
    from mera.continual import checkpoint as ckpt

    expert = ckpt.read_manifest(run["run"] / "experts/image")
    assert expert["folds"] == [] and expert["log"]["pretrained_connector"].endswith("image.safetensors")
    assert "align" not in expert["log"]  # nothing trained
    assert not list((run["run"] / "experts/image").glob("*delta*.safetensors"))
    conn = ckpt.load_connectors(run["run"] / "experts/image")["image"]
    ref = load_file(str(run["imported"] / "connectors/image.safetensors"))
    assert set(conn) == set(ref) and all(torch.equal(conn[k], ref[k]) for k in ref)
    # the point expert was trained (LoRA delta), stage 2 completed with scores for both modalities
    assert ckpt.read_manifest(run["run"] / "experts/point")["folds"]
    assert ckpt.is_done(run["stage2"])
    rows = [line.split(",") for line in (run["stage2"] / "scores.csv").read_text().splitlines()[1:]]
    assert sorted((r[4], r[6]) for r in rows) == [("image", "caption"), ("image", "qa"),
                                                   ("point", "caption"), ("point", "qa")]
    m2 = ckpt.read_manifest(run["stage2"])
    assert m2["folds"][0]["coef"] == 0.5 and "realign" in m2["log"] and m2["modalities"] == ["image", "point"]


# ------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def assets(run):
    from mera.interop.export import assets_for

    return assets_for(run["run"], data=True)  # the tests compare with the run's own test sets


@pytest.fixture(scope="module")
def exported(run, assets):
    out = run["base"] / "export-stage2"
    if not (out / "manifest.json").is_file():
        export_stage(run["stage2"], out, assets=assets)
    return out


@pytest.mark.slow
def test_export_folds_the_llm_exactly(run, assets, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mera.continual import checkpoint as ckpt

    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["format"] == "mera-export-v1" and set(manifest["modalities"]) == {"image", "point"}
    assert manifest["modalities"]["image"]["encoder"] == {"family": "hf_clip", "options": {},
                                                          "path": str(run["imported"] / "encoders/image")}
    assert manifest["source"]["stage"] == str(run["stage2"].resolve())
    from mera.continual.stages import load_stage

    stage = load_stage(assets, run["stage2"])
    plain = AutoModelForCausalLM.from_pretrained(str(exported / "llm")).eval()
    tok = AutoTokenizer.from_pretrained(str(exported / "llm"))
    ids = torch.tensor([tok("red circle on the left .")["input_ids"]])
    with torch.no_grad():
        a, b = stage.llm(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(a, b)
    base = AutoModelForCausalLM.from_pretrained(str(run["imported"] / "llm")).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, b)  # the stage's deltas are folded in
    conns = ckpt.load_connectors(run["stage2"])
    for m in ("image", "point"):
        got = load_file(str(exported / f"connectors/{m}.safetensors"))
        assert all(torch.equal(got[k], conns[m][k]) for k in conns[m])


def test_export_refuses_pathweave_and_unfinished_stages(tmp_path):
    from mera.continual import checkpoint as ckpt

    pw = tmp_path / "run/seq/pathweave/stage_2_point"
    ckpt.save_stage(pw, parent=None, folds=[], connectors={},
                    info={"kind": "stage", "stage": 2, "llm_modules": {"kind": "pathweave"}})
    with pytest.raises(CheckpointError, match="not a finished stage"):
        export_stage(pw, tmp_path / "out")
    ckpt.mark_done(pw)
    with pytest.raises(CheckpointError, match="cannot be folded into a plain HF model"):
        export_stage(pw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_parsers():
    import argparse

    from mera.cli import export, import_llava

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    import_llava.add_parser(sub)
    export.add_parser(sub)
    a = p.parse_args(["import-llava", "L", "--out", "M", "--tokenizer", "T"])
    assert (a.llava_dir, a.out, a.tokenizer, a.force, a.func) == ("L", "M", "T", False, import_llava.run)
    a = p.parse_args(["export", "S", "--out", "D", "--force"])
    assert (a.stage_dir, a.out, a.force, a.config_dir, a.func) == ("S", "D", True, None, export.run)
    with pytest.raises(SystemExit):
        p.parse_args(["export", "S"])  # --out is required
