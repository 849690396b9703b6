from mera.continual.strategies.base import Strategy


class FineTune(Strategy):
    """Sequential fine-tuning: theta_i = theta_{i,vanilla} (the delta folded with coefficient 1)."""

    name = "finetune"

    def merge_coefficient(self, ctx):
        return 1.0
