import numpy as np

from mera.continual.strategies.base import Strategy
from mera.data.pipeline import sample_fraction


class Replay(Strategy):
    """Replay (r%): step B trains on D_i plus an r% sample of each previous modality's data
    (captions and QA mixed); the old connectors receive gradients from their replayed samples."""

    name = "replay"

    def __init__(self, ratio: float):
        self.ratio = ratio

    def instruct_extra_data(self, ctx):
        rng = np.random.default_rng([ctx.seed, 7])
        samples = []
        for m in ctx.seen[:-1]:
            samples += sample_fraction(ctx.runner.sets[m].train, self.ratio, rng)
        ctx.log["replay"] = {"samples": len(samples)}
        return samples

    def instruct_extra_params(self, ctx):
        params = [p for m in ctx.seen[:-1] for p in ctx.model.connector_parameters(m)]
        return [("old connectors", params)] if params else []
