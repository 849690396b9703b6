"""Online EWC (mera/continual/strategies/ewc.py): the online accumulation with gamma, the
sequence-level Fisher, both adapter policies, and how much the penalty steers step B."""

import json
from types import SimpleNamespace

import pytest
import torch
from micro import micro_config

from mera.config import load_config
from mera.continual import checkpoint as ckpt
from mera.continual.strategies.ewc import EWC, EWCParams, sequence_nll
from mera.runner.loop import StageLoop
from mera.runner.run_config import RunConfig


def test_online_accumulation_is_gamma_times_the_old_fisher_plus_the_new(monkeypatch):
    ewc = EWC(EWCParams(gamma=0.5))
    ewc.fisher = {"w": torch.tensor([2.0, 4.0])}
    monkeypatch.setattr(ewc, "estimate_fisher", lambda ctx, m: {"w": torch.tensor([1.0, 0.0])})
    monkeypatch.setattr(ewc, "penalty", lambda: torch.tensor(0.0))
    monkeypatch.setattr(ewc, "gradient_share", lambda ctx: 0.0)
    ctx = SimpleNamespace(log={}, tensors={}, modality="point")
    ewc.after_instruct(ctx)
    assert torch.equal(ctx.tensors["fisher.w"], torch.tensor([2.0, 2.0]))  # 0.5 * [2, 4] + [1, 0]


def test_the_fisher_uses_the_sequence_level_loss():
    """sequence_nll = the mean answer-token loss times the number of answer tokens."""
    class Model:
        def __call__(self, batch):
            return SimpleNamespace(loss=torch.tensor(0.25))

    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 3, 4, -100, -100, -100]])
    # next-token positions: labels[:, 1:] != -100 -> 3 + 2 = 5 tokens
    assert sequence_nll(Model(), {"labels": labels}).item() == pytest.approx(0.25 * 5)


@pytest.mark.slow
def test_both_adapter_policies_train_and_the_penalty_steers(micro_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    methods = [{"name": "EWC", "strategies": [{"name": "ewc", "lam": 100.0, "fisher_ratio": 0.05}]},
               {"name": "EWC fresh", "strategies": [{"name": "ewc", "lam": 1.0e4, "fisher_ratio": 0.05,
                                                     "adapter": "fresh"}]},
               {"name": "EWC off", "strategies": [{"name": "ewc", "lam": 0.0, "fisher_ratio": 0.05}]}]
    cfg_path = micro_config(micro_assets, tmp_path, methods=methods)
    cfg = load_config(cfg_path, [], RunConfig)
    out = tmp_path / "out"
    StageLoop(cfg, out, config_dir=tmp_path, progress=False, log=lambda m: None).run()
    cont = ckpt.read_manifest(out / "sequential/ewc/stage_2_point")
    fresh = ckpt.read_manifest(out / "sequential/ewc-fresh/stage_2_point")
    off = ckpt.read_manifest(out / "sequential/ewc-off/stage_2_point")
    assert [f["coef"] for f in cont["folds"]] == [-1.0, 1.0]  # the expert's adapter taken out, continued
    assert [f["coef"] for f in fresh["folds"]] == [1.0]  # a fresh adapter, the expert's stays folded
    # the Fisher is kept in the parameters each policy penalises
    from safetensors.torch import load_file

    fc = load_file(str(out / "sequential/ewc/stage_2_point/strategy.safetensors"))
    ff = load_file(str(out / "sequential/ewc-fresh/stage_2_point/strategy.safetensors"))
    assert all(k.startswith("fisher.") and "lora_" in k for k in fc)
    assert all(k.startswith("fisherW.") for k in ff) and all(v.dim() == 2 for v in ff.values())
    # the penalty's gradient is a material share of the task loss's at this lambda, none at 0
    assert cont["log"]["ewc"]["grad_share"] > 0.05 and fresh["log"]["ewc"]["grad_share"] > 0.05
    assert off["log"]["ewc"]["grad_share"] == 0.0 and off["log"]["ewc"]["penalty_last"] == 0.0
    # and it holds the continued adapter nearer its anchor than no penalty does
    def moved(folder):
        folds = ckpt.load_folds(folder)
        start, end = folds[0][0].modules, folds[1][0].modules
        return sum(float((end[n]["B"] - start[n]["B"]).norm()) for n in start)

    assert moved(out / "sequential/ewc/stage_2_point") < moved(out / "sequential/ewc-off/stage_2_point")
    json.loads((out / "replay_memory" / "image_r0.05.json").read_text())  # the Fisher's memory is recorded
