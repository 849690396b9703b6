"""The run directory under concurrency and damage: unit locks (a unit held by a live process is
skipped, naming the holder; the lock of a dead process is free), DONE that records each stage's
files (a damaged stage is redone on resume), and durable writes (fsync before the rename)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

from test_bad_input import (  # noqa: F401
    EXPERT,
    STAGE2,
    assets,
    cli,
    home,
    image_set,
    one_line_error,
    resumable,
    resume,
    run,
    tree,
    without,
)

from mera.continual import checkpoint as ckpt
from mera.io import UnitLock

CHAIN_LOCK = ".locks/seed0-seq-ft.lock"


def scores_of(out):
    return (out / "scores.csv").read_bytes()


def stages(t: dict) -> dict:
    """The experts' and stages' files of a tree (not the run's summaries, rewritten by every run)."""
    return {k: v for k, v in t.items() if k.startswith(("experts/", "seq/"))}


def test_a_chain_held_by_a_live_process_is_skipped_naming_it(resumable):
    """A second resume while the chain is held: the holder is named, its unfinished stage is left
    alone (not deleted, not retrained) and nothing else changes; once released, a resume finishes it."""
    cfg, out = resumable
    (out / STAGE2 / "partial.bin").write_bytes(b"what the other process is writing")
    lock = UnitLock(out / CHAIN_LOCK)
    assert lock.acquire("seq / FT (a test holding it)") is None
    before = tree(out)
    try:
        r = resume(cfg, out)
    finally:
        lock.release()
    assert r.rc == 0, r.err
    assert f"held by process {os.getpid()}" in r.out and "seq / FT (a test holding it)" in r.out
    assert stages(tree(out)) == stages(before)  # the held stage untouched, nothing else trained
    assert (out / STAGE2 / "partial.bin").is_file() and not (out / STAGE2 / "DONE").exists()
    r = resume(cfg, out)
    assert r.rc == 0, r.err
    assert ckpt.is_done(out / STAGE2) and not (out / STAGE2 / "partial.bin").exists()


def test_the_lock_of_a_dead_process_is_free(resumable, tmp_path):
    """A process that held the chain and died (SIGKILL) leaves its lock file, not its lock."""
    cfg, out = resumable
    script = textwrap.dedent(f"""
        import os, sys
        from mera.io import UnitLock
        assert UnitLock({str(out / CHAIN_LOCK)!r}).acquire("doomed") is None
        print("held", flush=True)
        os.kill(os.getpid(), 9)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -9 and "held" in p.stdout
    assert "doomed" in (out / CHAIN_LOCK).read_text()  # the file says who held it last
    r = resume(cfg, out)
    assert r.rc == 0, r.err
    assert "held by" not in r.out and ckpt.is_done(out / STAGE2)


def test_done_records_the_files_and_a_damaged_stage_is_redone(run, tmp_path):
    """DONE lists every file with size and sha256; a resume after a bit flip in a done stage's delta
    (or a truncated connectors file) warns naming the file, redoes that stage and gives the same scores."""
    cfg, out = run
    done = json.loads((out / STAGE2 / "DONE").read_text())
    names = {p.name for p in (out / STAGE2).iterdir() if p.is_file() and p.name != "DONE"} - set(ckpt.REMEASURED)
    assert set(done["files"]) == names and {"manifest.json", "scores.csv", "predictions.jsonl"} <= names
    assert ckpt.done_problem(out / STAGE2) is None
    for damage in ("flip", "truncate"):
        copy = tmp_path / damage
        shutil.copytree(out, copy)
        if damage == "flip":
            f = copy / STAGE2 / "delta.safetensors"
            data = bytearray(f.read_bytes())
            data[-3] ^= 0x40
            f.write_bytes(bytes(data))
        else:
            f = copy / STAGE2 / "connectors.safetensors"
            f.write_bytes(f.read_bytes()[:100])
        assert str(f) in ckpt.done_problem(copy / STAGE2)
        r = resume(cfg, copy)
        assert r.rc == 0, r.err
        assert "warning:" in r.out and str(f) in r.out and "done again" in r.out
        assert ckpt.done_problem(copy / STAGE2) is None
        assert scores_of(copy) == scores_of(out)
        assert without(stages(tree(copy)), STAGE2) == without(stages(tree(out)), STAGE2)  # nothing else redone


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """atomic_path syncs the file, then renames, then syncs the folder (a power cut leaves the old or
    the whole new file); a cache write may skip it."""
    import mera.io as mio

    calls = []
    real = os.replace
    monkeypatch.setattr(mio, "fsync_path", lambda p: calls.append(("fsync", str(p))))
    monkeypatch.setattr(mio.os, "replace", lambda a, b: (calls.append(("rename", str(b))), real(a, b)))
    target = tmp_path / "x.json"
    mio.write_json(target, {"a": 1})
    assert [c[0] for c in calls] == ["fsync", "rename", "fsync"]
    assert calls[1][1] == str(target) and calls[2][1] == str(tmp_path)
    assert calls[0][1] != str(target)  # the temporary file, before it has the name
    calls.clear()
    with mio.atomic_path(tmp_path / "cache.bin", durable=False) as tmp:
        tmp.write_bytes(b"1")
    assert [c[0] for c in calls] == ["rename"]


def test_force_never_deletes_its_source_or_a_foreign_folder(run, tmp_path):
    """--force replaces only what the same command wrote: an --out that contains the source (the run's
    order folder above the stage; the folder above a LLaVA checkpoint) or a folder of anything else is
    refused in one line, and nothing is deleted."""
    cfg, out = run
    before = tree(out)
    r = cli("export", out / STAGE2, "--out", out / "seq", "--force")
    assert r.rc == 2 and "contains the source" in r.err and r.err.count("\n") == 1
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    r = cli("export", out / STAGE2, "--out", foreign, "--force")
    assert r.rc == 2 and "replaces only a folder written by the same command" in r.err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    src = tmp_path / "llava-parent" / "llava"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    r = cli("import-llava", src, "--out", src.parent, "--force")
    assert r.rc == 2 and "contains the source" in r.err
    assert (src / "config.json").is_file()
    assert tree(out) == before


def test_credentials_in_a_judge_url_are_refused_and_never_shown(run, tmp_path):
    """A user name, password or key inside the judge's base_url is refused when the config loads, in
    one line that does not repeat it, before anything is written."""
    import yaml

    cfg, _ = run
    for url, what in (("https://alice:s3cr3t-pw@judge.example/v1", "user name or password"),
                      ("https://judge.example/v1?api_key=s3cr3t-pw", "api_key")):
        data = yaml.safe_load(cfg.read_text())
        data["eval"].update(judge="openai", judge_options={"base_url": url})
        bad = tmp_path / "judge.yaml"
        bad.write_text(yaml.safe_dump(data))
        r = cli("run", bad, "--out", tmp_path / "o", "--dry-run")
        assert r.rc == 2 and "credentials" in r.err and what in r.err, r.err
        assert "s3cr3t" not in r.err + r.out
        assert not (tmp_path / "o").exists()


def test_a_hub_name_is_never_fetched_whatever_the_entry_point(tmp_path):
    """mera as a library, without the CLI's offline switch: a Q-Former init_from that is a hub name,
    not a folder, is a clean error, and no connection is attempted."""
    script = textwrap.dedent("""
        import os, socket
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("TRANSFORMERS_OFFLINE", None)
        tried = []
        socket.socket.connect = lambda self, *a: tried.append(a) or (_ for _ in ()).throw(OSError("no network"))
        from mera.errors import CheckpointError
        from mera.model.connectors import QFormerConnector
        try:
            QFormerConnector.from_bert("google-bert/bert-base-uncased", 8, 16, 4)
        except CheckpointError as e:
            print("clean error:", str(e).splitlines()[0][:80])
        print("connections:", len(tried))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert "clean error:" in p.stdout and "connections: 0" in p.stdout, p.stdout + p.stderr[-2000:]


def test_a_long_wav_is_read_only_as_far_as_the_encoder_looks(tmp_path):
    """An hour-long file costs what its first seconds cost: read_audio stops after the encoder's window
    (plus a margin), and the encoder's input is the same as from the whole file."""
    import numpy as np
    import torch

    from mera.data.media import AUDIO_MARGIN_SECONDS, read_audio, read_media, write_audio
    from mera.model.encoders.toy import ToyAudioEncoder

    rate = 8000
    wav = np.sin(np.arange(600 * rate) * 0.01).astype(np.float32) * 0.5  # ten minutes
    write_audio(tmp_path / "long.wav", (wav, rate))
    enc = ToyAudioEncoder(sample_rate=16000, seconds=1.0)  # resampled: the window's edge needs real samples
    part = read_media("audio", tmp_path / "long.wav", enc.max_audio_seconds)
    assert part.waveform.size == int(np.ceil((1.0 + AUDIO_MARGIN_SECONDS) * rate))
    whole = read_audio(tmp_path / "long.wav")
    assert whole.waveform.size == 600 * rate
    assert torch.equal(enc.preprocess(part), enc.preprocess(whole))


# ------------------------------------------------------------------ hostile files a reader meets


def test_hostile_files_give_one_line(run, image_set, tmp_path):
    """Files the run wrote and reads back, or a user hands over, damaged or hostile: one line naming
    the file, exit 2, nothing written (or, for a measurement, a warning and the table without it)."""

    cfg, out = run
    # the run's own config.yaml, corrupt at resume (not UTF-8)
    copy = tmp_path / "cfg-corrupt"
    shutil.copytree(out, copy)
    (copy / "config.yaml").write_bytes(b"name: \xff\xfe\x00 broken")
    before = tree(copy)
    one_line_error(resume(cfg, copy), str(copy / "config.yaml"), "unreadable")
    assert tree(copy) == before
    # a YAML alias bomb (billion laughs) as a config
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "name: *i\n")
    one_line_error(cli("run", bomb, "--out", tmp_path / "b", "--dry-run"), str(bomb), "alias")
    # a dataset file nested deeper than any JSON parser recurses
    folder, icfg, iout = image_set
    (folder / "qa_train.json").write_text("[" * 100000 + "]" * 100000)
    one_line_error(cli("run", icfg, "--out", iout, "--quiet"), str(folder / "qa_train.json"), "nested too deeply")
    # scores files: not UTF-8, an overflowing number, a field beyond the csv module's limit
    good = (out / "scores.csv").read_text().splitlines()
    cases = {"latin1.csv": ("\n".join(good).replace("FT", "F\xe9").encode("latin-1"), "not UTF-8"),
             "overflow.csv": ("\n".join(good[:2] + [good[2].rsplit(",", 1)[0] + ",1e999"] + good[3:]).encode(),
                              "not a finite number"),
             "huge.csv": ("\n".join(good[:2] + ["x" * 200_000] + good[2:]).encode(), "field larger than field limit")}
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(cli("report", tmp_path / name, "--out", tmp_path / f"r-{name}"), str(tmp_path / name), needle)
        assert not (tmp_path / f"r-{name}").exists()
    # a measurement file (profile.json) corrupt at resume: a warning, the report without that figure
    copy = tmp_path / "prof"
    shutil.copytree(out, copy)
    prof = next(copy.rglob("profile.json"))
    prof.write_text('{"ms_per_token": ')
    r = resume(cfg, copy)  # every stage is done (profile.json is a measurement, outside DONE): only the summaries
    assert r.rc == 0 and "Traceback" not in r.err + r.out, r.err
    assert f"warning: {prof}: unreadable inference profile" in r.out
    eff = json.loads((copy / "efficiency.json").read_text())
    assert "infer_ms_per_token" not in eff["FT"] and eff["FT"]["train_seconds"] > 0


def test_two_fresh_runs_on_one_directory_the_second_is_refused(run, tmp_path):
    """The run's config is written under its lock: while another process sets the directory up, a
    fresh run is refused in one line; once a config is there, a fresh run (no --resume) is refused."""
    cfg, _ = run
    out = tmp_path / "new"
    lock = UnitLock(out / ".locks" / "config.lock")
    assert lock.acquire("writing the run's config (a test holding it)") is None
    try:
        one_line_error(cli("run", cfg, "--out", out, "--quiet"), str(out), f"process {os.getpid()}",
                       "setting up this run directory")
    finally:
        lock.release()
    assert not (out / "config.yaml").exists()
    (out / "config.yaml").write_text((run[1] / "config.yaml").read_text())
    one_line_error(cli("run", cfg, "--out", out, "--quiet"), str(out), "already there; pass --resume")
