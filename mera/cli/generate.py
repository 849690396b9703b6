"""``mera generate TARGET ...``: answer a prompt about a media file with a finished stage or an
exported model (the work: :mod:`mera.interop.generate`)."""

from __future__ import annotations

import json
import sys

from mera import MODALITIES
from mera.errors import ConfigError


def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="answer a prompt about a media file with a finished stage or an "
                                               "exported model (greedy)")
    p.add_argument("target", help="a finished stage folder, a run directory (with --stage or --expert) or a "
                                  "folder written by mera export")
    p.add_argument("--stage", help="with a run directory: ORDER/METHOD/I (METHOD: name or folder name; "
                                   "without /I: the order's last stage)")
    p.add_argument("--expert", metavar="MODALITY", help="with a run directory: that modality's expert")
    p.add_argument("--media", nargs="+", help="the media file (video: one file or its frame images)")
    p.add_argument("--modality", choices=MODALITIES, help="the media's modality")
    p.add_argument("--prompt", help="the question or instruction (the placeholder is added in front unless "
                                    "the prompt holds it)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="answer length cap (default: the run's eval.max_new_tokens)")
    p.add_argument("--stream", action="store_true", help="print the answer token by token")
    p.add_argument("--batch", metavar="FILE", help="JSON list (or JSON lines) of {media, modality, prompt} items; "
                                                   "answers are written as JSON lines")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="items generated together (default 8)")
    p.add_argument("--out", metavar="FILE", help="with --batch: write the JSON lines here (default: stdout)")
    p.add_argument("--config-dir", help="folder the run config's relative paths are relative to "
                                        "(default: found from the working folder or the run folder)")
    p.set_defaults(func=run)
    return p


def run(args, out=None) -> int:
    """``mera generate`` from parsed arguments; answers go to ``out`` (default: stdout)."""
    from mera.interop.generate import answer, answer_batch, load_target, read_batch

    out = out or sys.stdout
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch:
        if args.media or args.prompt or args.modality:
            raise ConfigError("--batch takes the media, modalities and prompts from its file; "
                              "drop --media / --modality / --prompt")
        if args.stream:
            raise ConfigError("--stream answers one prompt; it does not apply to --batch")
        items = read_batch(args.batch)
    else:
        missing = [o for o, v in (("--media", args.media), ("--modality", args.modality),
                                  ("--prompt", args.prompt)) if not v]
        if missing:
            raise ConfigError(f"generate needs {', '.join(missing)} (or --batch FILE)")
        if args.out:
            raise ConfigError("--out applies to --batch only")
    loaded = load_target(args.target, stage=args.stage, expert=args.expert, config_dir=args.config_dir)
    if args.batch:
        if args.out:
            from mera.io import write_text

            rows = answer_batch(loaded, items, args.max_new_tokens, args.batch_size)
            write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"{len(rows)} answers: {args.out}", file=sys.stderr)
        else:
            answer_batch(loaded, items, args.max_new_tokens, args.batch_size,
                         on_answer=lambda r: (out.write(json.dumps(r) + "\n"), out.flush()))
        return 0
    media = args.media if len(args.media) > 1 else args.media[0]
    if args.stream:
        def write(text):
            out.write(text)
            out.flush()

        answer(loaded, args.modality, media, args.prompt, args.max_new_tokens, stream=write)
        out.write("\n")
    else:
        out.write(answer(loaded, args.modality, media, args.prompt, args.max_new_tokens) + "\n")
    return 0
