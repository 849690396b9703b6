"""The plug-in shape (issue 11): one registry for every kind, methods as lists of plug-ins with
their own parameters checked when the config loads, and Deltas (LoRA or dense) in stage
checkpoints."""

import subprocess
import sys

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from mera.config import dump_config, load_config, registry
from mera.continual import checkpoint as ckpt
from mera.continual.deltas import Delta
from mera.continual.methods import MethodConfig, build_method
from mera.errors import CheckpointError, ConfigError
from mera.runner.run_config import RunConfig
from mera.train.lora import LoraSettings, attach_lora, detach_lora, extract_lora


def test_every_kind_lists_its_builtins():
    assert {"finetune", "cma"} <= set(registry.names("merge"))
    assert {"replay", "realign", "ewc", "pathweave"} <= set(registry.names("strategy"))
    assert {"toy_image", "toy_video", "toy_audio", "toy_point", "hf_clip", "beats", "point_bert"} <= set(
        registry.names("encoder"))
    assert {"mlp", "qformer"} <= set(registry.names("connector"))
    assert {"exact_match", "openai", "local_llm"} <= set(registry.names("judge"))
    assert registry.lookup("merge", "merge").name == "cma"  # the first release's name
    with pytest.raises(ConfigError, match="did you mean 'realign'"):
        registry.lookup("strategy", "realing")


def _method(**kw):
    return MethodConfig(name="m", **kw)


def test_legacy_shorthands_become_plugin_parameters():
    m = _method(strategies=["merge", "realign"], replay_ratio=0.01)
    assert m.strategies == [{"name": "cma"}, {"name": "realign", "ratio": 0.01}]
    m = _method(strategies=["replay", "realign"], replay_ratio=0.1, realign_ratio=0.05)
    assert m.strategies == [{"name": "replay", "ratio": 0.1}, {"name": "realign", "ratio": 0.05}]
    m = _method(strategies=["ewc"], ewc_lambda=10, fisher_ratio=0.05)
    assert m.strategies == [{"name": "ewc", "lam": 10.0, "gamma": 1.0, "fisher_ratio": 0.05, "adapter": "continue"}]
    # defaults are the first release's: replay_ratio 0.1 for replay and realign
    assert _method(strategies=["finetune", "realign"]).strategies[1] == {"name": "realign", "ratio": 0.1}
    # the new form, with an explicit parameter winning over a shorthand
    m = _method(strategies=[{"name": "replay", "ratio": 0.2}], replay_ratio=0.1)
    assert m.strategies == [{"name": "replay", "ratio": 0.2}]
    strategies, merge = build_method(_method(strategies=["cma", {"name": "realign", "ratio": 0.3}]))
    assert [s.name for s in strategies] == ["realign"] and strategies[0].params.ratio == 0.3
    assert type(merge).__name__ == "CMA"


@pytest.mark.parametrize("items, words", [
    (["finetune", "merge"], ["finetune and cma are both merge rules"]),
    (["ewc", "cma"], ["ewc keeps its LLM change whole", "cma"]),
    (["pathweave", "merge", "realign"], ["pathweave trains its own LLM modules", "cma", "would never run", "drop cma"]),
    (["ewc", "pathweave"], ["ewc (LLMPolicy.CONTINUED_ADAPTER) and pathweave (LLMPolicy.OWN_MODULES) both decide",
                            "keep one"]),
    (["realign", "realign"], ["realign listed twice"]),
    ([{"name": "realign", "ratio": 0}], ["ratio", "greater than 0"]),
    ([{"name": "ewc", "lambda": 3}], ["lambda: unknown key", "known keys: lam, gamma, fisher_ratio, adapter"]),
    ([{"ratio": 0.1}], ["has no name"]),
    (["finetun"], ["unknown strategy 'finetun'", "did you mean 'finetune'"]),
])
def test_bad_combinations_fail_when_the_config_loads(items, words):
    with pytest.raises(Exception) as e:
        _method(strategies=items)
    for w in words:
        assert w in str(e.value)


def test_dry_run_reports_a_bad_combination_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"branches": {"image": {"encoder": {"family": "toy_image"}}}},
                                   "data": {"toy": {}}, "orders": {"s": ["image"]},
                                   "methods": [{"name": "FT", "strategies": ["finetune", "merge"]}]}))
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(cfg), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert str(cfg) in r.stderr and "methods.0" in r.stderr and "both merge rules" in r.stderr


