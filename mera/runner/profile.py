"""Inference profiles of the final models: measured in rounds, with their spread, and whether
anything else was working in the run directory meanwhile.

``mera profile RUN_DIR`` measures every method's final model again, in one quiet process,
interleaved over several rounds (median, min and max), and refreshes the run's efficiency table
and report. ``mera run`` uses the same machinery (:func:`measure`): with one process it profiles
each final model right after its stage, three rounds in a row; with ``--workers N`` the main
process profiles every final model after the pool of workers has ended, interleaved like ``mera
profile``, so that no measurement shares the machine with the run's training.

Whether a measurement was quiet is checked, not assumed (:func:`busy`): another process holding
a unit lock of the run directory (another worker, another ``mera run --resume``) means other
work ran meanwhile, and the profile is marked ``"quiet": false`` (the report calls it noisy).
Work outside the run directory cannot be seen that way; the 1-minute load average at the time is
recorded beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from mera.errors import ConfigError
from mera.io import write_text

ROUNDS = 3  # the rounds of a run's own profile


def profile_samples(assets, order: list[str], split: str) -> list:
    """The prompts of a profile: the first caption and QA sample of every modality of ``order``."""
    return [s for m in order for part in assets.sets[m].evaluation(split) for s in part[:1]]


def summarize(profs: list[dict]) -> dict:
    """One profile out of several rounds of ``profile_inference``: the median, min and max latency."""
    ms = [p["ms_per_token"] for p in profs]
    return {"ms_per_token": statistics.median(ms), "ms_per_token_min": min(ms), "ms_per_token_max": max(ms),
            "ms_per_token_all": [round(x, 3) for x in ms],
            "peak_mib": statistics.median(p["peak_mib"] for p in profs),
            "memory_kind": profs[0]["memory_kind"], "llm_params_m": profs[0]["llm_params_m"],
            "tokens": profs[0]["tokens"], "samples": profs[0]["samples"], "rounds": len(profs)}


def measure(models: dict[str, Callable[[], object]], tokenizer, samples, provider, new_tokens: int, rounds: int,
            log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Profile every model of ``models`` (name -> a function returning it) ``rounds`` times, round
    by round, a different model first each round; one model in memory at a time (each is got
    again every round). Returns name -> :func:`summarize`."""
    from mera.eval.profile import profile_inference

    names = list(models)
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            model = models[name]()
            runs[name].append(profile_inference(model, tokenizer, samples, provider, new_tokens=new_tokens))
            del model
        if log is not None:
            log(f"round {r + 1}/{rounds} done")
    return {name: summarize(profs) for name, profs in runs.items()}


