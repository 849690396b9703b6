"""PathWeave's modules: the gate is a softmax (sums to 1), one adapter equals a LoRA, old adapters
stay frozen while a new modality trains, in-adapters start as the identity."""

import torch
from torch import nn

from mera.continual.strategies.pathweave import PathWeaveLinear, export_state, install_from_state


def _linear(seed=0, i=6, o=5):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def test_one_adapter_is_a_lora_and_gate_sums_to_one():
    base = _linear()
    A, B = torch.randn(3, 6), torch.randn(5, 3)
    pw = PathWeaveLinear(base, rank=3, scaling=2.0, in_rank=2)
    pw.add_adapter(A, B)
    x = torch.randn(4, 7, 6)
    want = base(x) + 2.0 * x @ A.T @ B.T
    assert torch.allclose(pw(x), want, atol=1e-5)
    # a second adapter: zero-initialised gate row -> uniform mix; zero up -> its output is 0
    pw.add_adapter()
    g = pw.gates(x)
    assert g.shape == (4, 7, 2) and torch.allclose(g.sum(-1), torch.ones(4, 7))
    assert torch.allclose(g, torch.full_like(g, 0.5))
    assert torch.allclose(pw(x), base(x) + 0.5 * 2.0 * x @ A.T @ B.T, atol=1e-5)
    # the gate keeps summing to one once trained to something non-uniform
    with torch.no_grad():
        pw.gate.weight.normal_()
    g = pw.gates(x)
    assert torch.allclose(g.sum(-1), torch.ones(4, 7), atol=1e-6) and (g.std(-1) > 0).all()


def test_in_adapter_starts_as_identity_and_old_adapter_stays_frozen():
    base = _linear(1)
    pw = PathWeaveLinear(base, rank=3, scaling=1.0, in_rank=2)
    pw.add_adapter(torch.randn(3, 6), torch.randn(5, 3))
    x = torch.randn(8, 6)
    y0 = pw(x)
    # stage 2 as PathWeave.llm_params sets it up: old adapter frozen, new adapter + in-adapter + gate train
    for p in pw.parameters():
        p.requires_grad_(False)
    k = pw.add_adapter()
    inner = pw.add_inner(0, k)
    with torch.no_grad():  # identity in-adapter, zero new adapter: only the gate's 1/2 differs
        assert torch.allclose(pw(x), base(x) + 0.5 * (y0 - base(x)), atol=1e-5)
    trainable = [pw.down[k].weight, pw.up[k].weight, pw.gate.weight, *inner.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    old = {n: p.detach().clone() for n, p in pw.named_parameters() if n.startswith(("down.0", "up.0", "base"))}
    inner_before = [p.detach().clone() for p in inner.parameters()]
    opt = torch.optim.SGD(trainable, lr=0.1)
    target = torch.randn(8, 5)
    for _ in range(5):
        opt.zero_grad()
        ((pw(x) - target) ** 2).mean().backward()
        opt.step()
    for n, p in pw.named_parameters():
        if n in old:
            assert torch.equal(p, old[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(inner_before, inner.parameters()))
    assert pw.up[k].weight.abs().max() > 0


def test_export_and_install_rebuild_the_same_function():
    torch.manual_seed(0)
    llm = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    ref = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    ref.load_state_dict(llm.state_dict())
    for i in (0, 2):
        pw = PathWeaveLinear(llm[i], rank=2, scaling=0.5, in_rank=1)
        pw.add_adapter(torch.randn(2, 6), torch.randn(llm[i].out_features, 2))
        pw.add_adapter()
        pw.add_inner(0, 1)
        with torch.no_grad():
            for n, p in pw.named_parameters():
                if not n.startswith("base."):
                    p.add_(0.1 * torch.randn_like(p))
        llm[i] = pw
    layout, tensors = export_state(llm)
    assert layout["modules"] == ["0", "2"] and layout["num_adapters"] == 2
    assert not any(".base." in k for k in tensors)  # the base weights are not saved
    install_from_state(ref, layout, tensors)
    x = torch.randn(3, 6)
    assert torch.allclose(ref(x), llm(x), atol=1e-6)


def test_replay_adds_old_modalities_only_and_realign_all_seen():
    """Replay's extra step-B data: r% of each previous modality (captions and QA mixed), never
    the new one; realign's set: r% of every modality seen so far, the new one included."""
    from types import SimpleNamespace

    from mera.continual.strategies.realign import Realign, RealignParams
    from mera.continual.strategies.replay import Replay, ReplayParams
    from mera.data.pipeline import ModalitySets

    def items(m, task, n):
        return [SimpleNamespace(modality=m, task=task, id=f"{m}-{task}-{i}") for i in range(n)]

    sets = {m: ModalitySets(items(m, "caption", 40), [], items(m, "qa", 60), []) for m in ("image", "video", "audio")}
    model = SimpleNamespace(connector_parameters=lambda m: [])
    ctx = SimpleNamespace(data=lambda m: sets[m].train, seen=["image", "video", "audio"], seed=3, log={}, model=model)

    def replayed():
        step = SimpleNamespace(data=[], groups=[])
        Replay(ReplayParams(ratio=0.1)).prepare_instruct(ctx, step)
        return step.data

    extra = replayed()
    assert len(extra) == 20 and {s.modality for s in extra} == {"image", "video"}
    assert {s.task for s in extra} == {"caption", "qa"}  # mixed
    assert len({s.id for s in extra}) == 20 and ctx.log["replay"]["samples"] == 20
    assert [s.id for s in replayed()] == [s.id for s in extra]  # seeded
    realign = Realign(RealignParams(ratio=0.05)).replay_set(ctx)
    assert len(realign) == 15 and {s.modality for s in realign} == {"image", "video", "audio"}
