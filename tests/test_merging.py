"""The factored CMA merge equals dense averaging of the two materialised models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mera.continual.merges import dense_average
from mera.continual.merges.cma import cma_coefficient
from mera.train.lora import LoraSettings, attach_lora, detach_lora, extract_lora, fold_lora, lora_delta


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def trained_delta(llm, seed=1):
    pm = attach_lora(llm, LoraSettings(r=4, alpha=8, dropout=0.0), seed)
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # B starts at zero: give it values as training would
            p.data = torch.randn(p.shape, generator=g) * 0.1
    d = extract_lora(pm)
    return detach_lora(pm), d


def test_cma_coefficients():
    assert [cma_coefficient(i) for i in (1, 2, 4)] == [1.0, 0.5, 0.25]


def test_lora_delta_matches_peft_merge():
    llm = tiny_llama()
    ref = tiny_llama()
    pm = attach_lora(ref, LoraSettings(r=4, alpha=8, dropout=0.0), 1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    d = extract_lora(pm)
    merged_by_peft = pm.merge_and_unload().state_dict()
    fold_lora(llm, d, 1.0)
    for k, v in llm.state_dict().items():
        assert torch.allclose(v, merged_by_peft[k], atol=1e-6), k
    # scaling is alpha / r = 2
    assert all(x["scaling"] == 2.0 for x in d.values())


def test_factored_merge_equals_dense_average_over_stages():
    llm = tiny_llama()
    dense_model = {k: v.clone() for k, v in llm.state_dict().items()}
    for stage in (1, 2, 3, 4):
        llm, delta = trained_delta(llm, seed=stage)
        # materialise theta_{i,vanilla} = theta_{i-1} + dW_i, then average densely with weights (i-1)/i, 1/i
        vanilla = {k: v.clone() for k, v in dense_model.items()}
        for name, d in delta.items():
            vanilla[f"{name}.weight"] += lora_delta(d["A"], d["B"], d["scaling"])
        c = cma_coefficient(stage)
        dense_model = dense_average([dense_model, vanilla], [1 - c, c])
        fold_lora(llm, delta, c)  # factored: W += dW / i
        sd = llm.state_dict()
        diff = max((sd[k] - dense_model[k]).abs().max().item() for k in sd)
        assert diff < 1e-5, (stage, diff)
    # and the merged model is not the last vanilla model (the merge did something)
    assert max((vanilla[k] - dense_model[k]).abs().max().item() for k in vanilla) > 1e-3


def test_merge_only_and_mera_fold_the_new_delta_with_the_cma_coefficient():
    from mera.continual.deltas import Delta
    from mera.continual.methods import MethodConfig, build_method

    new = Delta.dense({"w": torch.ones(2, 2)})
    _, merge_only = build_method(MethodConfig(name="Merge only", strategies=["merge"]))
    strategies, mera = build_method(MethodConfig(name="MERA", strategies=["merge", "realign"], replay_ratio=0.1))
    assert [s.name for s in strategies] == ["realign"] and strategies[0].params.ratio == 0.1
    for i in (2, 3, 4, 7):
        for rule in (merge_only, mera):
            [(delta, coef)] = rule.merge(new, [], i)
            assert delta is new and coef == pytest.approx(1 / i)
    _, ft = build_method(MethodConfig(name="FT", strategies=["finetune"]))
    assert ft.merge(new, [], 3) == [(new, 1.0)]


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_the_distance():
    from mera.continual.strategies.ewc import ewc_penalty

    anchor = {"w": torch.tensor([1.0, -2.0, 0.5])}
    fisher = {"w": torch.tensor([0.3, 0.0, 2.0])}
    assert ewc_penalty(anchor, anchor, fisher, 1.0).item() == 0.0
    direction = torch.tensor([1.0, 1.0, -1.0])
    values = [ewc_penalty({"w": anchor["w"] + t * direction}, anchor, fisher, 1.0).item() for t in (0.1, 0.5, 1, 2)]
    assert all(a < b for a, b in zip(values, values[1:]))
    # lambda/2 * (0.3 * 1 + 0 * 1 + 2 * 1) at t = 1
    assert values[2] == pytest.approx(0.5 * 2.3)
