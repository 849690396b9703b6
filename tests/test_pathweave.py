"""PathWeave as its authors' code builds it (mera/continual/strategies/pathweave.py): one adapter
and one path (gate, in-adapters) per modality, the path chosen by each sample's modality; what
each stage trains and freezes; the in-adapter's shape; noise only in training; a saved stage
rebuilt exactly."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mera.continual.deltas import Delta
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


def test_first_path_is_the_expert_lora_and_text_only_rows_take_the_frozen_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    A, B = torch.randn(R, 6), torch.randn(5, R)
    pw = PathWeaveLinear(base, rank=R, scaling=S, route=route_of("image", None, "point"))
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
                                              "noise_epsilon": 0.01}


def test_each_sample_takes_its_own_modalitys_path_and_gate():
    pw = one_module()
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


def test_stage_two_turns_the_expert_into_adapter_zero():
    llm, route, [(ctx, own)] = run_stages(2)
    delta = expert_delta(TinyLLM())
    assert [c for _, c in ctx.folds] == [-1.0]  # the expert's delta taken out of the weights
    for name, m in wrapped_modules(llm).items():
        assert m.modalities == ["image", "video"]
        assert torch.equal(m.down[0].weight, delta.modules[name]["A"])
        assert torch.equal(m.up[0].weight, delta.modules[name]["B"])
    # the image rows: the frozen LLM plus the expert's LoRA, exactly the expert's function
    ref = TinyLLM()
    delta.fold(ref, 1.0)
    torch.manual_seed(11)
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        assert torch.allclose(outputs(llm, route)[0], ref(x[0]), atol=1e-5)
    assert ctx.llm_modules["modalities"] == ["image", "video"] and ctx.llm_modules["inner"] == ["0_1"]
    assert ctx.log["pathweave"]["adapters"] == 2 and ctx.log["pathweave"]["trainable"] == sum(p.numel() for p in own.params)


def test_stage_three_trains_only_its_adapter_in_adapters_and_gate():
    llm, route, ctxs = run_stages(2)
    before = outputs(llm, route)
    frozen = {n: p.detach().clone() for n, p in llm.named_parameters()}
    ctx = make_stage(llm, route, None, 3, seed=3)
    own = PathWeave(PathWeaveParams()).adapter(ctx)
    # adding audio's path changes nothing on the earlier modalities' paths
    assert torch.equal(outputs(llm, route)[[0, 1, 3]], before[[0, 1, 3]])
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
    # old-modality (and text-only) rows alone reach none of them: their output needs no gradient
    route.record(route_of("image", "video", None, "video")._ids)
    assert not llm(x).requires_grad
    llm.eval()
    # a stage of training: what the original freezes stays bit-identical, and so do the old outputs
    train_steps(llm, route, own.params)
    after = dict(llm.named_parameters())
    changed = {n for n in frozen if not torch.equal(frozen[n], after[n])}
    assert not changed
    assert torch.equal(outputs(llm, route)[[0, 1, 3]], before[[0, 1, 3]])
    assert all(m.up[2].weight.abs().max() > 0 for m in mods.values())  # and the new path did train


def test_stage_order_must_match_the_models_paths():
    llm, route, _ = run_stages(2)
    ctx = make_stage(llm, route, None, 3)
    ctx.seen = ["image", "audio", "point"]
    ctx.modality = "point"
    with pytest.raises(CheckpointError, match="paths for"):
        PathWeave(PathWeaveParams()).adapter(ctx)


def test_saved_and_reloaded_stage_gives_identical_logits(tmp_path):
    from safetensors.torch import load_file, save_file

    llm, route, ctxs = run_stages(3, PathWeaveParams(top_k=2))
    ctx = ctxs[-1][0]
    layout, tensors = ctx.llm_modules, ctx.tensors
    assert layout["modalities"] == ORDER and layout["inner"] == ["0_1", "0_2", "1_2"] and layout["top_k"] == 2
    assert not any(".base." in k for k in tensors)  # the base weights are not saved
    save_file(tensors, str(tmp_path / "strategy.safetensors"))
    # the rebuilt LLM: the base with the chain's folds (expert in, then out), then the saved modules
    fresh, fresh_route = TinyLLM(), BatchModalities()
    delta = expert_delta(fresh)
    delta.fold(fresh, 1.0)
    delta.fold(fresh, -1.0)
    install_from_state(fresh, layout, load_file(str(tmp_path / "strategy.safetensors")), route=fresh_route)
    fresh.eval()
    assert torch.equal(outputs(fresh, fresh_route), outputs(llm, route))
    assert export_state(fresh)[0] == layout
    with pytest.raises(CheckpointError, match="older PathWeave"):
        install_from_state(TinyLLM(), {k: v for k, v in layout.items() if k != "version"}, tensors)
    with pytest.raises(CheckpointError, match="missing"):
        install_from_state(TinyLLM(), layout, {k: v for k, v in tensors.items() if "gate.2" not in k})


def test_gradient_checkpointing_recomputes_each_rows_path():
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
    route, strategy = BatchModalities(), PathWeave(PathWeaveParams())
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
