"""Replay (r%): step B trains on D_i plus an r% sample of each previous modality's data
(captions and QA mixed); the old connectors receive gradients from their replayed samples."""

import numpy as np
from pydantic import Field

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import Strategy
from mera.data.pipeline import sample_fraction


class ReplayParams(StrictModel):
    ratio: float = Field(0.1, gt=0, le=1, description="r: the share of each old modality's data (0.1 is 10%)")


@register("strategy", "replay", ReplayParams)
class Replay(Strategy):
    name = "replay"

    def prepare_instruct(self, ctx, step):
        rng = np.random.default_rng([ctx.seed, 7])
        samples = []
        for m in ctx.seen[:-1]:
            samples += sample_fraction(ctx.data(m), self.params.ratio, rng)
        ctx.log["replay"] = {"samples": len(samples)}
        step.data += samples
        params = [p for m in ctx.seen[:-1] for p in ctx.model.connector_parameters(m)]
        if params:
            step.groups.append(("old connectors", params))
