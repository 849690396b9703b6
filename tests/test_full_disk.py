"""A failed write of the disk's doing (no space left, over quota, an I/O error, a read-only or
size-limited filesystem) is one ``error:`` line naming the file and what to do, exit 2, wherever it
happens: a stage's checkpoint, the feature cache, a report, the judge's cache, in a --workers
process too; nothing half-written is left, and a --resume once there is room again ends with the
scores of a run that never failed.

The full disk is injected (mera.faults: ``MERA_FAULT=<point>:<n>`` with ``MERA_FAULT_MODE=enospc``
raises the OSError a full disk gives, where that write happens) into real ``mera`` processes."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mera.errors import CheckpointError, WriteError
from mera.io import atomic_path, write_text, writing

DATA = Path(__file__).parent / "data"
FULL = "No space left on device"


def mera(*args, fault: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m mera ARGS`` in a real process; ``fault``: the write point where the disk is full."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if not k.startswith("MERA_FAULT")}
    if fault:
        env.update(MERA_FAULT=fault, MERA_FAULT_MODE="enospc")
    return subprocess.run([sys.executable, "-m", "mera", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def error_line(r: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, and stderr's last non-empty line an ``error:`` line about a full disk,
    saying what to do; returns the path it names."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    found = re.fullmatch(rf"error: (/\S+): cannot write(?: the checkpoint)? \({FULL}\); .*free space on that disk, "
                         r"then run the command again \(a run with --resume keeps what it finished\)", last)
    assert found, last
    return found.group(1)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# ----------------------------------------------------------------------------------- mera.io


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG])
def test_a_failed_atomic_write_names_the_file_says_what_to_do_and_keeps_the_old_one(code, tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_text(path, "old\n")
    with pytest.raises(WriteError) as e:
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise OSError(code, os.strerror(code))
    said = str(e.value)
    assert said.startswith(f"{path}: cannot write ({os.strerror(code)}); ") and said.endswith(
        "then run the command again (a run with --resume keeps what it finished)")
    assert (e.value.path, e.value.errno) == (str(path), code)
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["metrics.json"]  # the temporary file is gone


def test_what_libraries_raise_for_a_full_disk_is_a_write_error_too(tmp_path):
    from safetensors import SafetensorError

    path = tmp_path / "x.safetensors"
    # safetensors and sqlite3 do not raise OSError: their own errors, which say it in words or a code
    for raised in (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                   RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                                "file data/0: file write failed, os error 28"),
                   _sqlite_full()):
        with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: cannot write \({FULL}\); free space"):
            with writing(path):
                raise raised
    # any other error, or an OSError that is no failed write, passes unchanged
    for raised in (ValueError("no space left in the table"), FileNotFoundError(errno.ENOENT, "gone", str(path)),
                   PermissionError(errno.EACCES, "denied", str(path))):
        with pytest.raises(type(raised)):
            with writing(path):
                raise raised


def _sqlite_full() -> sqlite3.OperationalError:
    """The error sqlite3 raises when the disk is full (SQLITE_FULL), made by sqlite itself: a database
    limited to the pages it has."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (v TEXT)")
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        db.executemany("INSERT INTO t VALUES (?)", [("x" * 4000,)] * 100)
    except sqlite3.OperationalError as e:
        assert e.sqlite_errorcode == 13, e  # SQLITE_FULL
        return e
    raise AssertionError("sqlite did not fill up")


