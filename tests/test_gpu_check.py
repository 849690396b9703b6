"""benchmarks/gpu_check.py --tiny: the GPU check's code paths (every part through mera's own
training loop, LoRA, CMA fold, PathWeave, profiling and evaluation) on the CPU at toy sizes; the
JSON holds every measurement, with the parameter counts computed by hand. No timing is asserted
beyond being positive."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
TRAINING = ("align", "instruct", "realign", "pathweave")


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def _lora_pairs(r=8, hidden=64, kv=32, inter=128, layers=2):
    """(in, out) of every linear module of the tiny Llama (lm_head excluded), and LoRA r's parameters."""
    mods = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
            (hidden, inter), (hidden, inter), (inter, hidden)] * layers
    return mods, sum(r * (i + o) for i, o in mods)


def test_tiny_check_measures_every_part(tmp_path):
    out = tmp_path / "gc.json"
    r = _run("--tiny", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["sizes"] == "tiny" and res["device"] == "cpu" and res["dtype"] == "bfloat16"
    parts = res["parts"]
    assert list(parts) == ["align", "instruct", "fold", "realign", "pathweave", "infer", "eval"]
    assert not [p for p in parts.values() if "error" in p]
    for name in TRAINING:
        p = parts[name]
        assert p["tokens_per_s"] > 0 and p["samples_per_s"] > 0 and p["peak_mib"] > 0, name
        assert p["steps"] == 2 and p["micro_batch"] == 4 and math.isfinite(p["loss_last"]), name
        assert p["memory_kind"] == "rss"
    # an image sample's tokens: its (28 / 7)^2 = 16 media tokens, the prompt's and the 12-word answer's
    assert parts["align"]["tokens_per_sample"] > 16 + 12
    mods, lora = _lora_pairs()
    image_mlp = (32 * 64 + 64) + (64 * 64 + 64)  # CLIP width 32 -> LLM 64 -> 64
    assert parts["align"]["trainable_m"] * 1e6 == pytest.approx(image_mlp)
    assert parts["instruct"]["trainable_m"] * 1e6 == pytest.approx(image_mlp + lora)
    assert parts["instruct"]["lora_r"] == 8
    fold = parts["fold"]
    assert fold["modules"] == len(mods) == 14 and fold["coef"] == 0.5 and fold["rank"] == 8
    assert fold["seconds"] > 0 and len(fold["seconds_each"]) == 2
    inf = parts["infer"]
    for k in ("merged", "pathweave"):  # 2 prompts of each of image, point, audio; 6 new tokens each
        assert inf[k]["ms_per_token"] > 0 and inf[k]["tokens"] == 6 * 6 and inf[k]["samples"] == 6, k
    # PathWeave after 3 modalities keeps, per linear module, 3 adapters (LoRA r 8), the gates and noise
    # scales of paths 1 and 2 (Linear(in, 2) and Linear(in, 3), no bias: 2 x (2 + 3) x in) and the in-adapters
    # 0_1, 0_2 and 1_2 (r -> 2r -> r with biases)
    inner = (8 * 16 + 16) + (16 * 8 + 8)
    extra = sum(3 * 8 * (i + o) + 10 * i + 3 * inner for i, o in mods)
    assert (inf["pathweave"]["llm_params_m"] - inf["merged"]["llm_params_m"]) * 1e6 == pytest.approx(extra)
    assert inf["ratio_ms_per_token"] == pytest.approx(inf["pathweave"]["ms_per_token"] / inf["merged"]["ms_per_token"])
    ev = parts["eval"]
    assert ev["samples"] == 32 and ev["batch_1"]["samples_per_s"] > 0 and ev["batch_32"]["samples_per_s"] > 0
    # the paper's Table 3 figures, beside ours
    rows = {row["what"].split(" [")[0]: row for row in res["comparison"]}
    assert rows["inference ms/token, merged model (MERA), batch 1"]["paper"] == 34.0
    assert rows["inference ms/token, PathWeave, batch 1"]["paper"] == 111.0
    assert rows["inference peak memory, PathWeave / merged"]["paper"] == pytest.approx(20.32 / 17.71)
    assert rows["train peak memory, step B + LoRA, micro-batch 4 (GiB)"]["paper"] == 37.43
    assert rows["train time PathWeave / LoRA fine-tuning"]["paper"] == pytest.approx(81 / 53)
    assert all(row["ours"] > 0 for row in res["comparison"])
    assert "beside the paper" in r.stdout and "pathweave" in r.stdout


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path):
    """--only two parts; the fold hits an injected error half-way (mera.faults): it is reported in
    the table and the JSON, the inference part still runs (with a random delta: no instruct part),
    and the exit status is 1."""
    out = tmp_path / "gc.json"
    r = _run("--tiny", "--only", "fold", "--only", "infer", "--json", out,
             env={"MERA_FAULT": "merge:1", "MERA_FAULT_MODE": "raise"})
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert list(res["parts"]) == ["fold", "infer"]
    assert res["parts"]["fold"]["error"] == "InjectedFault: injected fault at merge #1"
    assert "fold       FAILED: InjectedFault" in r.stdout
    assert res["parts"]["infer"]["merged"]["ms_per_token"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_real_sizes_need_a_gpu():
    r = _run("--only", "fold")
    assert r.returncode == 2 and "no CUDA device here; --tiny" in r.stderr and "Traceback" not in r.stderr