def test_resolved_config_round_trips(tmp_path):
    """config.yaml of a run lists every plug-in with all its parameters, and reads back the same."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs/toy/paper_grid.yaml", [], RunConfig)
    text = dump_config(cfg)
    assert "replay_ratio" not in text and "- name: cma" in text
    (tmp_path / "c.yaml").write_text(text)
    assert dump_config(load_config(tmp_path / "c.yaml", [], RunConfig)) == text


# ------------------------------------------------------------------------------ deltas


def _llm(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def _lora(llm, seed=1) -> Delta:
    pm = attach_lora(llm, LoraSettings(r=2, alpha=4, dropout=0.0), seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    d = Delta.lora(extract_lora(pm))
    detach_lora(pm)
    return d


def test_dense_and_factored_deltas_fold_alike_and_save_load(tmp_path):
    base = _llm()
    delta = _lora(base)
    dense = delta.to_dense()
    assert dense.kind == "dense" and dense.numel() > delta.numel()
    a, b = _llm(), _llm()
    delta.fold(a, 0.5)
    dense.fold(b, 0.5)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-7), n
    # a stage that folds a dense and a factored delta reloads to the same weights
    folder = tmp_path / "stage"
    ckpt.save_stage(folder, parent=None, folds=[(dense, 0.25), (delta, -0.25)], trained=delta, connectors={})
    m = ckpt.read_manifest(folder)
    assert m["format"] == "mera-stage-v2" and [e["kind"] for e in m["folds"]] == ["dense", "lora"]
    assert m["trained"]["file"] == m["folds"][1]["file"] and m["trained"]["coef"] == -0.25  # written once
    c = _llm()
    ckpt.apply_stage_llm(c, folder)
    for (n, x), (_, y) in zip(c.state_dict().items(), _llm().state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), n  # +1/4 and -1/4 of the same update cancel
    trained, coef = ckpt.load_trained(folder)
    assert coef == -0.25 and all(torch.equal(trained.modules[k]["A"], delta.modules[k]["A"]) for k in delta.modules)


def test_a_delta_of_another_llm_is_refused(tmp_path):
    delta = _lora(_llm())
    folder = tmp_path / "stage"
    ckpt.save_stage(folder, parent=None, folds=[(delta.to_dense(), 1.0)], connectors={})
    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(CheckpointError, match="dense delta of .* has shape"):
        ckpt.apply_stage_llm(other, folder)


def test_history_is_every_trained_delta_of_the_chain_root_first(tmp_path):
    d1, d2 = _lora(_llm(), 1), _lora(_llm(), 2)
    ckpt.save_stage(tmp_path / "a", parent=None, folds=[(d1, 1.0)], trained=d1, connectors={})
    ckpt.save_stage(tmp_path / "b", parent=tmp_path / "a", folds=[], connectors={})  # a stage 1 (= expert)
    ckpt.save_stage(tmp_path / "c", parent=tmp_path / "b", folds=[(d2, 0.5)], trained=d2, connectors={})
    hist = ckpt.ChainView(tmp_path / "c").trained()
    assert len(hist) == 2
    name = next(iter(d1.modules))
    assert torch.equal(hist[0].modules[name]["B"], d1.modules[name]["B"])
    assert torch.equal(hist[1].modules[name]["B"], d2.modules[name]["B"])
    assert ckpt.ChainView(tmp_path / "b").last_trained()[1] == 1.0


def test_a_version_1_manifest_is_read(tmp_path):
    """A stage written by the first release: "deltas" of LoRA files, all folded; the trained delta
    is the last one folded with a positive coefficient."""
    import json

    from safetensors.torch import save_file

    from mera.train.lora import lora_to_tensors

    d_prev, d_new = _lora(_llm(), 1), _lora(_llm(), 2)
    folder = tmp_path / "v1"
    folder.mkdir()
    entries = []
    for k, (d, c) in enumerate([(d_prev, -1.0), (d_new, 1.0)]):
        tensors, scalings = lora_to_tensors(d.modules)
        name = "lora.safetensors" if k == 0 else f"lora_{k}.safetensors"
        save_file(tensors, str(folder / name))
        entries.append({"file": name, "coef": c, "scalings": scalings})
    save_file({}, str(folder / "connectors.safetensors"))
    (folder / "manifest.json").write_text(json.dumps({"format": "mera-stage-v1", "parent": None, "deltas": entries,
                                                      "connectors": "connectors.safetensors", "modalities": []}))
    a, b = _llm(), _llm()
    ckpt.apply_stage_llm(a, folder)
    d_prev.fold(b, -1.0)
    d_new.fold(b, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    trained, coef = ckpt.load_trained(folder)
    name = next(iter(d_new.modules))
    assert coef == 1.0 and torch.equal(trained.modules[name]["A"], d_new.modules[name]["A"])


def test_every_module_of_the_continual_layer_reads_in_one_sitting():
    """The shape's rule (docs/architecture.md): no module of mera/continual is over 400 lines."""
    from pathlib import Path

    import mera.continual

    root = Path(mera.continual.__file__).parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long