def test_a_checkpoint_that_cannot_be_written_is_a_write_error_and_a_checkpoint_error(tmp_path, monkeypatch):
    import mera.continual.checkpoint as ckpt

    monkeypatch.setenv("MERA_FAULT", "write_stage:1")
    monkeypatch.setenv("MERA_FAULT_MODE", "enospc")
    monkeypatch.setattr("mera.faults._counts", {})
    path = tmp_path / "delta.safetensors"
    with pytest.raises(WriteError) as e:
        ckpt.save_tensors(path, {"w": torch.ones(2)})
    assert isinstance(e.value, CheckpointError)
    assert str(e.value).startswith(f"{path}: cannot write the checkpoint ({FULL}); the stage is not marked done")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_says_a_stray_full_disk_in_one_line(monkeypatch, capsys):
    """The last net, mera.cli.main: an OSError of a full disk that no writer translated, and a
    library's error for one, are the same one line and exit 2; another error keeps its traceback."""
    import mera.cli.report
    from mera.cli import main

    todo = "free space on that disk, then run the command again (a run with --resume keeps what it finished)"
    for raised, said in ((OSError(errno.ENOSPC, FULL, "/runs/x/scores.csv"), f"/runs/x/scores.csv: cannot write ({FULL})"),
                         (RuntimeError(f"safetensors: I/O error: {FULL} (os error 28)"), f"cannot write a file ({FULL})")):
        monkeypatch.setattr(mera.cli.report, "run", lambda args, raised=raised: _raise(raised))
        assert main(["report", "scores.csv"]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {said}; {todo}"]
    monkeypatch.setattr(mera.cli.report, "run", lambda args: _raise(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["report", "scores.csv"])


def _raise(e: Exception):
    raise e


# ----------------------------------------------------------------------------------- real processes


def test_a_full_disk_while_writing_a_report(tmp_path):
    out = tmp_path / "rep"
    r = mera("report", DATA / "single_seed_scores.csv", "--out", out, fault="write_report:2")
    path = Path(error_line(r))
    assert path.parent == out / "figures" and path.suffix == ".png" and not path.exists()
    assert len(list((out / "figures").iterdir())) == 1  # the figure written before the disk was full
    assert not temporaries(out) and not (out / "metrics.json").exists()
    r = mera("report", DATA / "single_seed_scores.csv", "--out", out)  # room again
    assert r.returncode == 0, r.stderr[-2000:]
    assert path.is_file() and (out / "report.md").is_file()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (2 training steps), the toy tokenizer, random toy encoders and a small toy world:
    (assets folder, MERA_HOME)."""
    from micro import build_tiny_assets

    root = build_tiny_assets(tmp_path_factory.mktemp("tiny"))
    judge = root / "judge-llm"  # the tiny Llama and its tokenizer in one folder: a local LLM judge
    shutil.copytree(root / "llm", judge)
    shutil.copytree(root / "tokenizer", judge, dirs_exist_ok=True)
    return root


def tiny_config(root: Path, path: Path, **sections) -> Path:
    from micro import tiny_config as config

    cfg = config(root, "full-disk")
    for k, v in sections.items():
        cfg[k].update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_full_disk_while_writing_the_feature_cache(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run.yaml", train={"cache_features": "disk"})
    out = tmp_path / "out"
    r = mera("run", cfg, "--out", out, "--quiet", fault="write_features:3", env={"MERA_HOME": str(tmp_path / "home")})
    path = Path(error_line(r))
    assert path.is_relative_to(out / ".features") and path.suffix == ".safetensors" and not path.exists()
    assert len(list((out / ".features").rglob("*.safetensors"))) == 2  # the two written before
    assert not temporaries(out) and not list(out.rglob("DONE"))


def test_a_full_disk_while_writing_the_judge_cache(tiny, tmp_path):
    home = tmp_path / "home"
    cfg = tiny_config(tiny, tmp_path / "run.yaml",
                      eval={"judge": "local_llm", "judge_options": {"path": str(tiny / "judge-llm"), "device": "cpu"}})
    out = tmp_path / "out"
    r = mera("run", cfg, "--out", out, "--quiet", fault="write_judge:2", env={"MERA_HOME": str(home)})
    path = Path(error_line(r))
    assert path == home / "judge-cache" / "judgements.sqlite"
    with sqlite3.connect(path) as db:  # the record before the full disk is kept, whole
        assert db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 1
    assert not list(out.rglob("DONE"))  # the expert judged by it is not done


@pytest.mark.slow
def test_a_full_disk_while_saving_stages_then_resume_gives_identical_scores(micro_assets, tmp_path, monkeypatch):
    """The micro run of the crash tests: the disk full at a stage's checkpoint, first in a --workers
    process, then in a serial run resuming that one; with room again, --resume ends with the scores
    of a run that never failed, byte for byte."""
    from micro import micro_config

    from mera.config import load_config
    from mera.runner.loop import StageLoop
    from mera.runner.run_config import RunConfig

    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    methods = [{"name": "Fine-Tuning", "strategies": ["finetune"]},
               {"name": "MERA (10%)", "strategies": ["merge", "realign"], "replay_ratio": 0.1}]
    cfg_path = micro_config(micro_assets, tmp_path, methods=methods, train={"checkpoint_every": 3})
    ref = tmp_path / "ref"
    StageLoop(load_config(cfg_path, [], RunConfig), ref, config_dir=tmp_path, progress=False, log=lambda m: None).run()

    out = tmp_path / "full"
    run = ("run", cfg_path, "--out", out, "--quiet", "--resume")
    first = Path(error_line(mera(*run, "--workers", "2", fault="write_stage:1")))  # in a worker process
    assert first.is_relative_to(out) and first.suffix == ".safetensors" and not first.exists()
    assert not list(out.rglob("DONE"))
    second = Path(error_line(mera(*run, fault="write_stage:4")))  # resumes, then the disk is full again
    assert second.is_relative_to(out) and not second.exists() and list(out.rglob("DONE"))
    # no temporary file of the failed writes is left (the other worker, stopped at once, may leave its own)
    assert not [p for p in (first, second) for _ in p.parent.glob(f".{p.name}.*.tmp")]
    r = mera(*run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "scores.csv").read_bytes() == (ref / "scores.csv").read_bytes()



@pytest.mark.slow
def test_a_full_disk_while_a_run_writes_its_report_fails_the_run(micro_assets, tmp_path, monkeypatch):
    """The report at a run's end: a full disk there is the run's error (exit 2, one line), not the
    "no report" note of a report that cannot be computed; the stages it trained stay done."""
    from micro import micro_config

    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    cfg_path = micro_config(micro_assets, tmp_path, methods=[{"name": "Fine-Tuning", "strategies": ["finetune"]}])
    out = tmp_path / "out"
    path = Path(error_line(mera("run", cfg_path, "--out", out, "--quiet", fault="write_report:1")))
    assert path.is_relative_to(out) and not path.exists()
    assert list(out.rglob("DONE")) and (out / "scores.csv").is_file()
