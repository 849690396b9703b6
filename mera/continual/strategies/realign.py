"""MERA's realign: train all connectors on R_i = the r% replay memories of D_1..D_i (the current
modality's included, captions and QA mixed), with the LLM and the encoders frozen."""

from pydantic import Field

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import Strategy


class RealignParams(StrictModel):
    ratio: float = Field(0.1, gt=0, le=1, description="r: the share of each seen modality's data (0.1 is 10%)")


@register("strategy", "realign", RealignParams)
class Realign(Strategy):
    name = "realign"
    only_after_stage = True

    def replay_set(self, ctx):
        return [s for m in ctx.seen for s in ctx.replay(m, self.params.ratio)]

    def after_stage(self, ctx):
        samples = self.replay_set(ctx)
        res = ctx.train(ctx.model.connector_parameters(), samples, "realign")
        ctx.log["realign"] = {"samples": len(samples), "ratio": self.params.ratio, "steps": res.steps,
                              "seconds": round(res.seconds, 2),
                              "loss_first": res.losses[0] if res.losses else None,
                              "loss_last": res.losses[-1] if res.losses else None}
