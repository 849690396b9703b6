import numpy as np

from mera.continual.strategies.base import Strategy
from mera.data.pipeline import sample_fraction


class Realign(Strategy):
    """MERA's realign: train all connectors on R_i = r% of D_1..D_i (current modality included,
    captions and QA mixed), with the LLM and the encoders frozen."""

    name = "realign"

    def __init__(self, ratio: float):
        self.ratio = ratio

    def replay_set(self, ctx):
        rng = np.random.default_rng(ctx.seed)
        samples = []
        for m in ctx.seen:
            samples += sample_fraction(ctx.runner.sets[m].train, self.ratio, rng)
        return samples

    def after_stage(self, ctx):
        samples = self.replay_set(ctx)
        res = ctx.runner.realign(ctx, samples)
        ctx.log["realign"] = {"samples": len(samples), "steps": res.steps, "seconds": round(res.seconds, 2),
                              "loss_first": res.losses[0] if res.losses else None,
                              "loss_last": res.losses[-1] if res.losses else None}
