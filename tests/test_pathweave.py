"""PathWeave as its authors' code builds it (mera/continual/strategies/pathweave.py): one adapter
and one path (gate, in-adapters) per modality; under the paper's protocol every input takes the
newest path (no modality label read), under the original's each sample takes its own modality's
path; what each stage trains and freezes; the in-adapter's shape; noise only in training; a saved
stage rebuilt exactly, routing as it was trained; a method with the original protocol named so."""

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from mera.continual.deltas import Delta
from mera.continual.methods import MethodConfig
from mera.continual.strategies import OwnModules
from mera.continual.strategies.pathweave import (
    PathWeave,
    PathWeaveLinear,
    PathWeaveParams,
    export_state,
    install_from_state,
    wrapped_modules,
)
from mera.errors import CheckpointError
from mera.model.mllm import BatchModalities, media_token_id

R, S = 3, 2.0  # adapters' rank and scaling


def route_of(*mods):
    """A BatchModalities holding one row per entry (None: a text-only row)."""
    route = BatchModalities()
    rows = [[media_token_id(m) if m else 5, 7] for m in mods]
    route.record(torch.tensor(rows))
    return route


def one_module(seed=0, modalities=("image", "video", "audio"), **kw):
    torch.manual_seed(seed)
    base = nn.Linear(6, 5)
    pw = PathWeaveLinear(base, rank=R, scaling=S, **kw)
    pw.add_adapter(modalities[0], torch.randn(R, 6), torch.randn(5, R))
    for m in modalities[1:]:
        t = pw.add_adapter(m)
        with torch.no_grad():  # as if trained: nothing zero any more
            for p in pw.path_parameters(t):
                p.add_(0.3 * torch.randn_like(p))
    return pw


def hand_path(pw, t, x):
    """Modality t's path, written out from the formula of the module's docstring (eval mode)."""
    if t == 0:
        return S * x @ pw.down[0].weight.T @ pw.up[0].weight.T
    g = torch.softmax(x @ pw.gate[str(t)].weight.T, dim=-1)
    out = 0
    for j in range(t + 1):
        h = x @ pw.down[j].weight.T
        if j < t:
            for lin in pw.inner[f"{j}_{t}"]:
                h = h @ lin.weight.T + lin.bias
        out = out + g[..., j:j + 1] * S * (h @ pw.up[j].weight.T)
    return out


def test_original_first_path_is_the_expert_lora_and_text_only_rows_take_the_frozen_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    A, B = torch.randn(R, 6), torch.randn(5, R)
    pw = PathWeaveLinear(base, rank=R, scaling=S, protocol="original", route=route_of("image", None, "point"))
    pw.add_adapter("image", A, B)
    x = torch.randn(3, 4, 6)
    y = pw(x)
    assert torch.allclose(y[0], base(x[0]) + S * x[0] @ A.T @ B.T, atol=1e-5)  # no gate on the first path
    assert torch.equal(y[1], base(x[1]))  # text-only: no adapter
    assert torch.equal(y[2], base(x[2]))  # a modality without a path yet (step A of its stage)
    pw.route = None
    with pytest.raises(RuntimeError, match="MultimodalLM"):
        pw(x)
    pw.route = route_of("image")
    with pytest.raises(RuntimeError, match="1 samples, the input 3 rows"):
        pw(x)


