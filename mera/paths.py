"""Where mera keeps its files: the mera home (``$MERA_HOME`` or ``~/.cache/mera``).

The bottom layer (no torch, no other mera module): anything may import it.
"""

from __future__ import annotations

import os
from pathlib import Path


def zoo_home(cfg=None) -> Path:
    """The mera home: ``cfg.home`` if given, else ``$MERA_HOME``, else ``~/.cache/mera``.

    ``cfg`` may be an object with a ``home`` attribute (a :class:`mera.zoo.build.ZooConfig`), a
    dict of its fields, a path, or None.
    """
    if cfg is None:
        home = None
    elif isinstance(cfg, dict):
        home = cfg.get("home")
    elif isinstance(cfg, (str, os.PathLike)):
        home = cfg
    else:
        home = getattr(cfg, "home", None)
    home = home or os.environ.get("MERA_HOME") or Path.home() / ".cache" / "mera"
    return Path(home).expanduser()
