"""End to end: a 2-modality micro run (image with an MLP, point cloud with a Q-Former), fine-tuning
and MERA; stage checkpoints rebuild the exact model; --resume gives identical scores."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from micro import micro_config  # noqa: E402

from mera.config import load_config
from mera.continual import checkpoint as ckpt
from mera.continual.assets import load_assets
from mera.continual.stages import load_stage
from mera.errors import ConfigError, MeraError
from mera.runner.loop import StageLoop
from mera.runner.run_config import RunConfig
from mera.runner.rundir import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def micro_run(micro_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("MERA_HOME", str(tmp / "home"))
    cfg_path = micro_config(micro_assets, tmp)
    cfg = load_config(cfg_path, [], RunConfig)
    out = tmp / "out"
    StageLoop(cfg, out, config_dir=tmp, progress=False, log=lambda m: None).run()
    yield cfg_path, cfg, out
    mp.undo()


def read_csv(path):
    return Path(path).read_text().splitlines()


def test_run_directory_and_scores(micro_run):
    cfg_path, cfg, out = micro_run
    lines = read_csv(out / "scores.csv")
    assert lines[0] == "method,order,seed,stage,modality,dataset,task,score"
    rows = [l.split(",") for l in lines[1:]]
    assert {r[2] for r in rows} == {"0"}  # the config's seed
    rows = [r[:2] + r[3:] for r in rows]  # the columns below as they were before the seed
    experts = [r for r in rows if r[0] == "expert"]
    # one expert per modality and data set, in the order's row set
    assert {(r[3], r[5]) for r in experts} == {("image", "caption"), ("image", "qa"), ("point", "caption"), ("point", "qa")}
    for method in ("Fine-Tuning", "MERA (10%)", "Replay (10%)", "EWC", "PathWeave"):
        st = [r for r in rows if r[0] == method]
        # stage 1: image only (2 sets); stage 2: image and point (4 sets)
        assert sorted((r[2], r[3]) for r in st) == sorted([("1", "image")] * 2 + [("2", "image")] * 2 + [("2", "point")] * 2)
        stage1 = {(r[3], r[5]): r[6] for r in st if r[2] == "1"}
        expert = {(r[3], r[5]): r[6] for r in experts if r[3] == "image"}
        assert stage1 == expert  # stage 1 of every method is the expert of the first modality
    for d in ("experts/image", "experts/point", "sequential/fine-tuning/stage_2_point", "sequential/mera-10/stage_2_point"):
        assert ckpt.is_done(out / d)
    assert (out / "report.md").is_file() and (out / "metrics.json").is_file()
    assert (out / "figures" / "backward_rg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_html_shows_the_runs_own_predictions(micro_run):
    """mera run writes report.html next to report.md; its gallery shows the first 3 test items of each
    task and modality with each method's prediction read from the stage folders."""
    from html_fixture import Page

    _, _, out = micro_run
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    items = [t for t in page.tables if t["class"] == "preds"]
    assert [t["context"][-1] for t in items] == [f"item-{m}_{t}_test_{k:05d}" for m in ("image", "point")
                                                 for t in ("caption", "qa") for k in range(3)]
    lines = (out / "sequential" / "mera-10" / "stage_2_point" / "predictions.jsonl").read_text().splitlines()
    preds = {(p["modality"], p["id"]): p for p in map(json.loads, lines)}
    for t in items:
        sid = t["context"][-1][len("item-"):]
        p = preds[(sid.split("_")[0], sid)]
        row = next(r for r in t["rows"] if r[0] == "MERA (10%)")
        mark = "" if "judgement" not in p else " " + ("\u2713" if p["judgement"] == 1.0 else "\u2717")
        assert row[-1] == (p["prediction"].strip() or "(empty)") + mark  # the last stage's column
    assert not [i for i in page.images if not i["src"].startswith("data:image/")]