def test_paper_every_row_takes_the_newest_path_whatever_its_label():
    """Text-only rows, rows of a modality without a path (step A of a new modality) and rows of an old
    modality all take the newest path; no route is needed, a wrong-sized one is not even read."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    A, B = torch.randn(R, 6), torch.randn(5, R)
    pw = PathWeaveLinear(base, rank=R, scaling=S)
    assert pw.protocol == "paper"
    pw.add_adapter("image", A, B)
    x = torch.randn(3, 4, 6)
    y = pw(x)  # route None: nothing to read
    assert torch.allclose(y, base(x) + S * x @ A.T @ B.T, atol=1e-5)
    pw.route = route_of("image")  # one label for three rows: not read, so no error either
    assert torch.equal(pw(x), y)
    full = one_module()
    full.eval()
    want = full.base(x) + hand_path(full, 2, x)
    for labels in (("image", None, "point"), ("video", "video", "image"), ("audio", "image", "video")):
        full.route = route_of(*labels)
        assert torch.allclose(full(x), want, atol=1e-5), labels
    with pytest.raises(ValueError, match="protocol"):
        PathWeaveLinear(nn.Linear(6, 5), rank=R, scaling=S, protocol="removal")


def test_in_adapter_shape_init_and_gate_start():
    pw = PathWeaveLinear(nn.Linear(6, 5), rank=4, scaling=1.0)
    pw.add_adapter("image", torch.randn(4, 6), torch.randn(5, 4))
    torch.manual_seed(1)
    t = pw.add_adapter("video")
    inner = pw.inner["0_1"]
    # the original's "no_hidden" MLP: Linear(b, 2b) -> Linear(2b, b), biases, no activation in between
    assert [type(m) for m in inner] == [nn.Linear, nn.Linear]
    assert inner[0].weight.shape == (8, 4) and inner[1].weight.shape == (4, 8)
    assert inner[0].bias.shape == (8,) and inner[1].bias.shape == (4,)
    for lin in inner:  # the original's effective init: N(0, 0.02), zero biases
        assert torch.count_nonzero(lin.bias) == 0 and 0 < lin.weight.abs().max() < 0.12
    h = torch.randn(2, 4)
    assert torch.allclose(inner(h), (h @ inner[0].weight.T + inner[0].bias) @ inner[1].weight.T + inner[1].bias)
    # the new adapter is LoRA-initialised (up zero); the gate and its noise scale start at zero
    assert torch.count_nonzero(pw.up[t].weight) == 0 and torch.count_nonzero(pw.down[t].weight) > 0
    assert pw.gate["1"].weight.shape == (2, 6) and torch.count_nonzero(pw.gate["1"].weight) == 0
    assert pw.noise["1"].weight.shape == (2, 6) and torch.count_nonzero(pw.noise["1"].weight) == 0
    assert pw.in_hidden == 8
    # the width and the single-Linear variant
    wide = PathWeaveLinear(nn.Linear(6, 5), rank=4, scaling=1.0, in_hidden=3)
    wide.add_adapter("image")
    wide.add_adapter("video")
    assert wide.inner["0_1"][0].weight.shape == (3, 4)
    lin = PathWeaveLinear(nn.Linear(6, 5), rank=4, scaling=1.0, in_adapter="linear")
    lin.add_adapter("image")
    lin.add_adapter("video")
    assert len(lin.inner["0_1"]) == 1 and lin.inner["0_1"][0].weight.shape == (4, 4)
    with pytest.raises(ValueError):
        PathWeaveParams(in_adapter="linear", in_rank=4)
    assert PathWeaveParams().model_dump() == {"in_adapter": "mlp", "in_rank": None, "top_k": None, "noise": True,
                                              "noise_epsilon": 0.01, "protocol": "paper"}


def test_original_each_sample_takes_its_own_modalitys_path_and_gate():
    pw = one_module(protocol="original")
    pw.eval()
    x = torch.randn(4, 3, 6)
    pw.route = route_of("image", "video", "audio", None)
    y = pw(x)
    for i, t in enumerate((0, 1, 2)):
        assert torch.allclose(y[i], pw.base(x[i]) + hand_path(pw, t, x[i]), atol=1e-5), i
    assert torch.equal(y[3], pw.base(x[3]))
    # a row run alone gives what it gave in the mixed batch (up to rounding)
    pw.route = route_of("video")
    assert torch.allclose(pw(x[1:2]), y[1:2], atol=1e-6)
    # the two later modalities use different gates: changing audio's leaves video's output as it was
    pw.route = route_of("image", "video", "audio", None)
    with torch.no_grad():
        pw.gate["2"].weight[0].add_(1.0)
        pw.inner["0_2"][0].weight.add_(1.0)
    y2 = pw(x)
    assert torch.equal(y2[:2], y[:2]) and torch.equal(y2[3], y[3])
    assert not torch.allclose(y2[2], y[2])
    with torch.no_grad():
        pw.gate["1"].weight[0].add_(1.0)
    assert not torch.allclose(pw(x)[1], y[1])


def test_noise_only_in_training_and_top_k():
    pw = one_module(modalities=("image", "video"))
    x = torch.randn(2, 5, 6)
    pw.route = route_of("video", "video")
    pw.eval()
    clean = pw.gates(1, x)
    assert torch.equal(pw(x), pw(x)) and torch.equal(pw.gates(1, x), clean)  # deterministic
    assert torch.allclose(clean, torch.softmax(x @ pw.gate["1"].weight.T, -1), atol=1e-6)
    pw.train()
    torch.manual_seed(0)
    a = pw(x)
    b = pw(x)
    assert not torch.allclose(a, b)  # a fresh noise draw each call
    assert torch.allclose(pw.gates(1, x).sum(-1), torch.ones(2, 5))
    # with a zero gate the noise scale is softplus(0) + eps: the clean mix is uniform, the noisy one not
    with torch.no_grad():
        pw.gate["1"].weight.zero_()
        pw.noise["1"].weight.zero_()
    torch.manual_seed(1)
    noisy = pw.gates(1, x)
    torch.manual_seed(1)
    z = torch.randn(2, 5, 2) * (torch.nn.functional.softplus(torch.zeros(())) + 0.01)
    assert torch.allclose(noisy, torch.softmax(z, -1), atol=1e-6)
    pw.eval()
    assert torch.equal(pw.gates(1, x), torch.full((2, 5, 2), 0.5))
    # noise off: training is deterministic too, and there is no noise scale to learn
    quiet = one_module(modalities=("image", "video"), noise=False)
    quiet.route = route_of("video", "video")
    quiet.train()
    assert torch.equal(quiet(x), quiet(x)) and len(quiet.noise) == 0
    # top-1: each token gets one adapter
    top1 = one_module(top_k=1)
    top1.eval()
    g = top1.gates(2, x)
    assert ((g == 0) | (g == 1)).all() and torch.equal(g.sum(-1), torch.ones(2, 5))


# ---------------------------------------------------------------------- the strategy, stage by stage

ORDER = ["image", "video", "audio"]


class TinyLLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def expert_delta(llm, seed=3):
    g = torch.Generator().manual_seed(seed)
    return Delta.lora({n: {"A": torch.randn(R, m.in_features, generator=g),
                           "B": 0.1 * torch.randn(m.out_features, R, generator=g), "scaling": S}
                       for n, m in (("a", llm.a), ("b", llm.b))})


def make_stage(llm, route, delta, stage, seed=0):
    seen = ORDER[:stage]
    history = SimpleNamespace(folder="chain", last_trained=lambda: (delta, 1.0))
    model = SimpleNamespace(llm=llm, batch_modalities=route)
    return SimpleNamespace(model=model, history=history, seen=seen, modality=seen[-1], seed=seed, folds=[], log={},
                           tensors={}, llm_modules=None)


def train_steps(llm, route, params, steps=4, mods=("image", "video", "audio", None)):
    """A few AdamW steps (weight decay on) on a batch mixing every modality, as run_phase trains."""
    for p in llm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    torch.manual_seed(7)
    x, target = torch.randn(len(mods), 5, 6), torch.randn(len(mods), 5, 4)
    route.record(route_of(*mods)._ids)
    llm.train()
    for _ in range(steps):
        opt.zero_grad()
        ((llm(x) - target) ** 2).mean().backward()
        opt.step()
    llm.eval()


ORIGINAL = PathWeaveParams(protocol="original")
BOTH = pytest.mark.parametrize("protocol", ["paper", "original"])


def run_stages(upto, params=None):
    """The expert (folded into the LLM), then PathWeave's stages 2..upto; returns (llm, route, ctxs)."""
    llm, route = TinyLLM(), BatchModalities()
    delta = expert_delta(llm)
    delta.fold(llm, 1.0)
    strategy, ctxs = PathWeave(params or PathWeaveParams()), []
    for stage in range(2, upto + 1):
        ctx = make_stage(llm, route, delta, stage, seed=stage)
        own = strategy.adapter(ctx)
        assert isinstance(own, OwnModules)
        train_steps(llm, route, own.params)
        strategy.after_instruct(ctx)
        ctxs.append((ctx, own))
    return llm, route, ctxs


