"""``mera profile RUN_DIR``: every method's inference cost measured again, quietly, and the run's
efficiency table and report refreshed (the work: :func:`mera.runner.profile.profile_run`)."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure every method's inference cost again, quietly, and refresh "
                                              "the run's efficiency table and report")
    p.add_argument("run_dir", help="a run directory written by mera run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept (default 3)")
    p.add_argument("--config-dir", default=None,
                   help="folder the run config's relative paths are relative to (default: the run's parent)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mera.runner.profile import profile_run

    out = profile_run(args.run_dir, args.rounds, args.config_dir)
    width = max(len(k) for k in out)
    for name, p in out.items():
        print(f"{name:{width}s}  {p['ms_per_token']:7.2f} ms/token  LLM {p['llm_params_m']:.3f}M params  "
              f"peak {p['peak_mib']:.0f} MiB ({p['memory_kind']})")
    print(f"updated {Path(args.run_dir) / 'efficiency.json'} and the report")
    return 0
