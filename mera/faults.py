"""Fault injection for the crash tests: die (SIGKILL) at the n-th time a named point is reached.

``MERA_FAULT="train_step:7"`` kills the process the 7th time ``fault_point("train_step")``
runs; several specs may be given, comma-separated. Points: ``train_step`` (after an
optimizer step and its step checkpoint), ``merge`` (half-way through folding a delta into
the LLM), ``eval`` (after a generation batch), ``write`` (any temporary file written, not yet
renamed), and the writes of one kind: ``write_stage`` (a stage checkpoint's tensors file),
``write_features`` (a file of the disk feature cache), ``write_report`` (a figure of a report),
``write_judge`` (a record of the LLM judge's cache). ``MERA_FAULT_MODE=raise`` raises
:class:`InjectedFault` instead (in-process tests); ``MERA_FAULT_MODE=enospc`` raises the OSError
of a full disk (errno ENOSPC), as the write would. Unset (the normal case), ``fault_point``
costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


class InjectedFault(RuntimeError):
    pass


def _specs() -> dict[str, int]:
    spec = os.environ.get("MERA_FAULT", "")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.rpartition(":")
        out[name] = int(n)
    return out


def fault_point(name: str) -> None:
    if "MERA_FAULT" not in os.environ:
        return
    target = _specs().get(name)
    if target is None:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == target:
        mode = os.environ.get("MERA_FAULT_MODE")
        if mode == "raise":
            raise InjectedFault(f"injected fault at {name} #{target}")
        if mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    _counts.clear()
