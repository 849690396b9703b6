"""``mera export STAGE_DIR --out DIR``: a finished stage written as a plain HF LLM (deltas folded)
+ connectors + a manifest of its encoders (the work: :func:`mera.interop.export.export_stage`)."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="write a finished stage as a plain HF LLM (deltas folded) + connectors "
                                             "+ a manifest of its encoders")
    p.add_argument("stage_dir", help="a finished stage folder (with DONE) of a run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config-dir", help="folder the run config's relative paths are relative to "
                                        "(default: found from the working folder or the run folder)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from mera.interop.export import export_stage

    info = export_stage(args.stage_dir, args.out, config_dir=args.config_dir, force=args.force)
    out = Path(args.out).resolve()
    print(f"exported {info['source']['stage']}\n  llm:        {out / 'llm'}\n"
          f"  modalities: {', '.join(info['modalities'])}\n  manifest:   {out / 'manifest.json'}")
    return 0
