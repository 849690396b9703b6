"""configs/paper/*.yaml: the paper's models, data, recipe, orders and methods, with every model and data
path written through ${paths.models} / ${paths.data}; validated and planned (``--dry-run``) without
any weights."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mera.config import dump_config, load_config
from mera.data.convert import CONVERTERS
from mera.runner.run_config import RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"
GRID = PAPER / "grid.yaml"
SEQ = PAPER / "mera_sequential.yaml"
CONFIGS = [GRID, SEQ]
OVERRIDES = ["paths.models=/m", "paths.data=/d"]


def _load(path, extra=()):
    return load_config(path, [*OVERRIDES, *extra], RunConfig)


def _strings(node, where=""):
    """(dotted key, value) of every string in a nested dict / list."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{where}.{k}".lstrip("."))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{where}.{i}")


def test_the_paper_folder_holds_the_two_configs():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == ["grid.yaml", "mera_sequential.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_model_and_data_path_goes_through_the_paths_variables(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw["paths"]) == {"models", "data"}
    outside = {k: v for k, v in raw.items() if k != "paths"}
    for key, value in _strings(outside):
        assert not value.startswith("/"), f"{key}: a hard-coded absolute path {value!r}"
    cfg = _load(path)
    text = dump_config(cfg)
    assert "${" not in text and "/path/to" not in text  # every variable substituted by the overrides
    assert cfg.paths == {"models": "/m", "data": "/d"}
    assert cfg.model.llm == "/m/Meta-Llama-3-8B-Instruct" and cfg.model.tokenizer is None
    for m, b in cfg.model.branches.items():
        assert b.encoder.path.startswith("/m/"), m
    assert cfg.model.branches["audio"].connector.init_from == "/m/bert-base-uncased"
    # without overrides the placeholders of the file itself are used
    default = load_config(path, [], RunConfig)
    assert default.model.llm == "/path/to/models/Meta-Llama-3-8B-Instruct"
    assert default.data.sets["image"].caption_train == "/path/to/data/mera/mscoco_train.json"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_data_files_are_the_converters_outputs(path):
    """Each modality's four files are ``<set>_<split>.json`` of ``mera data convert`` for a set of that
    modality (caption sets as captions, QA sets as QA) in ``${paths.data}/mera``."""
    cfg = _load(path)
    assert set(cfg.data.sets) == {"image", "video", "audio", "point"} and cfg.data.toy is None
    want = {"image": ("mscoco", "okvqa"), "video": ("msvd", "msvd_qa"), "audio": ("audiocaps", "clotho_aqa"),
            "point": ("cap3d", "cap3d_qa")}
    for m, s in cfg.data.sets.items():
        for key in ("caption_train", "caption_test", "qa_train", "qa_test"):
            p = getattr(s, key)
            got = re.fullmatch(r"/d/mera/(\w+)_(train|test)\.json", p)
            assert got, (m, key, p)
            name, split = got.groups()
            task = key.split("_")[0]
            assert split == key.split("_")[1]
            spec = CONVERTERS[name]
            assert (spec.modality, spec.task) == (m, task), (m, key, name)
            assert name == want[m][0 if task == "caption" else 1]
    names = {m: (s.caption_name, s.qa_name) for m, s in cfg.data.sets.items()}
    assert names == {"image": ("MSCOCO", "OK-VQA"), "video": ("MSVD", "MSVD-QA"),
                     "audio": ("AudioCaps", "Clotho-AQA"), "point": ("Cap3D", "Cap3D-QA")}
    assert cfg.data.max_test is None  # the converters already draw the paper's 1K test subsets


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_encoders_and_connectors_are_the_papers(path):
    from mera.config.registry import lookup

    cfg = _load(path)
    br = cfg.model.branches
    assert {m: b.encoder.family for m, b in br.items()} == {
        "image": "hf_clip", "video": "hf_clip_video", "audio": "beats", "point": "point_bert"}
    assert br["image"].encoder.path == br["video"].encoder.path == "/m/clip-vit-large-patch14-336"
    assert br["video"].encoder.options["frames"] == 4 and br["video"].encoder.options["pool"] == 2
    # every option is a parameter of its family's loader (a misspelt option would fail only at run time)
    for b in br.values():
        entry = lookup("encoder", b.encoder.family)
        entry.params.model_validate(b.encoder.options)
        inspect.signature(entry.obj).bind(b.encoder.path, **b.encoder.options)
    img, vid, aud, pt = (br[m].connector for m in ("image", "video", "audio", "point"))
    assert (img.type, img.depth, img.hidden_sizes) == ("mlp", 2, None)  # LLaVA-1.5 mlp2x_gelu
    assert (vid.type, vid.depth, vid.hidden_sizes) == ("mlp", 2, None)
    assert (aud.type, aud.num_queries, aud.cross_attention_frequency) == ("qformer", 32, 2)
    assert (pt.type, pt.depth, pt.hidden_sizes) == ("mlp", 3, [1024, 2048])  # PointLLM's projector
    assert cfg.model.dtype in ("bfloat16", "float16")
    for b in br.values():
        assert b.pretrained_connector is None


def test_point_connector_is_pointllms_projector_shape():
    import torch

    from mera.model.connectors import build_connector

    cfg = _load(GRID)
    conn = build_connector(cfg.model.branches["point"].connector, 384, 64)  # Point-BERT width 384; H = 64 here
    linears = [m for m in conn if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(384, 1024), (1024, 2048), (2048, 64)]
    assert sum(isinstance(m, torch.nn.GELU) for m in conn) == 2


def test_audio_qformer_initialises_from_a_bert_folder_with_32_queries(tmp_path):
    """The config's Q-Former section with init_from pointed at a (tiny, random) BERT folder."""
    import torch
    from transformers import BertConfig, BertModel

    from mera.model.connectors import build_connector

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16))
    bert.save_pretrained(tmp_path / "bert")
    cfg = _load(GRID, [f"paths.models={tmp_path}"])
    qcfg = cfg.model.branches["audio"].connector
    assert qcfg.init_from == str(tmp_path / "bert-base-uncased")
    conn = build_connector(qcfg.model_copy(update={"init_from": str(tmp_path / "bert")}), 768, 64)
    assert tuple(conn.query_tokens.shape) == (1, 32, 32)  # 32 queries of the BERT width
    sd = conn.qformer.state_dict()
    assert torch.equal(sd["encoder.layer.1.attention.attention.query.weight"],
                       bert.state_dict()["encoder.layer.1.attention.self.query.weight"])
    out = conn(torch.randn(2, 496, 768))  # BEATs: 10 s -> 496 tokens of 768
    assert tuple(out.shape) == (2, 32, 64)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_is_the_papers(path):
    cfg = _load(path)
    t = cfg.train
    assert (t.lora.r, t.lora.alpha, t.lora.target_modules) == (128, 128, "all-linear")
    assert (t.align.batch_size, t.instruct.batch_size, t.realign.batch_size) == (128, 16, 16)
    assert t.align.lr_connector == 1e-3
    assert (t.instruct.lr_connector, t.instruct.lr_lora) == (2e-5, 2e-4)
    assert t.realign.lr_connector == 2e-5
    for ph in (t.align, t.instruct, t.realign):
        assert ph.epochs == 1 and ph.warmup_ratio == 0.03
        assert ph.micro_batch_size is not None and ph.batch_size % ph.micro_batch_size == 0
    # the same numbers as mera's defaults (METHOD.md section 2), which the file writes out
    d = TrainConfig()
    for name in ("align", "instruct", "realign"):
        mine, ref = getattr(t, name), getattr(d, name)
        for f in ("epochs", "batch_size", "lr_connector", "lr_lora", "warmup_ratio", "weight_decay"):
            assert getattr(mine, f) == getattr(ref, f), (name, f)
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (d.lora.r, d.lora.alpha, d.lora.dropout)
    assert t.gradient_checkpointing is True
    assert t.cache_features is False  # an in-memory cache of the real sets' features would not fit
    assert t.checkpoint_every > 0  # phases are hours long: resumable mid-phase
    assert cfg.eval.judge == "openai"
    assert cfg.eval.judge_options == {"model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}


def test_offline_judge_overrides_of_the_config_comment_work():
    from mera.eval.judges import ExactMatchJudge, get_judge

    for path in CONFIGS:
        assert "eval.judge=exact_match 'eval.judge_options={}'" in path.read_text()
        cfg = _load(path, ["eval.judge=exact_match", "eval.judge_options={}"])
        assert isinstance(get_judge(cfg.eval.judge, **cfg.eval.judge_options), ExactMatchJudge)
        cfg = _load(path, ["eval.judge=local_llm", "eval.judge_options={path: /models/x}"])
        assert (cfg.eval.judge, cfg.eval.judge_options) == ("local_llm", {"path": "/models/x"})


def test_grid_orders_and_methods_equal_the_toy_grid():
    cfg = _load(GRID)
    toy = load_config(ROOT / "configs" / "toy" / "paper_grid.yaml", [], RunConfig)
    assert cfg.orders == {"sequential": ["image", "video", "audio", "point"],
                          "reverse": ["point", "audio", "video", "image"]}
    assert cfg.orders == toy.orders
    assert [m.name for m in cfg.methods] == [m.name for m in toy.methods]
    assert len(cfg.methods) == 13
    for mine, ref in zip(cfg.methods, toy.methods):
        # the same plug-ins and ratios; EWC's lambda was chosen on the toy's validation split
        a, b = mine.model_dump(), ref.model_dump()
        for x in a["strategies"] + b["strategies"]:
            x.pop("lam", None)
        assert a == b, mine.name
    ratios = {m.name: x["ratio"] for m in cfg.methods for x in m.strategies if x["name"] in ("realign", "replay")}
    assert ratios["MERA (1%)"] == 0.01 and ratios["MERA (10%)"] == 0.10


def test_sequential_config_is_the_grid_restricted_to_ft_and_mera10():
    seq, grid = _load(SEQ), _load(GRID)
    assert seq.orders == {"sequential": grid.orders["sequential"]}
    assert [m.name for m in seq.methods] == ["Fine-Tuning", "MERA (10%)"]
    by_name = {m.name: m for m in grid.methods}
    for m in seq.methods:
        assert m == by_name[m.name]
    for section in ("paths", "model", "data", "train", "eval", "seed", "threads"):
        assert getattr(seq, section) == getattr(grid, section), section


@pytest.mark.parametrize("path,summary,probe", [
    (GRID, "4 experts, 104 stages", "reverse/mera-1/stage_4_image"),
    (SEQ, "4 experts, 8 stages", "sequential/mera-10/stage_4_point"),
], ids=["grid", "sequential"])
def test_cli_dry_run_prints_the_plan_without_models(path, summary, probe, tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(path), "--dry-run", *OVERRIDES, "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert summary in r.stdout and probe in r.stdout
    for m in ("image", "video", "audio", "point"):
        assert f"experts/{m}" in r.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing loaded, trained or written


def test_cli_reports_an_undefined_path_variable(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = SEQ.read_text().replace("${paths.models}/Meta-Llama-3-8B-Instruct", "${paths.llms}/Meta-Llama-3-8B-Instruct")
    assert text != SEQ.read_text()
    bad.write_text(text)
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(bad), "--dry-run", *OVERRIDES],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "paths.llms" in r.stderr and "Traceback" not in r.stderr
