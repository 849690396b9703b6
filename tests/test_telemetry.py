"""Training curves (metrics.jsonl, train.report_to), honest inference profiles and the progress of
parallel workers (issue 15, items 2-4).

The micro run here: Fine-Tuning and MERA (10%) over image -> point (MERA's stage 2 reuses
Fine-Tuning's step and adds realign), with tensorboard on."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from micro import micro_config
from torch import nn

from mera import faults
from mera.config import load_config
from mera.continual import checkpoint as ckpt
from mera.errors import ConfigError
from mera.runner.loop import StageLoop
from mera.runner.run_config import RunConfig
from mera.train.loop import StepCheckpoint, train_phase

METHODS = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
           {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1}]


# ------------------------------------------------------------------------------ the training loop


class Tiny(nn.Module):
    def __init__(self, dropout=0.3):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.drop = nn.Dropout(dropout)
        self.b = nn.Linear(8, 1)

    def forward(self, batch):
        y = self.b(self.drop(torch.tanh(self.a(batch["x"]))))
        return SimpleNamespace(loss=((y.squeeze(-1) - batch["y"]) ** 2).mean())


def _data(n=37):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "y": x[i].sum()} for i in range(n)]


def _collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


def _phase(model=None, **kw):
    model = model or Tiny()
    args = dict(batch_size=8, micro_batch_size=4, epochs=2.5, warmup_ratio=0.1, seed=5, progress=False)
    args.update(kw)
    res = train_phase(model, [{"params": list(model.a.parameters()), "lr": 1e-2},
                              {"params": list(model.b.parameters()), "lr": 3e-3}], _data(), _collate, **args)
    return model, res


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """transformers' get_cosine_schedule_with_warmup multiplier, by hand (0.5 cycles)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_each_optimizer_step_is_recorded_without_changing_the_training():
    """37 samples, micro-batches of 4 (10 per epoch), 2 per step, 2.5 epochs: 25 micro-batches, 13 steps;
    the 13th is the phase's last micro-batch alone, a window never stepped (no gradient norm). The
    record (and the callback) changes no parameter or loss."""
    ref_model, ref = _phase()
    seen = []
    model, res = _phase(on_step=seen.append)
    assert res.losses == ref.losses and all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    assert res.steps == len(res.losses) == len(res.lrs) == len(res.grad_norms) == 13
    assert [s["step"] for s in seen] == list(range(1, 14)) and {s["total_steps"] for s in seen} == {13}
    assert [s["loss"] for s in seen] == res.losses and [s["lr"] for s in seen] == res.lrs
    assert [s["grad_norm"] for s in seen] == res.grad_norms
    assert res.grad_norms[-1] is None and all(g > 0 for g in res.grad_norms[:-1])
    # the learning rate each step stepped with: 1e-2 x the schedule, warmup ceil(0.1 x 13) = 2
    want = [1e-2 * cosine_with_warmup(k, 2, 13) for k in range(13)]
    assert res.lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    # ... which is transformers' own schedule
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, 2, 13)
    hf = []
    for _ in range(13):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert res.lrs == hf


def test_the_gradient_norm_is_the_one_before_clipping_computed_by_hand():
    """The first step's gradient, rebuilt by hand from the same data order (no dropout, so no other
    randomness): its norm is recorded, with clipping on (clip_grad_norm_'s own) and off."""
    data = _data()
    order = list(torch.utils.data.DataLoader(range(len(data)), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(5)))
    model = Tiny(dropout=0.0)
    for idx in order[:2]:  # the first window: two micro-batches, each loss / 2
        (model(_collate([data[i] for i in idx.tolist()])).loss / 2).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
    assert norm > 0.05  # clipped below
    for clip in (0.05, None):
        _, res = _phase(Tiny(dropout=0.0), max_grad_norm=clip)
        assert res.grad_norms[0] == pytest.approx(norm, rel=1e-5), clip
    _, clipped = _phase(Tiny(dropout=0.0), max_grad_norm=0.05)
    _, free = _phase(Tiny(dropout=0.0), max_grad_norm=None)
    # the first step has lr 0 (warmup), the later ones differ: clipping did act
    assert clipped.losses[:2] == free.losses[:2] and clipped.losses[2:] != free.losses[2:]


