"""``load_stage(assets, folder)``: the model of a finished stage, rebuilt from its checkpoint
chain exactly as the run evaluated it (export, generate and profile call it; no run loop)."""

from __future__ import annotations

from pathlib import Path

from mera.continual import checkpoint as ckpt
from mera.continual.assets import Assets
from mera.continual.strategies import layout_owner
from mera.errors import CheckpointError


def load_stage(assets: Assets, folder: str | Path):
    """The base LLM with every fold of the chain, the strategy's own LLM modules (if any: installed
    by the strategy the manifest's ``llm_modules`` names, its ``install`` hook), and every connector
    of the stage."""
    folder = Path(folder)
    model = assets.base_model()
    ckpt.apply_stage_llm(model.llm, folder)
    manifest = ckpt.read_manifest(folder)
    layout = manifest.get("llm_modules")
    if layout:
        owner = layout_owner(layout, str(folder / ckpt.MANIFEST))
        owner.install(model.llm, layout, ckpt.load_strategy_tensors(folder), route=model.batch_modalities)
    branches = assets.cfg.model.branches
    for m, state in ckpt.load_connectors(folder).items():
        if m not in branches:
            raise CheckpointError(f"{folder}: the stage has a {m!r} connector, but the config has no such branch "
                                  f"(branches: {', '.join(branches)})")
        try:
            assets.add_branch(model, m, state)
        except RuntimeError as e:  # size mismatch: a checkpoint of another model config
            last = str(e).strip().splitlines()[-1].strip()
            raise CheckpointError(
                f"{folder / manifest['connectors']}: the {m!r} connector does not fit the configured "
                f"{branches[m].connector.type} connector ({last}); a checkpoint of another model config?") from None
    return model