def test_merge_coefficients_and_no_llm_copy(micro_run):
    _, _, out = micro_run
    ft = ckpt.read_manifest(out / "sequential/fine-tuning/stage_2_point")
    mera = ckpt.read_manifest(out / "sequential/mera-10/stage_2_point")
    assert ft["folds"][0]["coef"] == 1.0
    assert mera["folds"][0]["coef"] == 0.5  # CMA at stage 2: W_1 + dW_2 / 2
    # R_2 = 10% of D_1 and of D_2 (captions + QA: 32 + 64 = 96 each -> 10 each)
    assert mera["log"]["realign"]["samples"] == 20
    assert "realign" not in ft["log"]
    # the stage holds only LoRA pairs (rank 4) and connectors, never an LLM weight
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(micro_run[1].model.llm)
    linear = {n: m.weight.shape for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    lora = load_file(str(out / "sequential/mera-10/stage_2_point/delta.safetensors"))
    assert len(lora) == 2 * len(linear)
    for name, (o, i) in linear.items():
        assert lora[f"{name}.lora_A"].shape == (4, i) and lora[f"{name}.lora_B"].shape == (o, 4)
    conn = load_file(str(out / "sequential/mera-10/stage_2_point/connectors.safetensors"))
    assert {k.split(".")[0] for k in conn} == {"image", "point"}
    assert sum(t.numel() for t in lora.values()) < 0.5 * sum(p.numel() for p in llm.parameters())


def test_realign_changed_old_connector_but_finetune_did_not(micro_run):
    _, _, out = micro_run
    exp = ckpt.load_connectors(out / "experts/image")["image"]
    ft = ckpt.load_connectors(out / "sequential/fine-tuning/stage_2_point")["image"]
    mera = ckpt.load_connectors(out / "sequential/mera-10/stage_2_point")["image"]
    assert all(torch.equal(exp[k], ft[k]) for k in exp)  # no old data in fine-tuning: old connector untouched
    assert any(not torch.equal(exp[k], mera[k]) for k in exp)  # realign trained it


def test_replay_mixes_old_data_and_trains_old_connectors(micro_run):
    _, _, out = micro_run
    m = ckpt.read_manifest(out / "sequential/replay-10/stage_2_point")
    assert m["folds"][0]["coef"] == 1.0
    assert m["log"]["replay"]["samples"] == 10  # 10% of the image set's 96 training samples
    assert "realign" not in m["log"]
    exp = ckpt.load_connectors(out / "experts/image")["image"]
    rep = ckpt.load_connectors(out / "sequential/replay-10/stage_2_point")["image"]
    assert any(not torch.equal(exp[k], rep[k]) for k in exp)  # replayed image samples trained it


def test_ewc_continues_the_adapter_and_saves_fisher(micro_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, cfg, out = micro_run
    folder = out / "sequential/ewc/stage_2_point"
    m = ckpt.read_manifest(folder)
    # the expert's adapter is taken out of the weights (-1) and continued; its result folded (+1)
    assert [d["coef"] for d in m["folds"]] == [-1.0, 1.0]
    assert m["log"]["ewc"]["fisher_samples_image"] == 5 and m["log"]["ewc"]["fisher_samples_point"] == 5
    fisher = load_file(str(folder / "strategy.safetensors"))
    lora = load_file(str(folder / "delta.safetensors"))  # the trained (continued) adapter
    assert len(fisher) == len(lora)  # one Fisher tensor per LoRA matrix
    assert all((f >= 0).all() for f in fisher.values()) and any((f > 0).any() for f in fisher.values())
    # so the LLM is the base plus the continued adapter alone
    base = AutoModelForCausalLM.from_pretrained(cfg.model.llm)
    ref = AutoModelForCausalLM.from_pretrained(cfg.model.llm)
    ckpt.apply_stage_llm(base, folder)
    ckpt.load_folds(folder)[1][0].fold(ref, 1.0)
    sd, rsd = base.state_dict(), ref.state_dict()
    assert max((sd[k] - rsd[k]).abs().max().item() for k in sd) < 1e-5


def test_ewc_penalty_hand_computed():
    from mera.continual.strategies.ewc import ewc_penalty

    p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    anchor = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[1.0]])}
    fisher = {"a": torch.tensor([0.5, 9.0]), "b": torch.tensor([[0.25]])}
    # lambda/2 * (0.5 * 1^2 + 9 * 0^2 + 0.25 * 2^2) = 1/2 * (0.5 + 1.0) = 0.75
    assert ewc_penalty(p, anchor, fisher, 1.0).item() == pytest.approx(0.75)
    assert ewc_penalty(anchor, anchor, fisher, 1.0).item() == 0.0


