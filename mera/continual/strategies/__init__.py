"""Strategies by name; a method is a list of them (see MethodConfig.strategies)."""

from mera.continual.strategies.base import Composite, StageContext, Strategy
from mera.continual.strategies.ewc import EWC
from mera.continual.strategies.finetune import FineTune
from mera.continual.strategies.merge import Merge
from mera.continual.strategies.pathweave import PathWeave
from mera.continual.strategies.realign import Realign
from mera.continual.strategies.replay import Replay


def build_strategy(names: list[str], replay_ratio: float, ewc_lambda: float = 1.0, fisher_ratio: float = 0.01,
                   realign_ratio: float | None = None, pathweave_in_rank: int = 8) -> Strategy:
    makers = {
        "finetune": lambda: FineTune(),
        "merge": lambda: Merge(),
        "realign": lambda: Realign(replay_ratio if realign_ratio is None else realign_ratio),
        "replay": lambda: Replay(replay_ratio),
        "ewc": lambda: EWC(ewc_lambda, fisher_ratio),
        "pathweave": lambda: PathWeave(pathweave_in_rank),
    }
    parts = [makers[n]() for n in names]
    return parts[0] if len(parts) == 1 else Composite(parts)


__all__ = ["Composite", "StageContext", "Strategy", "build_strategy"]