def outputs(llm, route, mods=("image", "video", "audio", None)):
    torch.manual_seed(11)
    x = torch.randn(len(mods), 5, 6)
    route.record(route_of(*mods)._ids)
    with torch.no_grad():
        return llm(x)


@BOTH
def test_stage_two_turns_the_expert_into_adapter_zero(protocol):
    llm, route, [(ctx, own)] = run_stages(2, PathWeaveParams(protocol=protocol))
    delta = expert_delta(TinyLLM())
    assert [c for _, c in ctx.folds] == [-1.0]  # the expert's delta taken out of the weights
    for name, m in wrapped_modules(llm).items():
        assert m.modalities == ["image", "video"]
        assert torch.equal(m.down[0].weight, delta.modules[name]["A"])
        assert torch.equal(m.up[0].weight, delta.modules[name]["B"])
    # the image rows: the frozen LLM plus the expert's LoRA, exactly the expert's function, under the
    # original protocol; under the paper's they take the newest path (video's), which has learned since
    ref = TinyLLM()
    delta.fold(ref, 1.0)
    torch.manual_seed(11)
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        expert_out = ref(x[0])
    assert torch.allclose(outputs(llm, route)[0], expert_out, atol=1e-5) == (protocol == "original")
    assert ctx.llm_modules["modalities"] == ["image", "video"] and ctx.llm_modules["inner"] == ["0_1"]
    assert ctx.llm_modules["protocol"] == protocol
    assert ctx.log["pathweave"]["adapters"] == 2 and ctx.log["pathweave"]["trainable"] == sum(p.numel() for p in own.params)