def _held_flocks() -> dict[tuple[int, int, int], int] | None:
    """(major, minor, inode) -> pid of every flock held on this machine (/proc/locks; None where
    there is none). Read only: probing the locks themselves could make another process's
    acquire fail."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[0][-1] == ":":
            try:
                major, minor, inode = parts[5].split(":")
                out[(int(major, 16), int(minor, 16), int(inode))] = int(parts[4])
            except ValueError:
                continue
    return out


def busy(run: Path) -> list[str] | None:
    """The units of ``run`` that other processes are working on now (their lock files' records);
    None when this cannot be told (no /proc/locks)."""
    held = _held_flocks()
    if held is None:
        return None
    out = []
    for path in sorted((Path(run) / ".locks").glob("*.lock")):
        try:
            st = path.stat()
        except OSError:
            continue
        pid = held.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
        if pid is None or pid == os.getpid():
            continue
        try:
            what = json.loads(path.read_text(encoding="utf-8")).get("what", path.stem)
        except (OSError, ValueError, AttributeError):
            what = path.stem
        out.append(f"{what} (process {pid})")
    return out


def conditions(run: Path, before: list[str] | None, when: str) -> dict:
    """What a profile records of how it was taken: ``quiet`` (no other process worked in the run
    directory before or after it; None: unknown), who did, the load average, the time."""
    after = busy(run)
    others = None if before is None or after is None else sorted(set(before) | set(after))
    return {"quiet": None if others is None else not others, **({"busy": others} if others else {}),
            "measured": when, "measured_at": round(time.time(), 3),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def write_profile(folder: Path, prof: dict, log) -> None:
    write_text(folder / "profile.json", json.dumps(prof, indent=2) + "\n")
    noisy = "" if prof.get("quiet") is not False else f" (noisy: {', '.join(prof.get('busy', []))} worked meanwhile)"
    log(f"    inference: {prof['ms_per_token']:.2f} ms/token (batch 1, median of {prof['rounds']}: "
        f"{prof['ms_per_token_min']:.2f}-{prof['ms_per_token_max']:.2f}), peak {prof['peak_mib']:.0f} MiB "
        f"({prof['memory_kind']}), LLM {prof['llm_params_m']:.2f}M parameters{noisy}")


def profile_model(assets, model, modalities: list[str], folder: Path, run: Path, log) -> dict:
    """Inference cost of a final model already loaded (batch 1, the first caption and QA prompt of each
    modality of ``eval.split``), ``ROUNDS`` rounds in a row: ``folder/profile.json``, with whether
    another process worked in the run directory meanwhile."""
    cfg = assets.cfg
    before = busy(run)
    prof = measure({"model": lambda: model}, assets.tokenizer, profile_samples(assets, modalities, cfg.eval.split),
                   assets.provider, cfg.eval.max_new_tokens, ROUNDS)["model"]
    prof.update(conditions(run, before, "after the stage"))
    write_profile(folder, prof, log)
    return prof


def profile_finals(loop) -> None:
    """Profile every method's final model (first order, first seed) of ``loop``'s run that is done
    and has no profile yet (or one marked noisy), in the calling (main) process after all training:
    with ``--workers`` the workers leave their final models to this (a profile taken while other
    workers train is noisy), measured once the pool has ended, interleaved over the rounds like
    ``mera profile``. An unreadable profile is left for the efficiency table to warn about."""
    from mera.continual import checkpoint as ckpt
    from mera.continual.stages import load_stage

    cfg = loop.cfg
    seed, order_name = cfg.run_seeds[0], next(iter(cfg.orders))
    rd, order = loop.dir.for_seed(seed), cfg.orders[order_name]
    finals = {}
    for meth in cfg.methods:
        folder = rd.final_stage(order_name, meth).folder
        if not ckpt.is_done(folder):
            continue
        if (folder / "profile.json").is_file():
            try:
                old = json.loads((folder / "profile.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, RecursionError, ValueError):
                continue
            if not (isinstance(old, dict) and old.get("quiet") is False):
                continue
        finals[meth.name] = folder
    if not finals:
        return
    loop.use_seed(seed)
    a = loop.assets
    loop.log(f"profiling the final models of {len(finals)} method(s), {ROUNDS} rounds, after all training")
    before = busy(loop.out)
    profs = measure({name: (lambda f=f: load_stage(a, f)) for name, f in finals.items()}, a.tokenizer,
                    profile_samples(a, order, cfg.eval.split), a.provider, cfg.eval.max_new_tokens, ROUNDS)
    cond = conditions(loop.out, before, "after the workers' pool" if loop.workers > 1 else "after the run")
    for name, prof in profs.items():
        loop.log(f"[{name}]")
        write_profile(finals[name], {**prof, **cond}, loop.log)


def profile_run(run_dir: str | Path, rounds: int = 3, config_dir: str | Path | None = None,
                log=print) -> dict:
    from mera.config import load_config
    from mera.continual import checkpoint as ckpt
    from mera.continual.assets import load_assets
    from mera.continual.stages import load_stage
    from mera.eval.report import write_report
    from mera.runner.run_config import RunConfig
    from mera.runner.rundir import RunDir, efficiency_fields

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml)")
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    cfg = load_config(run / "config.yaml", [], RunConfig)
    # the test sets are needed for the prompts, not the judge
    assets = load_assets(cfg, Path(config_dir) if config_dir else run.parent, cache_dir=run / ".features",
                         judge=False, threads=cfg.threads)
    rd = RunDir(run, cfg)
    order_name = next(iter(cfg.orders))
    order = cfg.orders[order_name]
    finals = {m.name: rd.final_stage(order_name, m).folder for m in cfg.methods}
    finals = {k: v for k, v in finals.items() if ckpt.is_done(v)}
    if not finals:
        raise ConfigError(f"{run}: no method has finished its last stage in order {order_name!r}")
    samples = profile_samples(assets, order, cfg.eval.split)
    before = busy(run)
    out = measure({name: (lambda f=folder: load_stage(assets, f)) for name, folder in finals.items()},
                  assets.tokenizer, samples, assets.provider, cfg.eval.max_new_tokens, rounds, log)
    cond = conditions(run, before, "mera profile")
    out = {name: {**p, **cond} for name, p in out.items()}
    write_text(run / "profile.json", json.dumps(out, indent=2) + "\n")
    eff_file = run / "efficiency.json"
    eff = json.loads(eff_file.read_text()) if eff_file.is_file() else {}
    for name, p in out.items():
        eff.setdefault(name, {}).update({**efficiency_fields(p),
                                         "infer_profile": "mera profile, median of %d rounds" % rounds})
    write_text(eff_file, json.dumps(eff, indent=2) + "\n")
    if (run / "scores.csv").is_file():
        from mera.runner.gallery import gallery_or_reason

        write_report([str(run / "scores.csv")], str(run), efficiency=eff, gallery=gallery_or_reason(run, cfg, assets.sets))
    return out
