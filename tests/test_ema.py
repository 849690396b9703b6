"""The exponential moving average merge rule (mera/continual/merges/ema.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mera.continual.deltas import Delta
from mera.continual.merges import dense_average
from mera.continual.methods import MethodConfig, build_method
from mera.train.lora import LoraSettings, attach_lora, detach_lora, extract_lora


def _llm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_ema_folds_equal_the_dense_weighted_average_of_the_two_models():
    prev = _llm()
    pm = attach_lora(_llm(), LoraSettings(r=2, alpha=4, dropout=0.0), 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    new = Delta.lora(extract_lora(pm))
    detach_lora(pm)
    vanilla = _llm()
    new.fold(vanilla, 1.0)  # theta_{i,vanilla} = theta_{i-1} + dW
    strategies, rule = build_method(MethodConfig(name="EMA", strategies=[{"name": "ema", "beta": 0.75}, "realign"]))
    assert [s.name for s in strategies] == ["realign"]
    folds = rule.merge(new, [], 3)
    assert folds == [(new, pytest.approx(0.25))]  # the stage index does not matter, unlike cma's 1/i
    merged = _llm()
    for d, c in folds:
        d.fold(merged, c)
    want = dense_average([prev.state_dict(), vanilla.state_dict()], [0.75, 0.25])
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6), k


def test_ema_parameters_are_checked_when_the_config_loads():
    with pytest.raises(Exception, match="beta"):
        MethodConfig(name="x", strategies=[{"name": "ema", "beta": 1.0}])
    with pytest.raises(Exception, match="both merge rules"):
        MethodConfig(name="x", strategies=["ema", "cma"])
    assert MethodConfig(name="x", strategies=["ema"]).strategies == [{"name": "ema", "beta": 0.5}]