@BOTH
def test_stage_three_trains_only_its_adapter_in_adapters_and_gate(protocol):
    params = PathWeaveParams(protocol=protocol)
    orig = protocol == "original"
    llm, route, ctxs = run_stages(2, params)
    before = outputs(llm, route)
    frozen = {n: p.detach().clone() for n, p in llm.named_parameters()}
    ctx = make_stage(llm, route, None, 3, seed=3)
    own = PathWeave(params).adapter(ctx)
    # adding audio's path changes nothing on the earlier modalities' paths under the original protocol;
    # under the paper's every row now takes audio's path (a new gate, a new mix)
    assert torch.equal(outputs(llm, route)[[0, 1, 3]], before[[0, 1, 3]]) == orig
    mods = wrapped_modules(llm)
    for m in mods.values():  # audio's in-adapter into adapter 0 starts from video's, the one into adapter 1 fresh
        assert all(torch.equal(a, b) for a, b in zip(m.inner["0_2"].parameters(), m.inner["0_1"].parameters()))
        assert torch.count_nonzero(m.inner["1_2"][0].bias) == 0
    # which parameters get a gradient from a batch mixing every modality, frozen as run_phase freezes
    for p in llm.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in own.params:
        p.requires_grad_(True)
    torch.manual_seed(5)
    x = torch.randn(4, 5, 6)
    route.record(route_of("image", "video", "audio", None)._ids)
    llm.train()
    llm(x).pow(2).sum().backward()
    got = {n for n, p in llm.named_parameters() if p.grad is not None}
    new = ["down.2.weight", "up.2.weight", "gate.2.weight", "noise.2.weight"] + \
          [f"inner.{j}_2.{k}.{w}" for j in (0, 1) for k in (0, 1) for w in ("weight", "bias")]
    assert got == {f"{n}.{p}" for n in mods for p in new}
    # old-modality (and text-only) rows alone reach none of them under the original protocol: their
    # output needs no gradient; under the paper's they go through the new path
    route.record(route_of("image", "video", None, "video")._ids)
    assert llm(x).requires_grad != orig
    llm.eval()
    # a stage of training: what the original freezes stays bit-identical under both protocols; the
    # old outputs too under the original's only
    train_steps(llm, route, own.params)
    after = dict(llm.named_parameters())
    changed = {n for n in frozen if not torch.equal(frozen[n], after[n])}
    assert not changed
    assert torch.equal(outputs(llm, route)[[0, 1, 3]], before[[0, 1, 3]]) == orig
    assert all(m.up[2].weight.abs().max() > 0 for m in mods.values())  # and the new path did train


