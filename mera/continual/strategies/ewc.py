"""Online EWC (Schwarz et al. 2018, "Progress & Compress", section 3.2) on the LLM's LoRA.

After stage j the importance of each parameter is the diagonal empirical Fisher ``F_new``, and it
is accumulated online, ``F_j = gamma * F_{j-1} + F_new``; step B of stage i adds

    lambda / 2 * sum_p F_{i-1,p} * (p - p*_{i-1})^2

to the loss, ``p*_{i-1}`` the parameters after stage i-1.

**Fisher normalisation** (the paper gives lambda = 1 but not this, so lambda alone does not pin
the method): ``F_new = mean_n g_n^2``, ``g_n`` the gradient of sample n's **sequence-level**
negative log-likelihood (the sum over its answer tokens, not their mean) with respect to the
parameters, over the r% replay memory of the modality (``fisher_ratio``, 1%: drawn once when the
modality is learned, mera.continual.replay). The first modality's expert is trained without EWC;
its F_1 is estimated at the start of stage 2 on that modality's memory with the expert's weights,
which is the Fisher it would have had at the end of its own stage.

**Adapter policy** (``adapter``):

- ``continue`` (default): one LoRA adapter is continued across stages (stage i starts from stage
  i-1's A and B, taken back out of the weights); p are its A and B, so the penalty anchors the
  same parameters at every stage, in O(LoRA) memory.
- ``fresh``: a fresh LoRA per stage, as fine-tuning does, the previous ones folded; p are then the
  effective weights of the adapted linear modules, and the penalty is on the fresh adapter's
  update, ``lambda/2 sum F_W (s B A)^2``, with ``F_W`` the weight-space Fisher (the size of those
  weights in fp32: fine on the toy, costly at the paper's scale).

``lambda`` is chosen on the validation split (``mera sweep``; README).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.continual.strategies import Continue, LLMPolicy, StageContext, Strategy
from mera.train.lora import lora_parameters

PREFIX = "fisher."  # continue: Fisher of the LoRA parameters
WPREFIX = "fisherW."  # fresh: Fisher of the adapted weights


class EWCParams(StrictModel):
    lam: float = Field(1.0, ge=0, description="lambda: the weight of the penalty")
    gamma: float = Field(1.0, gt=0, le=1, description="decay of the accumulated Fisher (online EWC's gamma)")
    fisher_ratio: float = Field(0.01, gt=0, le=1, description="share of a modality's data the Fisher is estimated on")
    adapter: Literal["continue", "fresh"] = "continue"


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """``lam / 2 * sum_p F_p * (p - p_prev)^2`` over every parameter of ``fisher``."""
    total = 0.0
    for n, f in fisher.items():
        total = total + (f * (params[n] - anchor[n]) ** 2).sum()
    return 0.5 * lam * torch.as_tensor(total)


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """Summed answer-token NLL of a batch (MultimodalLM's loss is the mean over those tokens)."""
    out = model(batch)
    n = (batch["labels"][:, 1:] != -100).sum()
    return out.loss * n


def _adapted_weights(llm) -> dict[str, torch.Tensor]:
    """The base weights of the LoRA-wrapped linear modules, by the plain LLM's module name."""
    from peft.tuners.lora import LoraLayer

    from mera.train.lora import _base_name

    return {_base_name(n): m.base_layer.weight for n, m in llm.named_modules() if isinstance(m, LoraLayer)}


def _adapter_updates(llm) -> dict[str, torch.Tensor]:
    """``s * B @ A`` of every LoRA module (differentiable), by the plain LLM's module name."""
    from peft.tuners.lora import LoraLayer

    from mera.train.lora import _base_name

    out = {}
    for n, m in llm.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            out[_base_name(n)] = (m.lora_B["default"].weight @ m.lora_A["default"].weight) * m.scaling["default"]
    return out


@register("strategy", "ewc", EWCParams, llm=LLMPolicy.CONTINUED_ADAPTER, whole_delta=True)
class EWC(Strategy):
    name = "ewc"

    def __init__(self, params: EWCParams | None = None):
        super().__init__(params or EWCParams())
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.lora: dict[str, torch.Tensor] = {}

    @property
    def fresh(self) -> bool:
        return self.params.adapter == "fresh"

    def adapter(self, ctx: StageContext):
        if self.fresh:
            return None
        prev = ctx.history.last_trained()  # the adapter the previous stage trained, with its coefficient
        return Continue(*prev) if prev is not None else None

    # only the stage after an expert reads an earlier modality (to estimate its Fisher), through the
    # expert's connector, which no realign has changed yet: reads() says so stage by stage
    reads_old_modalities = False

    def reads(self, ctx: StageContext) -> list[str]:
        """The previous modality, where the stage estimates its Fisher (after an expert); else none."""
        prefix = WPREFIX if self.fresh else PREFIX
        saved = ctx.history.state() if ctx.history is not None else {}
        return [] if any(k.startswith(prefix) for k in saved) else list(ctx.seen[-2:-1])

    # ------------------------------------------------------------------ Fisher
    def _targets(self, ctx) -> dict[str, torch.Tensor]:
        return _adapted_weights(ctx.model.llm) if self.fresh else lora_parameters(ctx.model.llm)

    def estimate_fisher(self, ctx: StageContext, modality: str) -> dict[str, torch.Tensor]:
        """Mean squared per-sample gradient of the sequence-level NLL on ``modality``'s memory."""
        model = ctx.model
        samples = ctx.replay(modality, self.params.fisher_ratio)
        params = self._targets(ctx)
        was = {n: p.requires_grad for n, p in params.items()}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        for s in samples:
            model.zero_grad(set_to_none=True)
            sequence_nll(model, ctx.batch([s])).backward()
            for n, p in params.items():
                fisher[n] += p.grad.detach().float() ** 2
        for n in fisher:
            fisher[n] /= max(1, len(samples))
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(was[n])
            p.grad = None
        ctx.log.setdefault("ewc", {})[f"fisher_samples_{modality}"] = len(samples)
        return fisher

    def penalty(self) -> torch.Tensor:
        if self.fresh:  # the fresh adapter's update is the distance from the anchor (the folded model)
            upd = _adapter_updates(self._llm)
            return 0.5 * self.params.lam * sum((self.fisher[n] * upd[n].float() ** 2).sum() for n in self.fisher)
        return ewc_penalty(self.lora, self.anchor, self.fisher, self.params.lam)

    # ------------------------------------------------------------------ hooks
    def prepare_instruct(self, ctx: StageContext, step) -> None:
        self._llm = ctx.model.llm
        self.lora = lora_parameters(ctx.model.llm)
        prefix = WPREFIX if self.fresh else PREFIX
        saved = ctx.history.state()
        self.fisher = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        if not self.fisher:  # the previous stage was an expert (stage 1): estimate F_1 now
            self.fisher = self.estimate_fisher(ctx, ctx.seen[-2])
        want = set(_adapted_weights(ctx.model.llm)) if self.fresh else set(self.lora)
        missing = want - set(self.fisher)
        if missing:
            raise ValueError(f"EWC: no Fisher values for {sorted(missing)[:3]}...")
        self.anchor = {n: p.detach().clone() for n, p in self.lora.items()}
        step.losses.append(self.penalty)

    def after_instruct(self, ctx: StageContext):
        log = ctx.log.setdefault("ewc", {})
        log["penalty_last"] = float(self.penalty())
        log["grad_share"] = self.gradient_share(ctx)
        new = self.estimate_fisher(ctx, ctx.modality)
        prefix = WPREFIX if self.fresh else PREFIX
        g = self.params.gamma
        ctx.tensors.update({prefix + n: g * self.fisher[n] + new[n] for n in new})

    def gradient_share(self, ctx: StageContext) -> float:
        """``|grad penalty| / |grad task loss|`` over the trainable LoRA parameters, on a batch of the
        stage's memory, with the weights step B ended on: how much the penalty steers the update."""
        samples = ctx.replay(ctx.modality, self.params.fisher_ratio)[:8]
        params = list(self.lora.values())
        for p in params:
            p.requires_grad_(True)
        ctx.model.eval()
        task = torch.autograd.grad(ctx.model(ctx.batch(samples)).loss, params, allow_unused=True)
        pen = torch.autograd.grad(self.penalty(), params, allow_unused=True)
        for p in params:
            p.requires_grad_(False)

        def norm(gs):
            return float(torch.sqrt(sum((g.float() ** 2).sum() for g in gs if g is not None)))

        t = norm(task)
        return round(norm(pen) / t, 6) if t > 0 else float("nan")
