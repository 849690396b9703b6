"""Fine-tuning as a merge rule: the stage's delta is folded whole, theta_i = theta_{i,vanilla}."""

from mera.config.registry import register
from mera.continual.merges import MergeRule


@register("merge", "finetune")
class FineTune(MergeRule):
    def merge(self, new, history, stage):
        return [(new, 1.0)]
