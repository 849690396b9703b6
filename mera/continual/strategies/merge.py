from mera.continual.merging import cma_coefficient
from mera.continual.strategies.base import Strategy


class Merge(Strategy):
    """MERA's merge: cumulative moving average of the LLM, agn_i = agn_{i-1} + dW_i / i.

    Connectors are kept side by side (old ones from theta_{i-1}, the new one from
    theta_{i,vanilla}); since step B only trains the new connector, that is automatic.
    """

    name = "merge"

    def merge_coefficient(self, ctx):
        return cma_coefficient(ctx.stage)
