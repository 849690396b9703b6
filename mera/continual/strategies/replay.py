"""Replay (r%): step B trains on D_i plus the r% replay memory of each previous modality
(captions and QA mixed, drawn once per modality: mera.continual.replay); the old connectors
receive gradients from their replayed samples."""

from pydantic import Field

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import Strategy


class ReplayParams(StrictModel):
    ratio: float = Field(0.1, gt=0, le=1, description="r: the share of each old modality's data (0.1 is 10%)")


@register("strategy", "replay", ReplayParams)
class Replay(Strategy):
    name = "replay"

    def prepare_instruct(self, ctx, step):
        samples = [s for m in ctx.seen[:-1] for s in ctx.replay(m, self.params.ratio)]
        ctx.log["replay"] = {"samples": len(samples), "ratio": self.params.ratio}
        step.data += samples
        params = [p for m in ctx.seen[:-1] for p in ctx.model.connector_parameters(m)]
        if params:
            step.groups.append(("old connectors", params))