def test_stage_order_must_match_the_models_paths():
    llm, route, _ = run_stages(2)
    ctx = make_stage(llm, route, None, 3)
    ctx.seen = ["image", "audio", "point"]
    ctx.modality = "point"
    with pytest.raises(CheckpointError, match="paths for"):
        PathWeave(PathWeaveParams()).adapter(ctx)


def rebuilt(layout, tensors):
    """A fresh LLM with the chain's folds (expert in, then out) and the saved modules installed."""
    fresh, fresh_route = TinyLLM(), BatchModalities()
    delta = expert_delta(fresh)
    delta.fold(fresh, 1.0)
    delta.fold(fresh, -1.0)
    install_from_state(fresh, layout, tensors, route=fresh_route)
    fresh.eval()
    return fresh, fresh_route


@BOTH
def test_saved_and_reloaded_stage_gives_identical_logits(tmp_path, protocol):
    from safetensors.torch import load_file, save_file

    llm, route, ctxs = run_stages(3, PathWeaveParams(top_k=2, protocol=protocol))
    ctx = ctxs[-1][0]
    layout, tensors = ctx.llm_modules, ctx.tensors
    assert layout["modalities"] == ORDER and layout["inner"] == ["0_1", "0_2", "1_2"] and layout["top_k"] == 2
    assert layout["protocol"] == protocol  # a loaded stage (mera generate / export / profile) routes as trained
    assert not any(".base." in k for k in tensors)  # the base weights are not saved
    save_file(tensors, str(tmp_path / "strategy.safetensors"))
    # the rebuilt LLM: the base with the chain's folds (expert in, then out), then the saved modules
    fresh, fresh_route = rebuilt(layout, load_file(str(tmp_path / "strategy.safetensors")))
    assert torch.equal(outputs(fresh, fresh_route), outputs(llm, route))
    assert export_state(fresh)[0] == layout
    assert {m.protocol for m in wrapped_modules(fresh).values()} == {protocol}
    with pytest.raises(CheckpointError, match="older PathWeave"):
        install_from_state(TinyLLM(), {k: v for k, v in layout.items() if k != "version"}, tensors)
    with pytest.raises(CheckpointError, match="missing"):
        install_from_state(TinyLLM(), layout, {k: v for k, v in tensors.items() if "gate.2" not in k})


