"""``mera export STAGE_DIR --out DIR [--format mera|llava]``: a finished stage written as a plain HF
LLM (deltas folded) + connectors + a manifest of its encoders, or (``--format llava``) as a
transformers LlavaForConditionalGeneration folder with the other branches beside it (the work:
:func:`mera.interop.export.export_stage`)."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="write a finished stage as a plain HF LLM (deltas folded) + connectors "
                                             "+ a manifest of its encoders, or as a transformers LLaVA folder")
    p.add_argument("stage_dir", help="a finished stage folder (with DONE) of a run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", dest="fmt", choices=("mera", "llava"), default="mera",
                   help="mera (default): llm/ + connectors/ + manifest.json; llava: a LlavaForConditionalGeneration "
                        "folder (image branch: CLIP + MLP) with the other branches in mera_branches/")
    p.add_argument("--config-dir", help="folder the run config's relative paths are relative to "
                                        "(default: found from the working folder or the run folder)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (only an earlier export)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from mera.interop.export import export_stage

    fmt = getattr(args, "fmt", "mera")
    info = export_stage(args.stage_dir, args.out, config_dir=args.config_dir, force=args.force, fmt=fmt)
    out = Path(args.out).resolve()
    if fmt == "llava":
        lv = info["llava"]
        others = [m for m in info["modalities"] if m != "image"]
        print(f"exported {info['source']['stage']} as LLaVA\n"
              f"  llava:      {out} (LlavaForConditionalGeneration, {info['dtype']}; image token {lv['image_token']} "
              f"= {lv['image_token_index']}, {lv['image_seq_length']} per image)\n"
              f"  branches:   {', '.join(others) or 'none besides image'} ({out / 'mera_branches'})\n"
              f"  manifest:   {out / 'mera_branches' / 'manifest.json'}")
        return 0
    print(f"exported {info['source']['stage']}\n  llm:        {out / 'llm'}\n"
          f"  modalities: {', '.join(info['modalities'])}\n  manifest:   {out / 'manifest.json'}")
    return 0
