"""``mera profile RUN_DIR``: measure the inference cost of every method's final model again,
in one quiet process, interleaved over several rounds (median), and refresh the run's
efficiency table and report.

The profile taken during a run shares the machine with the run's other work (other worker
processes, other stages), so its latencies are noisy; this command measures all methods
under the same conditions, one model in memory at a time.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mera.errors import ConfigError
from mera.io import write_text


def profile_run(run_dir: str | Path, rounds: int = 3, config_dir: str | Path | None = None,
                log=print) -> dict:
    from mera.config import load_config
    from mera.continual import checkpoint as ckpt
    from mera.continual.assets import load_assets
    from mera.continual.run_config import RunConfig
    from mera.continual.rundir import RunDir
    from mera.continual.stages import load_stage
    from mera.eval.profile import profile_inference
    from mera.eval.report import write_report

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
    finals = {m.name: rd.stage_dir(order_name, m, len(order), order[-1]) for m in cfg.methods}
    finals = {k: v for k, v in finals.items() if ckpt.is_done(v)}
    if not finals:
        raise ConfigError(f"{run}: no method has finished its last stage in order {order_name!r}")
    samples = [s for m in order for part in assets.sets[m].evaluation(cfg.eval.split) for s in part[:1]]
    names = list(finals)
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # a different method goes first each round
            model = load_stage(assets, finals[name])
            runs[name].append(profile_inference(model, assets.tokenizer, samples, assets.provider,
                                                new_tokens=cfg.eval.max_new_tokens))
            del model
        log(f"round {r + 1}/{rounds} done")
    out = {}
    for name, profs in runs.items():
        out[name] = {"ms_per_token": statistics.median(p["ms_per_token"] for p in profs),
                     "ms_per_token_all": [round(p["ms_per_token"], 3) for p in profs],
                     "peak_mib": statistics.median(p["peak_mib"] for p in profs),
                     "memory_kind": profs[0]["memory_kind"], "llm_params_m": profs[0]["llm_params_m"],
                     "tokens": profs[0]["tokens"], "rounds": rounds}
    write_text(run / "profile.json", json.dumps(out, indent=2) + "\n")
    eff_file = run / "efficiency.json"
    eff = json.loads(eff_file.read_text()) if eff_file.is_file() else {}
    for name, p in out.items():
        eff.setdefault(name, {}).update({"infer_ms_per_token": p["ms_per_token"], "infer_peak_mib": p["peak_mib"],
                                         "llm_params_m": p["llm_params_m"], "memory_kind": p["memory_kind"],
                                         "infer_profile": "mera profile, median of %d rounds" % rounds})
    write_text(eff_file, json.dumps(eff, indent=2) + "\n")
    if (run / "scores.csv").is_file():
        from mera.continual.gallery import gallery_or_reason

        write_report([str(run / "scores.csv")], str(run), efficiency=eff, gallery=gallery_or_reason(run, cfg, assets.sets))
    return out