def test_a_layout_saved_before_the_protocol_existed_loads_as_the_original():
    """Stages saved before the protocol was recorded were trained and evaluated with each modality
    through its own path: their layout (no 'protocol' key) is rebuilt with that routing."""
    old, old_route, ctxs = run_stages(3, ORIGINAL)
    layout = {k: v for k, v in ctxs[-1][0].llm_modules.items() if k != "protocol"}
    fresh, fresh_route = rebuilt(layout, ctxs[-1][0].tensors)
    assert {m.protocol for m in wrapped_modules(fresh).values()} == {"original"}
    assert torch.equal(outputs(fresh, fresh_route), outputs(old, old_route))
    assert export_state(fresh)[0]["protocol"] == "original"  # saved again, it says so
    # the key is what routes: a paper stage without it would load (wrongly) as the original, so it is written
    paper, paper_route, pctx = run_stages(3)
    p_layout = pctx[-1][0].llm_modules
    assert torch.equal(outputs(*rebuilt(p_layout, pctx[-1][0].tensors)), outputs(paper, paper_route))
    stripped = rebuilt({k: v for k, v in p_layout.items() if k != "protocol"}, pctx[-1][0].tensors)
    assert not torch.allclose(outputs(*stripped)[0], outputs(paper, paper_route)[0])
    with pytest.raises(CheckpointError, match="unknown protocol 'removal'"):
        rebuilt({**p_layout, "protocol": "removal"}, pctx[-1][0].tensors)


