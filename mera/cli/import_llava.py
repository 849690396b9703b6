"""``mera import-llava LLAVA_DIR --out DIR``: a transformers LLaVA checkpoint turned into an LLM, a
CLIP encoder and a pretrained image connector (the work: :func:`mera.interop.llava.import_llava`)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser("import-llava", help="turn a transformers LLaVA checkpoint into an LLM, a CLIP encoder "
                                                   "and a pretrained image connector usable by a run config")
    p.add_argument("llava_dir", help="folder of a LlavaForConditionalGeneration saved by save_pretrained "
                                     "(safetensors)")
    p.add_argument("--out", required=True, help="output folder (llm/, encoders/image/, connectors/, "
                                                "import.json, example_config.yaml)")
    p.add_argument("--tokenizer", help="tokenizer folder, when the LLaVA folder has none")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from mera.interop.llava import import_llava

    info = import_llava(args.llava_dir, args.out, tokenizer=args.tokenizer, force=args.force,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(args.out).resolve()
    s = info["sizes"]
    print(f"imported {info['source']}\n"
          f"  llm:        {out / 'llm'} ({s['llm_params'] / 1e6:.1f}M parameters, {info['dtype']['llm']})\n"
          f"  encoder:    {out / 'encoders' / 'image'} (hf_clip, {s['image_tokens']} tokens x {s['feature_dim']})\n"
          f"  connector:  {out / 'connectors' / 'image.safetensors'} (mlp, depth 2)\n"
          f"  tokenizer:  chat template {info['tokenizer']['chat_template']}\n"
          f"  config:     {out / 'example_config.yaml'}")
    for n in info["notes"]:
        print(f"  note: {n}")
    return 0
