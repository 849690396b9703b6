"""MERA's merge: the cumulative moving average of the LLM (METHOD.md section 3).

    agn_i = (i-1)/i * agn_{i-1} + 1/i * agn_{i,vanilla},   agn_{i,vanilla} = agn_{i-1} + dW_i

is exactly ``agn_i = agn_{i-1} + dW_i / i``: the new delta folded with ``1/i``, in factored
form (one rank-r product per linear layer). Connectors are kept side by side: the old ones from
theta_{i-1}, the new one from theta_{i,vanilla} (step B trains only the new one).
"""

from mera.config.registry import register
from mera.continual.merges import MergeRule


def cma_coefficient(stage: int) -> float:
    """Weight of the stage-``stage`` delta in the cumulative moving average: ``1 / stage`` (stage >= 1)."""
    if stage < 1:
        raise ValueError(f"stage must be >= 1, got {stage}")
    return 1.0 / stage


@register("merge", "cma", aliases=("merge",))
class CMA(MergeRule):
    def merge(self, new, history, stage):
        return [(new, cma_coefficient(stage))]
