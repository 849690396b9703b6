"""Step checkpoints: a phase interrupted at any step and started again ends exactly where an
uninterrupted one does (parameters, AdamW state, schedule, RNG and data order restored)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mera import faults
from mera.train.loop import StepCheckpoint, train_phase


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)  # uses torch's RNG: restored too
        self.b = nn.Linear(8, 1)

    def forward(self, batch):
        y = self.b(self.drop(torch.tanh(self.a(batch["x"]))))
        return SimpleNamespace(loss=((y.squeeze(-1) - batch["y"]) ** 2).mean())


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 4, generator=g)
    return [{"x": x[i], "y": x[i].sum()} for i in range(37)]


def _collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


def _run(ck=None):
    model = Tiny()
    res = train_phase(model, [{"params": list(model.a.parameters()), "lr": 1e-2},
                              {"params": list(model.b.parameters()), "lr": 3e-3}],
                      _data(), _collate, batch_size=8, micro_batch_size=4, epochs=2.5, warmup_ratio=0.1,
                      seed=5, progress=False, checkpoint=ck)
    return model, res


@pytest.mark.parametrize("kill_at", [1, 3, 6, 9])
def test_interrupted_phase_resumes_to_the_same_parameters(tmp_path, monkeypatch, kill_at):
    ref_model, ref = _run()
    ck = StepCheckpoint(tmp_path / "phase", every=2)
    monkeypatch.setenv("MERA_FAULT", f"train_step:{kill_at}")
    monkeypatch.setenv("MERA_FAULT_MODE", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        _run(ck)
    monkeypatch.delenv("MERA_FAULT")
    if kill_at >= 2:
        assert ck.files()[0].is_file()  # a checkpoint was there when it died
    model, res = _run(ck)
    assert res.losses == ref.losses and res.steps == ref.steps
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n


def test_completed_phase_is_not_trained_again(tmp_path):
    ck = StepCheckpoint(tmp_path / "phase", every=0)
    m1, r1 = _run(ck)
    assert ck.files()[0].is_file() and ck.files()[1].is_file()
    m2, r2 = _run(ck)  # loads the completion checkpoint: same result, no training step taken
    assert r2.losses == r1.losses
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_a_checkpoint_pair_out_of_step_is_ignored(tmp_path):
    ck = StepCheckpoint(tmp_path / "phase", every=2)
    _run(ck)
    t_file, _ = ck.files()
    t_file.write_bytes(t_file.read_bytes()[:-7] + b"garbage")  # the JSON no longer matches the tensors
    ref_model, ref = _run()
    model, res = _run(ck)  # starts over
    assert res.losses == ref.losses
