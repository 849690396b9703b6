"""Plug-ins registered from outside mera, on import (the ``mera.plugins`` entry point ``demo``
names this module): a merge rule that folds the stage's delta with 0.5, and a strategy that
changes nothing the stage trains and only notes in the stage's log that it ran. Neither sets a
``name``: registering gives them theirs."""

from mera.config.registry import register
from mera.continual.merges import MergeRule
from mera.continual.strategies import Strategy


@register("merge", "half_fold")
class HalfFold(MergeRule):
    def merge(self, new, history, stage):
        return [(new, 0.5)]


@register("strategy", "tag_along")
class TagAlong(Strategy):
    def after_stage(self, ctx):
        ctx.log["tag_along"] = {"name": self.name, "stage": ctx.stage}
