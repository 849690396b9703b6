"""Names and differences that several runner modules need and that depend on nothing: a method's
folder name (:func:`slug`) and the keys two configs differ in (:func:`flat_diff`)."""

from __future__ import annotations

import re


def slug(name: str) -> str:
    """The folder name of a method (or a run, a job): lower-case letters, digits and dashes."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return s or "method"


def flat_diff(a, b, prefix="") -> list[str]:
    """Keys whose values differ between two nested dicts (dotted paths)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += flat_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