def test_pathweave_keeps_the_expert_adapter_and_its_modules(micro_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, cfg, out = micro_run
    folder = out / "sequential/pathweave/stage_2_point"
    m = ckpt.read_manifest(folder)
    # the expert's adapter is taken out of the weights: the LLM under the adapters is the base LLM
    assert [d["coef"] for d in m["folds"]] == [-1.0]
    base = AutoModelForCausalLM.from_pretrained(cfg.model.llm)
    rebuilt = AutoModelForCausalLM.from_pretrained(cfg.model.llm)
    ckpt.apply_stage_llm(rebuilt, folder)
    sd, rsd = base.state_dict(), rebuilt.state_dict()
    assert max((sd[k] - rsd[k]).abs().max().item() for k in sd) < 1e-5
    layout = m["llm_modules"]
    assert layout["kind"] == "pathweave" and layout["num_adapters"] == 2 and layout["inner"] == ["0_1"]
    linear = [n for n, mod in base.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    assert layout["modules"] == sorted(linear)
    # adapter 0 is the image expert's LoRA, unchanged by the point stage's training
    expert = ckpt.load_folds(out / "experts/image")[0][0].modules
    state = load_file(str(folder / "strategy.safetensors"))
    for name in linear:
        assert torch.equal(state[f"pathweave.{name}.down.0.weight"], expert[name]["A"])
        assert torch.equal(state[f"pathweave.{name}.up.0.weight"], expert[name]["B"])
    # the new adapter, its in-adapter and the gate did train
    assert any(state[f"pathweave.{n}.up.1.weight"].abs().max() > 0 for n in linear)
    assert any(state[f"pathweave.{n}.inner.0_1.1.weight"].abs().max() > 0 for n in linear)
    assert any(state[f"pathweave.{n}.gate.1.weight"].abs().max() > 0 for n in linear)  # the point modality's gate


def test_realign_changes_only_connector_weights(micro_run):
    from mera.config import registry
    from mera.continual.training import make_context

    cfg_path, cfg, out = micro_run
    assets = load_assets(cfg, cfg_path.parent, judge=False)
    model = load_stage(assets, out / "sequential/fine-tuning/stage_2_point")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = make_context(assets, model, order="sequential", method="x", stage=2, modality="point",
                       seen=["image", "point"], seed=3, parent=None, steps_dir=None, progress=False)
    registry.build("strategy", "realign", {"ratio": 0.1}).after_stage(ctx)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("branches.") and k.split(".")[2] == "connector" for k in changed)
    # both connectors moved (the replay set holds both modalities); encoders and LLM did not
    assert {k.split(".")[1] for k in changed} == {"image", "point"}


def test_loaded_stage_reproduces_its_predictions(micro_run):
    cfg_path, cfg, out = micro_run
    assets = load_assets(cfg, cfg_path.parent, judge=False)
    from mera.eval.evaluate import generate_answers

    for stage in ("sequential/fine-tuning/stage_2_point", "sequential/mera-10/stage_2_point",
                  "sequential/ewc/stage_2_point", "sequential/pathweave/stage_2_point"):
        folder = out / stage
        model = load_stage(assets, folder)
        saved = [json.loads(l) for l in (folder / "predictions.jsonl").read_text().splitlines()]
        for m in ("image", "point"):
            samples = assets.sets[m].caption_test + assets.sets[m].qa_test
            preds = generate_answers(model, assets.tokenizer, samples, assets.provider, 8, 12, progress=False)
            want = [p["prediction"] for p in saved if p["modality"] == m]
            assert preds == want, stage


def test_resume_after_crash_gives_identical_scores(micro_run, tmp_path, monkeypatch):
    cfg_path, cfg, out = micro_run
    monkeypatch.setenv("MERA_HOME", str(out.parent / "home"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # a crash during MERA's stage 2 (no DONE, a half-written file) and during the point expert
    st = copy / "sequential/mera-10/stage_2_point"
    (st / "DONE").unlink()
    (st / "connectors.safetensors").write_bytes(b"garbage")
    (copy / "experts/point/DONE").unlink()
    (copy / "scores.csv").unlink()
    StageLoop(cfg, copy, config_dir=cfg_path.parent, resume=True, progress=False, log=lambda m: None).run()
    assert (copy / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()


def test_resume_refuses_a_changed_config_and_existing_dir_needs_resume(micro_run):
    cfg_path, cfg, out = micro_run
    changed = load_config(cfg_path, ["train.instruct.lr_lora=0.1", "eval.max_new_tokens=5"], RunConfig)
    with pytest.raises(ConfigError) as e:
        RunDir(out, changed).prepare(resume=True)
    assert "train.instruct.lr_lora" in str(e.value) and "eval.max_new_tokens" in str(e.value)
    with pytest.raises(MeraError, match="--resume"):
        RunDir(out, cfg).prepare(resume=False)


def test_dry_run_lists_experts_and_stages(micro_run, tmp_path):
    cfg_path, _, _ = micro_run
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(cfg_path), "--dry-run", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "experts/image" in r.stdout and "experts/point" in r.stdout
    assert "2 experts, 10 stages" in r.stdout
    assert not (tmp_path / "x").exists()  # nothing trained or written


def test_missing_model_folder_is_a_clear_error_and_writes_nothing(micro_run, tmp_path):
    cfg_path, _, _ = micro_run
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(cfg_path), "--out", str(out),
                        f"model.llm={tmp_path / 'no-such-llm'}"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.llm" in r.stderr and "no-such-llm" in r.stderr
    assert not out.exists()


def test_efficiency_table_and_pathweave_inference_overhead(micro_run):
    _, cfg, out = micro_run
    eff = json.loads((out / "efficiency.json").read_text())
    assert list(eff) == [m.name for m in cfg.methods]
    for name, e in eff.items():
        assert e["train_seconds"] > 0 and e["train_peak_mib"] > 0 and e["infer_ms_per_token"] > 0, name
    prof = json.loads((out / "sequential/pathweave/stage_2_point/profile.json").read_text())
    assert prof["samples"] == 4 and prof["tokens"] == 4 * cfg.eval.max_new_tokens  # fixed length, batch 1
    # MERA's final model has the plain LLM's size; PathWeave keeps per linear module two adapters, the point
    # path's gate and noise scale (2 x in each) and its in-adapter into adapter 0 (r -> h -> r, biases; h = in_rank 2)
    assert eff["MERA (10%)"]["llm_params_m"] == eff["Fine-Tuning"]["llm_params_m"]
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(cfg.model.llm)
    extra = 0
    for n, m in llm.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            r, h, i, o = 4, 2, m.in_features, m.out_features
            extra += 2 * (r * i + o * r) + 2 * i + 2 * i + (r * h + h) + (h * r + r)
    assert eff["PathWeave"]["llm_params_m"] * 1e6 == pytest.approx(eff["Fine-Tuning"]["llm_params_m"] * 1e6 + extra)
    md = (out / "report.md").read_text()
    assert "## Efficiency" in md and "| PathWeave |" in md


def test_parallel_workers_give_the_same_scores(micro_run, tmp_path):
    """Experts, then (order, method) chains, in 2 spawned processes of 1 thread each."""
    cfg_path, cfg, out = micro_run
    par = tmp_path / "par"
    StageLoop(cfg, par, config_dir=cfg_path.parent, progress=False, log=lambda m: None, workers=2).run()
    assert (par / "scores.csv").read_text() == (out / "scores.csv").read_text()
    # shared steps work across the workers' units: MERA's stage 2 is Fine-Tuning's step (same family,
    # one unit), EWC's and PathWeave's step A too (stage 2 starts from the expert for every method)
    log = lambda m: json.loads((par / "sequential" / m / "stage_2_point/manifest.json").read_text())["log"]  # noqa: E731
    assert "shared" in log("mera-10") and "shared" not in log("fine-tuning")
    assert {"align_shared" in log(m) for m in ("fine-tuning", "replay-10", "ewc", "pathweave")} == {True, False}
    assert json.loads((par / "efficiency.json").read_text()).keys() == json.loads((out / "efficiency.json").read_text()).keys()


def test_paper_grid_dry_run_lists_exactly_the_grid(tmp_path):
    """configs/toy/paper_grid.yaml: 4 experts, then 13 methods x 2 orders x 4 stages, nothing else."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "mera", "run", str(root / "configs/toy/paper_grid.yaml"), "--dry-run",
                        "--out", str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = load_config(root / "configs/toy/paper_grid.yaml", [], RunConfig)
    names = [m.name for m in cfg.methods]
    assert names == ["Fine-Tuning", "Replay (1%)", "Replay (10%)", "EWC", "PathWeave", "MERA (1%)", "MERA (10%)",
                     "Merge only", "Realign only", "Replay (1%) + Realign", "Replay (10%) + Realign",
                     "EWC + Realign", "PathWeave + Realign"]
    assert cfg.orders == {"sequential": ["image", "video", "audio", "point"],
                          "reverse": ["point", "audio", "video", "image"]}
    assert cfg.run_seeds == [0, 1, 2]
    lines = [l.split() for l in r.stdout.splitlines() if l.startswith("  ") and "stage_" in l]
    listed = sorted(l[-1] for l in lines)
    want = sorted(f"seed_{s}/{o}/{slug}/stage_{i}_{m}" for s in cfg.run_seeds for o, order in cfg.orders.items()
                  for slug in (RunDir(tmp_path, cfg).stage_dir(o, meth, 1, order[0]).parent.name
                               for meth in cfg.methods)
                  for i, m in enumerate(order, 1))
    assert listed == want and len(listed) == 3 * 104
    assert "4 experts, 104 stages per seed; 3 seeds: 12 experts, 312 stages" in r.stdout
    # the schedule: per order, Fine-Tuning's family (the merge and realign ablations train its steps)
    assert "sequential   Fine-Tuning + MERA (1%) + MERA (10%) + Merge only + Realign only" in r.stdout
    assert not (tmp_path / "g").exists()


def test_profile_command_refreshes_the_efficiency_table(micro_run, tmp_path):
    from mera.runner.profile import profile_run

    cfg_path, cfg, out = micro_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    prof = profile_run(copy, rounds=2, config_dir=cfg_path.parent, log=lambda m: None)
    assert list(prof) == [m.name for m in cfg.methods]
    assert all(len(p["ms_per_token_all"]) == 2 and p["ms_per_token"] > 0 for p in prof.values())
    eff = json.loads((copy / "efficiency.json").read_text())
    assert eff["PathWeave"]["infer_profile"].startswith("mera profile")
    assert eff["PathWeave"]["llm_params_m"] > eff["MERA (10%)"]["llm_params_m"] == eff["Fine-Tuning"]["llm_params_m"]
    assert f"{prof['PathWeave']['ms_per_token']:.2f}" in (copy / "report.md").read_text()
    assert (copy / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()  # scores untouched


def test_gradient_checkpointing_gives_the_same_training(micro_run):
    from mera.runner.run_config import PhaseConfig

    cfg_path, cfg, out = micro_run
    results = []
    from mera.continual.training import run_phase

    for gc in (False, True):
        c = cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "gradient_checkpointing": gc, "realign": PhaseConfig(batch_size=4, epochs=1)})})
        assets = load_assets(c, cfg_path.parent, judge=False)
        model = load_stage(assets, out / "sequential/fine-tuning/stage_2_point")
        res = run_phase(assets, model, [{"params": model.connector_parameters(), "lr": 1e-3}],
                        assets.sets["image"].train[:12], "realign", seed=1, desc="gc realign")
        assert not model.llm.is_gradient_checkpointing  # switched off again after the phase
        results.append((res.losses, [p.detach().clone() for p in model.connector_parameters()]))
    (l0, p0), (l1, p1) = results
    assert len(l0) == 3 and l0 == pytest.approx(l1, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(p0, p1))


def test_a_failing_worker_stops_the_parallel_run_with_its_error(micro_run, tmp_path):
    cfg_path, cfg, out = micro_run
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "instruct": cfg.train.instruct.model_copy(update={"lr_lora": 1e30})})})
    with pytest.raises(MeraError, match="instruct: the training loss is nan"):
        StageLoop(bad, tmp_path / "w", config_dir=cfg_path.parent, progress=False, log=lambda m: None,
                  workers=2).run()
    assert not list((tmp_path / "w").rglob("DONE"))  # nothing half-done is marked finished


def _to_version_1(run: Path, methods: list[dict]) -> None:
    """Rewrite a run directory as the first release wrote it: v1 manifests (LoRA files named
    lora*.safetensors, all listed under "deltas", no state key), DONE without a record of the files,
    no shared steps, and a config.yaml in the first release's form."""
    shutil.rmtree(run / ".shared", ignore_errors=True)
    shutil.rmtree(run / ".locks", ignore_errors=True)
    for done in run.rglob("DONE"):
        done.write_text("done\n")
    for manifest in run.rglob("manifest.json"):
        folder = manifest.parent
        m = json.loads(manifest.read_text())
        entries = []
        for k, e in enumerate(m.pop("folds")):
            name = "lora.safetensors" if k == 0 else f"lora_{k}.safetensors"
            data = (folder / e["file"]).read_bytes()
            entries.append({"file": name, "coef": e["coef"], "scalings": e["scalings"]})
            (folder / name).write_bytes(data)
        for f in folder.glob("*.safetensors"):
            if f.name.startswith(("delta", "fold_")):
                f.unlink()
        m.pop("trained")
        m.pop("state_key", None)
        manifest.write_text(json.dumps({**m, "format": "mera-stage-v1", "deltas": entries}, indent=2))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["methods"] = methods
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_a_first_release_run_directory_is_resumed_to_the_same_scores(micro_run, tmp_path, monkeypatch):
    """v1 manifests are read (EWC continues the v1 adapter, PathWeave takes the v1 expert's) and a
    config.yaml in the first release's form resumes: the redone stages score exactly the same."""
    from micro import METHODS

    cfg_path, cfg, out = micro_run
    monkeypatch.setenv("MERA_HOME", str(out.parent / "home"))
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    _to_version_1(old, METHODS)
    assert ckpt.read_manifest(old / "experts/image")["format"] == "mera-stage-v1"
    for method in ("mera-10", "ewc", "pathweave"):
        shutil.rmtree(old / f"sequential/{method}/stage_2_point")
    (old / "scores.csv").unlink()
    StageLoop(cfg, old, config_dir=cfg_path.parent, resume=True, progress=False, log=lambda m: None).run()
    assert (old / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()
    assert ckpt.read_manifest(old / "sequential/ewc/stage_2_point")["format"] == "mera-stage-v2"