@pytest.mark.parametrize("kill_at", [3, 8])
def test_an_interrupted_phase_resumes_with_its_whole_record(tmp_path, monkeypatch, kill_at):
    _, ref = _phase()
    ck = StepCheckpoint(tmp_path / "phase", every=2)
    monkeypatch.setenv("MERA_FAULT", f"train_step:{kill_at}")
    monkeypatch.setenv("MERA_FAULT_MODE", "raise")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        _phase(checkpoint=ck)
    monkeypatch.delenv("MERA_FAULT")
    seen = []
    _, res = _phase(checkpoint=ck, on_step=seen.append)
    assert (res.losses, res.lrs, res.grad_norms) == (ref.losses, ref.lrs, ref.grad_norms)
    saved = 2 * (kill_at // 2)  # the last checkpoint (saved before the kill point): its steps are not heard again
    assert [s["step"] for s in seen] == list(range(saved + 1, 14))


# ------------------------------------------------------------------------------ a micro run


def _cfg(micro_assets, tmp, **train):
    path = micro_config(micro_assets, tmp, methods=METHODS, train=train or None)
    return path, load_config(path, [], RunConfig)


@pytest.fixture(scope="module")
def tele_run(micro_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tele")
    mp = pytest.MonkeyPatch()
    mp.setenv("MERA_HOME", str(tmp / "home"))
    path, cfg = _cfg(micro_assets, tmp, report_to=["tensorboard"])
    out = tmp / "out"
    StageLoop(cfg, out, config_dir=tmp, progress=False, log=lambda m: None).run()
    yield path, cfg, out
    mp.undo()


def lines(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def n_steps(n: int, pc) -> int:
    """A phase's optimizer steps from its recipe: ceil(n / micro) micro-batches an epoch, times the
    epochs, grouped by batch / micro."""
    micro = pc.micro_batch_size or pc.batch_size
    return math.ceil(round(math.ceil(n / micro) * pc.epochs) / (pc.batch_size // micro))


def test_metrics_jsonl_has_a_line_per_optimizer_step_and_the_scores(tele_run):
    _, cfg, out = tele_run
    all_lines = lines(out / "metrics.jsonl")
    # the run's file is the stages' files in plan order: the experts, then order / method / stage
    folders = [out / "experts/image", out / "experts/point"] + [out / "sequential" / m / f"stage_{i}_{mod}"
                                                                 for m in ("fine-tuning", "mera-10")
                                                                 for i, mod in ((1, "image"), (2, "point"))]
    assert (out / "metrics.jsonl").read_text() == "".join((f / "metrics.jsonl").read_text() for f in folders)
    for f in folders:  # written with the stage: DONE records it
        assert "metrics.jsonl" in json.loads((f / "DONE").read_text())["files"] and ckpt.done_problem(f) is None
    keys = ["type", "seed", "order", "method", "stage", "modality", "phase", "step", "total_steps", "loss", "lr",
            "grad_norm"]
    train = [l for l in all_lines if l["type"] == "train"]
    assert all(list(l) == keys for l in train)
    # 32 captions, 96 captions + QA, realign: 10% of both modalities' 96 (10 + 10)
    want = {"align": n_steps(32, cfg.train.align), "instruct": n_steps(96, cfg.train.instruct),
            "realign": n_steps(20, cfg.train.realign)}
    assert want == {"align": 8, "instruct": 36, "realign": 5}

    def phases(method, stage, modality):
        got = {}
        for l in train:
            if (l["method"], l["stage"], l["modality"]) == (method, stage, modality):
                got.setdefault(l["phase"], []).append(l)
        return got

    expected = {("expert", 1, "image"): ["align", "instruct"], ("expert", 1, "point"): ["align", "instruct"],
                ("Fine-Tuning", 1, "image"): [], ("MERA (10%)", 1, "image"): [],
                ("Fine-Tuning", 2, "point"): ["align", "instruct"], ("MERA (10%)", 2, "point"): ["align", "instruct", "realign"]}
    for (method, stage, modality), names in expected.items():
        got = phases(method, stage, modality)
        assert list(got) == names, (method, stage)
        for name, ls in got.items():
            assert [l["step"] for l in ls] == list(range(1, want[name] + 1))
            assert {l["total_steps"] for l in ls} == {want[name]}
            assert {l["order"] for l in ls} == {None if method == "expert" else "sequential"} and {l["seed"] for l in ls} == {0}
            pc = getattr(cfg.train, name)
            warmup = math.ceil(pc.warmup_ratio * want[name])
            assert [l["lr"] for l in ls] == pytest.approx(
                [pc.lr_connector * cosine_with_warmup(k, warmup, want[name]) for k in range(want[name])], rel=1e-12)
            assert all(l["grad_norm"] > 0 and l["loss"] > 0 for l in ls)
    # the losses are train_phase's: the manifest keeps them (rounded to 6 places; realign's first and last whole)
    for folder, method in ((out / "sequential/fine-tuning/stage_2_point", "Fine-Tuning"),
                           (out / "sequential/mera-10/stage_2_point", "MERA (10%)")):
        log = ckpt.read_manifest(folder)["log"]
        got = phases(method, 2, "point")
        for name in ("align", "instruct"):
            assert [l["loss"] for l in got[name]] == pytest.approx(log[name]["losses"], abs=1e-6)
    realign = phases("MERA (10%)", 2, "point")["realign"]
    log = ckpt.read_manifest(out / "sequential/mera-10/stage_2_point")["log"]["realign"]
    assert (realign[0]["loss"], realign[-1]["loss"]) == (log["loss_first"], log["loss_last"])
    # MERA's stage 2 reused Fine-Tuning's step: the same lines as if trained
    assert "shared" in log or "shared" in ckpt.read_manifest(out / "sequential/mera-10/stage_2_point")["log"]
    strip = lambda ls: [{k: v for k, v in l.items() if k != "method"} for l in ls]  # noqa: E731
    ft, mera = phases("Fine-Tuning", 2, "point"), phases("MERA (10%)", 2, "point")
    assert strip(ft["align"] + ft["instruct"]) == strip(mera["align"] + mera["instruct"])


def test_eval_lines_are_the_scores(tele_run):
    _, _, out = tele_run
    evals = [l for l in lines(out / "metrics.jsonl") if l["type"] == "eval"]
    assert all(list(l) == ["type", "seed", "order", "method", "stage", "modality", "eval_modality", "task", "score"]
               for l in evals)
    got = {(l["method"], "" if l["order"] is None else l["order"], l["stage"], l["eval_modality"], l["task"]): l["score"]
           for l in evals}
    assert len(got) == len(evals)
    rows = (out / "scores.csv").read_text().splitlines()[1:]
    want = {}
    for r in rows:
        method, order, seed, stage, modality, _dataset, task, score = r.split(",")
        assert seed == "0"
        if method == "expert":  # one expert, listed once per order in scores.csv
            order, stage = "", 1
        want[(method, order, int(stage), modality, task)] = float(score)
    assert got == want
    # the expert's lines carry the modality it learned, a stage's the modality new at the stage
    assert {(l["method"], l["stage"], l["modality"]) for l in evals if l["method"] != "expert"} == \
        {(m, 1, "image") for m in ("Fine-Tuning", "MERA (10%)")} | {(m, 2, "point") for m in ("Fine-Tuning", "MERA (10%)")}


def test_tensorboard_event_files_hold_the_losses(tele_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out = tele_run
    all_lines = lines(out / "metrics.jsonl")
    runs = {"experts/image": ("expert", "image"), "sequential/mera-10": ("MERA (10%)", None)}
    for rel, (method, modality) in runs.items():
        ea = EventAccumulator(str(out / "trackers" / rel / "micro"))
        ea.Reload()
        mine = [l for l in all_lines if l["method"] == method and (modality is None or l["modality"] == modality)]
        train = [l for l in mine if l["type"] == "train"]
        for phase in {l["phase"] for l in train}:
            ls = [l for l in train if l["phase"] == phase]
            ev = ea.Scalars(f"{phase}/loss")
            assert [e.value for e in ev] == pytest.approx([l["loss"] for l in ls], rel=1e-6)  # float32 there
            for key in ("lr", "grad_norm"):
                assert [e.value for e in ea.Scalars(f"{phase}/{key}")] == pytest.approx([l[key] for l in ls], rel=1e-6)
            # the step axis: the chain's optimizer steps so far
            assert [e.step for e in ev] == [1 + train.index(l) for l in ls]
        for l in (l for l in mine if l["type"] == "eval"):
            assert l["score"] in [pytest.approx(e.value, rel=1e-6) for e in ea.Scalars(f"eval/{l['eval_modality']}/{l['task']}")]


def test_unshared_run_writes_the_same_metrics(tele_run, micro_assets, tmp_path, monkeypatch):
    """share: false trains MERA's stage 2 itself: the same lines, byte for byte (trackers off)."""
    monkeypatch.setenv("MERA_HOME", str(tele_run[2].parent / "home"))
    _, cfg = _cfg(micro_assets, tmp_path)
    cfg = cfg.model_copy(update={"share": False})
    out = tmp_path / "unshared"
    StageLoop(cfg, out, config_dir=tmp_path, progress=False, log=lambda m: None).run()
    assert not (out / ".shared").exists() and not (out / "trackers").exists()
    assert (out / "scores.csv").read_bytes() == (tele_run[2] / "scores.csv").read_bytes()
    assert (out / "metrics.jsonl").read_bytes() == (tele_run[2] / "metrics.jsonl").read_bytes()


def test_killed_twice_then_resumed_gives_the_same_metrics(tele_run, micro_assets, tmp_path):
    """SIGKILL in the middle of phases (step checkpoints every 3 steps: each resume continues a phase from
    one), resumed: the same file."""
    cfg_path = micro_config(micro_assets, tmp_path, methods=METHODS, train={"checkpoint_every": 3})
    out = tmp_path / "crashy"
    cmd = [sys.executable, "-m", "mera", "run", str(cfg_path), "--out", str(out), "--resume", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERA_FAULT")}
    env["MERA_HOME"] = str(tele_run[2].parent / "home")
    for fault in ("train_step:14", "train_step:50"):  # each in the middle of an instruct phase, after a step checkpoint
        r = subprocess.run(cmd, env={**env, "MERA_FAULT": fault}, capture_output=True, text=True)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "scores.csv").read_bytes() == (tele_run[2] / "scores.csv").read_bytes()
    assert (out / "metrics.jsonl").read_bytes() == (tele_run[2] / "metrics.jsonl").read_bytes()


def test_a_run_directory_without_metrics_files_still_resumes(tele_run, tmp_path, monkeypatch):
    """Stages done by an earlier release (no metrics.jsonl; DONE in its first form) resume; the run's
    file gets their scores; a resume may change train.report_to (it computes nothing)."""
    path, cfg, out = tele_run
    monkeypatch.setenv("MERA_HOME", str(out.parent / "home"))
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for f in old.rglob("metrics.jsonl"):
        f.unlink()
    for done in old.rglob("DONE"):
        done.write_text("done\n")
    shutil.rmtree(old / "trackers")
    plain = cfg.model_copy(update={"train": cfg.train.model_copy(update={"report_to": []})})
    StageLoop(plain, old, config_dir=path.parent, resume=True, progress=False, log=lambda m: None).run()
    assert (old / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()
    assert lines(old / "metrics.jsonl") == [l for l in lines(out / "metrics.jsonl") if l["type"] == "eval"]
    assert not (old / "trackers").exists()


# ------------------------------------------------------------------------------ several workers


def test_two_workers_show_progress_and_profile_after_the_pool(tele_run, micro_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MERA_HOME", str(tele_run[2].parent / "home"))
    _, cfg = _cfg(micro_assets, tmp_path)
    out = tmp_path / "par"
    log = []
    StageLoop(cfg, out, config_dir=tmp_path, progress=False, log=log.append, workers=2).run()
    # the plain output: the workers' lines, and the overall line at each of the 3 units' end
    overall = [l for l in log if re.fullmatch(r"\[\d/3 units done, \d+:\d\d:\d\d elapsed, ETA (\d+:\d\d:\d\d|\?)\]", l)]
    assert [l[1] for l in overall] == ["1", "2", "3"] and overall[-1].endswith("ETA 0:00:00]")
    assert any(l.startswith("[expert image] training") for l in log)
    assert any(l.startswith("[sequential / Fine-Tuning + MERA (10%)]    eval point") for l in log)
    # every final model was profiled by the main process after every unit was done, quietly
    done = max(p.stat().st_mtime for p in out.rglob("DONE"))
    for m in ("fine-tuning", "mera-10"):
        prof = json.loads((out / "sequential" / m / "stage_2_point/profile.json").read_text())
        assert prof["measured"] == "after the workers' pool" and prof["quiet"] is True and "busy" not in prof
        assert prof["measured_at"] >= done and prof["rounds"] == 3 and len(prof["ms_per_token_all"]) == 3
        assert prof["ms_per_token_min"] <= prof["ms_per_token"] <= prof["ms_per_token_max"]
    eff = json.loads((out / "efficiency.json").read_text())
    assert eff["MERA (10%)"]["infer_quiet"] is True and eff["MERA (10%)"]["infer_rounds"] == 3
    md = (out / "report.md").read_text()
    e = eff["MERA (10%)"]
    assert (f"| {e['infer_ms_per_token']:.2f} ({e['infer_ms_per_token_min']:.2f}\u2013"
            f"{e['infer_ms_per_token_max']:.2f}) |") in md and "noisy" not in md
    # the curves: the same lines as one process's (the workers' single thread rounds the last bits
    # of the losses differently; the scores are identical)
    one, two = lines(tele_run[2] / "metrics.jsonl"), lines(out / "metrics.jsonl")
    assert [l for l in one if l["type"] == "eval"] == [l for l in two if l["type"] == "eval"]
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k not in ("loss", "grad_norm")} == \
            {k: v for k, v in b.items() if k not in ("loss", "grad_norm")}
        if a["type"] == "train":
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


# ------------------------------------------------------------------------------ pieces


def test_progress_board_renders_workers_and_the_overall_line():
    from rich.console import Console

    from mera.runner.progress import Board, LiveDisplay, PlainDisplay

    now = [100.0]
    board = Board({"expert image": 1.0, "expert point": 1.0, "sequential / Fine-Tuning + MERA (10%)": 2.0},
                  clock=lambda: now[0])
    events = [{"kind": "unit", "worker": 11, "unit": "expert image"},
              {"kind": "unit", "worker": 22, "unit": "expert point"},
              {"kind": "stage", "worker": 11, "what": "expert image"},
              {"kind": "step", "worker": 11, "phase": "instruct", "step": 12, "total": 36},
              {"kind": "step", "worker": 22, "phase": "align", "step": 3, "total": 8},
              {"kind": "log", "worker": 22, "msg": "[expert point] training"}]
    printed = []
    plain = PlainDisplay(board, printed.append)
    for ev in events:
        plain.event(ev)
    assert printed == ["[expert point] training"]
    assert board.worker_lines() == ["worker 1  [expert image]  expert image  instruct 12/36",
                                    "worker 2  [expert point]  align 3/8"]
    buf = StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    console.print(board.renderable())
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    rows = [l for l in text.splitlines() if l.strip()]
    assert re.search(r"worker 1\s+expert image\s+expert image\s+instruct 12/36", rows[0])
    assert re.search(r"worker 2\s+expert point\s+align 3/8", rows[1])
    assert "0/3 units done, 0:00:00 elapsed, ETA ?" in rows[2]
    now[0] += 30  # expert point ends after 30 s: 1 of 4 stages' weight done, 3 left: 90 s
    plain.unit_done("expert point")
    assert printed[-1] == "[1/3 units done, 0:00:30 elapsed, ETA 0:01:30]"
    plain.event({"kind": "step", "worker": 22, "phase": "instruct", "step": 36, "total": 36})  # late: ignored
    assert board.worker_lines()[1] == "worker 2  [expert point]  done"
    # the live display draws the same on a terminal and prints log lines above it
    buf = StringIO()
    live = LiveDisplay(board, printed.append, console=Console(file=buf, force_terminal=True, width=120))
    with live:
        live.event({"kind": "step", "worker": 11, "phase": "instruct", "step": 13, "total": 36})
        live.live.refresh()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "instruct 13/36" in text and "1/3 units done, 0:00:30 elapsed, ETA 0:01:30" in text


def test_report_to_names_are_checked(monkeypatch):
    from mera.config import validate
    from mera.runner import telemetry

    base = {"model": {"branches": {"image": {"encoder": {"family": "toy_image"}}}},
            "data": {"toy": {}}, "orders": {"o": ["image"]}, "methods": [{"name": "FT", "strategies": ["finetune"]}]}
    with pytest.raises(ConfigError, match=r"report_to.*unknown tracker 'tensorbord'.*tensorboard"):
        validate({**base, "train": {"report_to": ["tensorbord"]}}, RunConfig, "x.yaml")
    assert validate({**base, "train": {"report_to": ["tensorboard", "wandb"]}}, RunConfig, "x.yaml").train.report_to == \
        ["tensorboard", "wandb"]
    monkeypatch.setattr("accelerate.tracking._available_trackers", [])
    with pytest.raises(ConfigError, match=r"train.report_to: tensorboard is not installed \(pip install \"mera\[trackers\]\"\)"):
        telemetry.check_trackers(["tensorboard"])
    telemetry.check_trackers([])  # nothing asked, nothing needed


def test_efficiency_table_shows_the_spread_and_noisy_profiles():
    from mera.eval.metrics import read_scores, run_metrics
    from mera.eval.report import render_markdown

    eff = {"Fine-Tuning": {"train_seconds": 4.0, "infer_ms_per_token": 2.824, "infer_ms_per_token_min": 1.4,
                           "infer_ms_per_token_max": 3.1, "infer_rounds": 3, "infer_quiet": False, "memory_kind": "rss"},
           "MERA (10%)": {"train_seconds": 5.0, "infer_ms_per_token": 1.476, "infer_ms_per_token_min": 1.45,
                          "infer_ms_per_token_max": 1.5, "infer_rounds": 3, "infer_quiet": True, "memory_kind": "rss"}}
    runs = run_metrics(read_scores(Path(__file__).parent / "data" / "single_seed_scores.csv"))
    md = render_markdown(runs, ["single_seed_scores.csv"], eff)
    assert "| Fine-Tuning | 4.0 | \u2013 | 2.82 (1.40\u20133.10) noisy | \u2013 | \u2013 |" in md
    assert "| MERA (10%) | 5.0 | \u2013 | 1.48 (1.45\u20131.50) | \u2013 | \u2013 |" in md
    assert "median of 3 rounds" in md and "\"noisy\": another process worked in the run directory" in md
