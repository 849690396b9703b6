"""Imports every built-in encoder family so that it registers itself (see base.register_encoder)."""

import importlib

for _name in (
    "mera.model.encoders.toy",
    "mera.model.encoders.clip",
    "mera.model.encoders.clip_video",
    "mera.model.encoders.beats",
    "mera.model.encoders.ast",
    "mera.model.encoders.point_bert",
):
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as e:  # a family whose module is not written yet
        if e.name != _name:
            raise
