"""The ``mera`` command: run | plan | sweep | report | generate | export | import-llava | profile | data | toy.

One module per command, each with ``add_parser(subparsers)`` (its options; it sets ``func`` to its
``run``) and ``run(args) -> int``. Heavy modules (torch, transformers) are imported inside
``run`` only, so ``mera --help`` stays fast.

Every user-facing error (bad config, malformed scores or dataset file, missing media,
bad checkpoint) is printed as one line, with a non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before torch is imported anywhere: OpenMP busy-waiting slows training ~20x on a loaded
# 2-core machine; passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mera.cli import data, export, generate, import_llava, plan, profile, report, run, sweep, toy  # noqa: E402
from mera.errors import MeraError  # noqa: E402
from mera.io import write_failure  # noqa: E402

# in the order of `mera --help`
COMMANDS = (run, plan, sweep, report, generate, export, import_llava, profile, data, toy)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mera", description="Modality-incremental continual learning for multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits at


def _one_line(text: str) -> str:
    """An error as one line: a line break inside a file's name or a config key is shown escaped."""
    return "".join(repr(c)[1:-1] if c in _BREAKS else c for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may come before or after options (argparse stops positionals at options)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("run", "plan", "sweep") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no per-load "Loading weights" bars
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b.*")
    try:
        return args.func(args)
    except MeraError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. disk full or a read-only folder while writing run files
        failure = write_failure(e.filename, e)  # the disk's doing: what mera.io says, what to do included
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {_one_line(str(failure) if failure else f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a library's own error for a failed write (safetensors, sqlite3): the same line
        failure = write_failure(None, e)
        if failure is None:
            raise
        print(f"error: {_one_line(str(failure))}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "main"]
