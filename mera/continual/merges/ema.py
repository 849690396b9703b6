"""Exponential moving average of the LLM: theta_i = beta * theta_{i-1} + (1 - beta) * theta_{i,vanilla}.

Since theta_{i,vanilla} = theta_{i-1} + dW_i, this is ``theta_i = theta_{i-1} + (1 - beta) * dW_i``:
the new delta folded with ``1 - beta``, in factored form. Unlike the cumulative average (cma, 1/i),
the weight of a stage does not shrink as stages accumulate; ``beta`` = 0 is fine-tuning.
"""

from pydantic import Field

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.merges import MergeRule


class EMAParams(StrictModel):
    beta: float = Field(0.5, ge=0, lt=1, description="weight of the previous model (0: fine-tuning)")


@register("merge", "ema", EMAParams)
class EMA(MergeRule):
    def merge(self, new, history, stage):
        return [(new, 1.0 - self.params.beta)]