@BOTH
def test_gradient_checkpointing_recomputes_each_rows_path(protocol):
    """A checkpointed layer is recomputed in the backward pass, after the forward returned: it must
    read the same batch (and, training, draw the same gate noise), or its gradients differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1))
    mods = dict(llm.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, nn.Linear) and n != "lm_head"]
    g = torch.Generator().manual_seed(0)
    delta = Delta.lora({n: {"A": torch.randn(R, mods[n].in_features, generator=g),
                            "B": 0.1 * torch.randn(mods[n].out_features, R, generator=g), "scaling": S} for n in names})
    delta.fold(llm, 1.0)
    route, strategy = BatchModalities(), PathWeave(PathWeaveParams(protocol=protocol))
    for stage in (2, 3):
        own = strategy.adapter(make_stage(llm, route, delta, stage))
        with torch.no_grad():
            for p in own.params:
                p.add_(0.2 * torch.randn_like(p))
    route.record(torch.tensor([[media_token_id("image"), 3, 4, 5], [7, media_token_id("audio"), 8, 9],
                               [1, 2, 3, media_token_id("video")], [1, 2, 3, 4]]))
    embeds = torch.randn(4, 4, 16)

    def grads(checkpointing):
        llm.zero_grad(set_to_none=True)
        if checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_disable()
        llm.train()
        torch.manual_seed(3)
        llm(inputs_embeds=embeds, use_cache=False).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == len(own.params)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- the two test protocols


def _perturb_adapter(llm, t):
    with torch.no_grad():
        for m in wrapped_modules(llm).values():
            m.down[t].weight.add_(0.5 * torch.randn_like(m.down[t].weight))
            m.up[t].weight.add_(0.5 * torch.randn_like(m.up[t].weight))


@BOTH
def test_a_stage_three_models_image_output_depends_on_the_third_adapter_under_the_paper_protocol_only(protocol):
    """Footnote 3 of the paper: nothing is removed when testing a former modality. Under the paper's
    protocol the image input goes through adapter 3 (index 2, audio's); under the original's the
    image's own path holds only adapter 1, so adapter 3 cannot reach it."""
    llm, route, _ = run_stages(3, PathWeaveParams(protocol=protocol))
    before = outputs(llm, route, mods=("image",))
    torch.manual_seed(21)
    _perturb_adapter(llm, 2)
    after = outputs(llm, route, mods=("image",))
    if protocol == "paper":
        assert not torch.allclose(after, before)
    else:
        assert torch.equal(after, before)
    # the perturbation is not a no-op for the original either: audio's own rows see it
    if protocol == "original":
        audio_before = outputs(llm, route, mods=("audio",))
        _perturb_adapter(llm, 2)
        assert not torch.allclose(outputs(llm, route, mods=("audio",)), audio_before)


def test_paper_protocol_reads_no_label_each_row_is_its_own_newest_path():
    llm, route, _ = run_stages(3)
    torch.manual_seed(13)
    x = torch.randn(4, 5, 6)
    mods = ("image", "video", "audio", None)
    route.record(route_of(*mods)._ids)
    with torch.no_grad():
        y = llm(x)
        # by hand: every row through path 2 (all three adapters, audio's gate) of both modules
        a, b = llm.a, llm.b
        h = torch.relu(a.base(x) + hand_path(a, 2, x))
        assert torch.allclose(y, b.base(h) + hand_path(b, 2, h), atol=1e-5)
        for i, m in enumerate(mods):  # a row alone gives what it gave in the mixed batch
            route.record(route_of(m)._ids)
            assert torch.allclose(llm(x[i:i + 1]), y[i:i + 1], atol=1e-6), m
        for perm in ((None, "audio", "image", "video"), ("audio",) * 4, ("point", "image", None, "point")):
            route.record(route_of(*perm)._ids)
            assert torch.equal(llm(x), y), perm  # the labels change nothing
        route.record(None)  # and none at all is needed
        assert torch.equal(llm(x), y)
    # the original protocol does read them: the same permutation changes its output
    orig, orig_route, _ = run_stages(3, ORIGINAL)
    assert not torch.allclose(outputs(orig, orig_route, mods), outputs(orig, orig_route, ("audio",) * 4))


def test_the_protocol_enters_the_training_key_and_a_chain_keeps_one():
    ctx = SimpleNamespace(seen=ORDER, modality="audio")
    paper, orig = PathWeave(PathWeaveParams()), PathWeave(ORIGINAL)
    assert paper.training_key(ctx)["params"]["protocol"] == "paper"
    assert orig.training_key(ctx)["params"]["protocol"] == "original"
    assert paper.training_key(ctx) != orig.training_key(ctx)  # never one shared step
    llm, route, _ = run_stages(2, ORIGINAL)
    with pytest.raises(CheckpointError, match="route by protocol original, this method's is paper"):
        paper.adapter(make_stage(llm, route, None, 3))


ORIGINAL_ITEM = {"name": "pathweave", "protocol": "original"}


def test_a_method_with_the_original_protocol_must_say_so_in_its_name(tmp_path):
    for bad in ("PathWeave", "PathWeave + Realign", "PW original"):
        with pytest.raises(ValidationError) as e:
            MethodConfig(name=bad, strategies=[ORIGINAL_ITEM])
        text = str(e.value)
        assert f"method {bad!r}: pathweave with protocol: original" in text
        assert 'e.g. "PathWeave (original protocol)"' in text
    for ok in ("PathWeave (original protocol)", "pathweave (Original Protocol) + Realign"):
        m = MethodConfig(name=ok, strategies=[ORIGINAL_ITEM, {"name": "realign", "ratio": 0.1}])
        assert m.strategies[0]["protocol"] == "original"
    assert MethodConfig(name="PathWeave", strategies=["pathweave"]).strategies[0]["protocol"] == "paper"
    # the CLI: one error: line naming the file and the method
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"branches": {"image": {"encoder": {"family": "toy_image"}},
                                                          "point": {"encoder": {"family": "toy_point"}}}},
                                   "data": {"toy": {}}, "orders": {"s": ["image", "point"]},
                                   "methods": [{"name": "PathWeave", "strategies": [ORIGINAL_ITEM]}]}))
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(cfg), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(cfg) in lines[0], r.stderr
    assert "method 'PathWeave'" in lines[0] and "(original protocol)" in lines[0]


def test_no_module_outside_pathweave_py_branches_on_its_name():
    """The protocol, its naming rule and the routing live in pathweave.py alone: no other module of mera
    compares anything with a string naming PathWeave (``== "pathweave"``, ``"PathWeave" in name``), and
    none holds the words "original protocol" outside its docstrings."""
    root = Path(__file__).resolve().parent.parent / "mera"
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if rel == "continual/strategies/pathweave.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Compare):
                for side in (n.left, *n.comparators):
                    if isinstance(side, ast.Constant) and isinstance(side.value, str) and "pathweave" in side.value.lower():
                        found.append((rel, n.lineno, side.value))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs \
                    and "original protocol" in n.value.lower():
                found.append((rel, n.lineno, n.value[:60]))
    assert not found
