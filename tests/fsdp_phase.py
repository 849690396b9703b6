"""Run by tests/test_fsdp.py, in one process or under torchrun: two training phases of a tiny
model (``python fsdp_phase.py OUT.json [CHECKPOINT]``), then the losses and weights as JSON."""

import json
import os
import sys
from pathlib import Path

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from mera.train.loop import StepCheckpoint, train_phase


class Block(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Tiny(torch.nn.Module):
    _no_split_modules = ["Block"]  # what TRANSFORMER_BASED_WRAP wraps, as a transformers model names it

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.blocks = torch.nn.ModuleList([Block(12) for _ in range(3)])
        self.out = torch.nn.Linear(12, 3)

    def forward(self, batch):
        h = self.inp(batch["x"])
        for b in self.blocks:
            h = b(h)
        logits = self.out(h)
        return CausalLMOutputWithPast(loss=torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1]),
                                      logits=logits)


def collate(items):
    return {"x": torch.stack([d["x"] for d in items]), "labels": torch.tensor([[-100, d["y"]] for d in items])}


def main(out: str, ck: str | None) -> None:
    torch.manual_seed(0)
    model = Tiny()
    for p in model.inp.parameters():
        p.requires_grad_(False)
    init = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(6, generator=g), "y": i % 3} for i in range(22)]
    # phase 1: the blocks and the head (frozen input layer in the same FSDP units); micro-batches
    # of 2 accumulated to 4; 22 samples: an uneven last micro-batch, padded for 2 processes
    trainable = [p for b in model.blocks for p in b.parameters()] + list(model.out.parameters())
    penalty = (lambda: model.out.weight.pow(2).sum()) if os.environ.get("FSDP_PHASE_PENALTY") else None
    r1 = train_phase(model, [{"params": trainable, "lr": 1e-2}], data, collate, batch_size=4, micro_batch_size=2,
                     epochs=2, warmup_ratio=0.1, seed=3, progress=False, extra_loss=penalty,
                     checkpoint=StepCheckpoint(Path(ck), every=2) if ck else None)
    # phase 2 wraps the same model again: the input layer alone (as mera's run_phase sets it)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.inp.parameters():
        p.requires_grad_(True)
    r2 = train_phase(model, [{"params": list(model.inp.parameters()), "lr": 1e-2}], data, collate, batch_size=4,
                     micro_batch_size=4, epochs=1, warmup_ratio=0.0, seed=4, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "losses": r1.losses + r2.losses,
            "init": init,
            "weights": {k: v.flatten().tolist() for k, v in model.state_dict().items()},
            "shapes": {n: list(p.shape) for n, p in model.named_parameters()},
            "modules": sorted({type(m).__name__ for m in model.modules()}),
        }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
