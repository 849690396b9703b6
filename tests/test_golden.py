"""Byte-identical scores against golden files taken before the plug-in redesign (issue 11):
the toy demo's scores.csv (tests/data/golden_demo_scores.csv; checked by hand, see the README's
"Golden files") and, here, a 3-stage micro run over every method of the paper grid."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from micro import micro_config

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"

GOLDEN_METHODS = [
    {"name": "Fine-Tuning", "strategies": ["finetune"]},
    {"name": "Merge only", "strategies": ["merge"]},
    {"name": "Realign only", "strategies": ["finetune", "realign"], "replay_ratio": 0.1},
    {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1},
    {"name": "MERA (1%)", "strategies": ["merge", "realign"], "replay_ratio": 0.01},
    {"name": "Replay (10%)", "strategies": ["replay"], "replay_ratio": 0.1},
    {"name": "Replay (10%) + Realign", "strategies": ["replay", "realign"], "replay_ratio": 0.1},
    {"name": "EWC", "strategies": ["ewc"], "fisher_ratio": 0.05},
    {"name": "EWC + Realign", "strategies": ["ewc", "realign"], "fisher_ratio": 0.05, "realign_ratio": 0.1},
    {"name": "PathWeave", "strategies": ["pathweave"], "pathweave_in_rank": 2},
    {"name": "PathWeave + Realign", "strategies": ["pathweave", "realign"], "pathweave_in_rank": 2,
     "realign_ratio": 0.1},
]


def machine_fingerprint() -> str:
    """Digest of a small seeded Llama's logits and one AdamW step: equal on machines whose float
    kernels give the same bits. The golden files were taken on one machine; another CPU (other
    SIMD paths) may round differently, and then byte identity is not a meaningful check."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 97, (3, 11))
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-3)
    llm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        logits = llm(input_ids=ids).logits
    return hashlib.sha256(logits.numpy().tobytes()).hexdigest()


def _digest(out: Path) -> dict:
    return {str(p.relative_to(out).parent): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("predictions.jsonl"))}


def test_micro_run_scores_and_predictions_are_byte_identical_to_the_golden_files(micro_assets, tmp_path):
    fingerprint = machine_fingerprint()
    if not os.environ.get("MERA_WRITE_GOLDEN") and fingerprint != (DATA / "golden_fingerprint.txt").read_text().strip():
        pytest.skip("this machine's float kernels differ from those the golden files were taken on "
                    "(tests/data/golden_fingerprint.txt); byte identity cannot be checked here")
    cfg = micro_config(micro_assets, tmp_path, methods=GOLDEN_METHODS)
    data = yaml.safe_load(cfg.read_text())  # three stages: a third adapter, CMA at 1/3, EWC's saved Fisher
    data["model"]["branches"]["video"] = {"encoder": {"family": "toy_video", "path": str(micro_assets / "image")}}
    data["orders"] = {"sequential": ["image", "point", "video"]}
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    env = {**os.environ, "MERA_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(cfg), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    scores, preds = (out / "scores.csv").read_bytes(), _digest(out)
    if os.environ.get("MERA_WRITE_GOLDEN"):
        (DATA / "golden_micro_scores.csv").write_bytes(scores)
        (DATA / "golden_micro_predictions.json").write_text(json.dumps(preds, indent=1) + "\n")
        (DATA / "golden_fingerprint.txt").write_text(fingerprint + "\n")
    assert scores == (DATA / "golden_micro_scores.csv").read_bytes()
    assert preds == json.loads((DATA / "golden_micro_predictions.json").read_text())
