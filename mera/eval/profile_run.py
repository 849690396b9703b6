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
    from mera.continual.runner import Runner
    from mera.eval.profile import profile_inference
    from mera.eval.report import write_report
    from mera.run_config import RunConfig

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml)")
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    cfg = load_config(run / "config.yaml", [], RunConfig)
    runner = Runner(cfg, run, config_dir=Path(config_dir) if config_dir else run.parent, resume=True,
                    progress=False, log=lambda m: None)
    runner.setup(judge=False)  # the test sets are needed for the prompts, not the judge
    order_name = next(iter(cfg.orders))
    order = cfg.orders[order_name]
    finals = {m.name: runner.stage_dir(order_name, m, len(order), order[-1]) for m in cfg.methods}
    finals = {k: v for k, v in finals.items() if ckpt.is_done(v)}
    if not finals:
        raise ConfigError(f"{run}: no method has finished its last stage in order {order_name!r}")
    samples = [s for m in order for s in (runner.sets[m].caption_test[:1] + runner.sets[m].qa_test[:1])]
    names = list(finals)
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # a different method goes first each round
            model = runner.load_stage(finals[name])
            runs[name].append(profile_inference(model, runner.tokenizer, samples, runner.provider,
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
        write_report([str(run / "scores.csv")], str(run), efficiency=eff)
    return out


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure every method's inference cost again, quietly, and refresh "
                                       "the run's efficiency table and report")
    p.add_argument("run_dir", help="a run directory written by mera run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept (default 3)")
    p.add_argument("--config-dir", default=None,
                   help="folder the run config's relative paths are relative to (default: the run's parent)")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    out = profile_run(args.run_dir, args.rounds, args.config_dir)
    width = max(len(k) for k in out)
    for name, p in out.items():
        print(f"{name:{width}s}  {p['ms_per_token']:7.2f} ms/token  LLM {p['llm_params_m']:.3f}M params  "
              f"peak {p['peak_mib']:.0f} MiB ({p['memory_kind']})")
    print(f"updated {Path(args.run_dir) / 'efficiency.json'} and the report")
    return 0
