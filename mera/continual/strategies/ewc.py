"""Online EWC on the LLM's LoRA parameters, with the adapter continued across stages."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import Continue, StageContext, Strategy
from mera.data.pipeline import sample_fraction
from mera.train.lora import lora_parameters

PREFIX = "fisher."


class EWCParams(StrictModel):
    lam: float = Field(1.0, ge=0, description="lambda: the weight of the penalty")
    fisher_ratio: float = Field(0.01, gt=0, le=1, description="share of a stage's data the Fisher is estimated on")


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """``lam / 2 * sum_p F_p * (p - p_prev)^2`` over every parameter of ``fisher``."""
    total = 0.0
    for n, f in fisher.items():
        total = total + (f * (params[n] - anchor[n]) ** 2).sum()
    return 0.5 * lam * torch.as_tensor(total)


@register("strategy", "ewc", EWCParams, llm="continued", whole_delta=True)
class EWC(Strategy):
    """Online EWC (METHOD.md section 4).

    The LLM's trainable parameters are the LoRA pairs; the adapter is *continued* across
    stages (stage i starts from stage i-1's A and B, taken back out of the weights), so the
    penalty ``lambda/2 * sum F * (p - p_{i-1})^2`` anchors the same parameters every stage.

    Fisher estimator: the diagonal empirical Fisher from **per-sample** gradients: for each
    sample n of a ``fisher_ratio`` (1%) share of the stage's training data (captions and QA),
    the gradient g_n of its next-token loss (mean over its answer tokens) w.r.t. the LoRA
    parameters; ``F_j = mean_n g_n^2``. It is estimated at the end of stage j's step B and
    accumulated online: ``F = F_1 + ... + F_j`` (saved in the stage's strategy.safetensors).
    The first stage is an expert trained without EWC: its F_1 is estimated at the start of
    stage 2, with the expert's adapter.
    """

    name = "ewc"

    def __init__(self, params: EWCParams | None = None):
        super().__init__(params or EWCParams())
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.lora: dict[str, torch.Tensor] = {}

    def adapter(self, ctx: StageContext):
        prev = ctx.history.last_trained()  # the adapter the previous stage trained, with its coefficient
        return Continue(*prev) if prev is not None else None

    def estimate_fisher(self, ctx: StageContext, modality: str) -> dict[str, torch.Tensor]:
        model = ctx.model
        rng = np.random.default_rng([ctx.seed, 11, len(modality)])
        samples = sample_fraction(ctx.data(modality), self.params.fisher_ratio, rng)
        params = lora_parameters(model.llm)
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        for s in samples:
            model.zero_grad(set_to_none=True)
            model(ctx.batch([s])).loss.backward()
            for n, p in params.items():
                fisher[n] += p.grad.detach().float() ** 2
        for n in fisher:
            fisher[n] /= max(1, len(samples))
        model.zero_grad(set_to_none=True)
        for p in params.values():
            p.requires_grad_(False)
        ctx.log.setdefault("ewc", {})[f"fisher_samples_{modality}"] = len(samples)
        return fisher

    def prepare_instruct(self, ctx: StageContext, step) -> None:
        self.lora = lora_parameters(ctx.model.llm)
        saved = ctx.history.state()
        self.fisher = {k[len(PREFIX):]: v for k, v in saved.items() if k.startswith(PREFIX)}
        if not self.fisher:  # the previous stage was an expert (stage 1): estimate F_1 now
            self.fisher = self.estimate_fisher(ctx, ctx.seen[-2])
        missing = set(self.lora) - set(self.fisher)
        if missing:
            raise ValueError(f"EWC: no Fisher values for {sorted(missing)[:3]}...")
        self.anchor = {n: p.detach().clone() for n, p in self.lora.items()}
        step.losses.append(lambda: ewc_penalty(self.lora, self.anchor, self.fisher, self.params.lam))

    def after_instruct(self, ctx: StageContext):
        new = self.estimate_fisher(ctx, ctx.modality)
        ctx.tensors.update({PREFIX + n: self.fisher[n] + new[n] for n in new})
        ctx.log.setdefault("ewc", {})["penalty_last"] = float(
            ewc_penalty(self.lora, self.anchor, self.fisher, self.params.lam))
