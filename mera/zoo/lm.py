"""Pre-train the toy world's tiny Llama on text-only instructions, so it "speaks" before any modality.

The whole loop fits on one screen: chat-format each (prompt, answer) pair, mask the
loss to the answer tokens and the closing ``</s>``, AdamW with linear warm-up and a
cosine decay, then greedy generation on held-out prompts (exact match) and an atomic
``save_pretrained``. Same seed, same machine -> same weights file, byte for byte.

Threads are the caller's business (``torch.set_num_threads``); nothing global is changed here.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from mera.config.base import StrictModel
from mera.errors import ConfigError
from mera.io import atomic_dir, sha256_file, write_json

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"


class LMConfig(StrictModel):
    """Size and training recipe of the toy LLM.

    Defaults (~0.9 M parameters, 250 steps of 64 pairs, ~45 s of CPU on one core) were chosen
    on the toy world's text instructions: among widths 128-320 and depths 2-4 at the same compute,
    width 192+ mattered most (hidden 128 x 4 layers: ~57% of held-out questions right; these: ~90%).
    """

    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 6
    num_kv_heads: int | None = None  # None: = num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # None: 2 x hidden_size
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    steps: int = 250
    batch_size: int = 64
    micro_batches: int = 4  # each batch runs as this many length-sorted pieces (same gradient, less padding)
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    n_eval: int = 200  # held-out prompts (never seen in training) for the exact-match score
    eval_batch_size: int = 100
    seed: int = 0

    def llama_config(self, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"lm: hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size or 2 * self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=0.02,
        )


# --------------------------------------------------------------------------- data


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of the chat-formatted user turn, ending with the generation prompt ``<|assistant|>``."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of the assistant's answer followed by ``</s>`` (what the model must produce)."""
    return tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat-formatted pair; labels are -100 everywhere but the answer and eos.

    Equal to tokenizing the full chat template (``<s> <|user|> p <|assistant|> a </s>``), since the
    word-level tokenizer splits on the spaces the template puts between turns.
    """
    p, a = prompt_ids(tokenizer, prompt), answer_ids(tokenizer, answer)
    return p + a, [IGNORE_INDEX] * len(p) + a


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    rows = [([value] * (n - len(s)) + s) if left else (s + [value] * (n - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def split_heldout(pairs: list[tuple[str, str]], n_eval: int, seed: int):
    """Hold out ``n_eval`` distinct prompts (all their pairs) for evaluation; train on the rest.

    Returns (train_pairs, eval_items) where eval_items is a list of (prompt, [reference answers]).
    At most a fifth of the distinct prompts is held out, so a small set still trains.
    """
    by_prompt: dict[str, list[str]] = {}
    for p, a in pairs:
        by_prompt.setdefault(p, []).append(a)
    prompts = sorted(by_prompt)
    random.Random(seed).shuffle(prompts)
    n_eval = max(0, min(n_eval, len(prompts) // 5))
    held = set(prompts[:n_eval])
    train = [(p, a) for p, a in pairs if p not in held]
    evals = [(p, sorted(set(by_prompt[p]))) for p in prompts[:n_eval]]
    return train, evals


# --------------------------------------------------------------------------- train / eval


def _split(items: list, n: int) -> list[list]:
    """``items`` cut into at most ``n`` consecutive, nearly equal, non-empty parts."""
    n = max(1, min(n, len(items)))
    k, r = divmod(len(items), n)
    out, start = [], 0
    for j in range(n):
        end = start + k + (j < r)
        out.append(items[start:end])
        start = end
    return out


def _lr_lambda(cfg: LMConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 100) -> list[list[int]]:
    """Greedy answers (token ids, cut before the first ``</s>``; None where no ``</s>`` came)."""
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list = []
    for i in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[i : i + batch_size]]
        x = _pad(ids, pad, left=True)
        mask = _pad([[1] * len(s) for s in ids], 0, left=True)
        gen = model.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, x.shape[1] :].tolist()
        for g in gen:
            out.append(g[: g.index(eos)] if eos in g else None)
    return out


def evaluate_exact_match(
    model,
    tokenizer,
    eval_items: list[tuple[str, list[str]]],
    batch_size: int = 100,
    kind: Callable[[str], str] | None = None,
) -> dict:
    """Fraction of held-out prompts whose greedy answer equals one of the references, then ``</s>``.

    ``kind(prompt)`` (optional) names a group for each prompt; ``by_kind`` then has the score per group.
    """
    if not eval_items:
        return {"exact_match": None, "n": 0, "by_kind": {}, "examples": []}
    refs = [[tokenizer.encode(a, add_special_tokens=False) for a in answers] for _, answers in eval_items]
    max_new = max(len(r) for rs in refs for r in rs) + 2
    got = greedy_answers(model, tokenizer, [p for p, _ in eval_items], max_new, batch_size)
    hits = [g is not None and g in rs for g, rs in zip(got, refs)]
    groups: dict[str, list[bool]] = {}
    if kind is not None:
        for (p, _), h in zip(eval_items, hits):
            groups.setdefault(kind(p), []).append(h)
    examples = [
        {
            "prompt": p,
            "reference": answers[0],
            "output": tokenizer.decode(g) if g is not None else "(no </s>)",
            "correct": h,
        }
        for (p, answers), g, h in list(zip(eval_items, got, hits))[:8]
    ]
    return {
        "exact_match": sum(hits) / len(hits),
        "n": len(hits),
        "by_kind": {k: {"exact_match": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())},
        "examples": examples,
    }


@contextmanager
def _quiet_hf(quiet: bool):
    """Silence transformers' own progress bars (e.g. "Writing model shards") when asked."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def pretrain_lm(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    out_dir: str | os.PathLike,
    cfg: LMConfig | None = None,
    progress: bool = True,
    *,
    kind: Callable[[str], str] | None = None,
) -> dict:
    """Build a tiny ``LlamaForCausalLM`` (seeded), train it on chat-formatted ``pairs`` and save it.

    The loss covers the answer tokens and ``</s>`` only. ``cfg.n_eval`` distinct prompts are held
    out of training and scored by greedy exact match against every answer ``pairs`` gives for that
    prompt (optionally per group, ``kind(prompt) -> name``). The model is written to ``out_dir`` with
    ``save_pretrained(safe_serialization=True)`` into a temporary folder that is then renamed, along
    with ``train_summary.json``. Returns that summary (params, seconds, loss, exact match, sha256).
    """
    # Why this loop does not use mera.train.loop.train_phase: train_phase batches, shuffles and
    # schedules its own way, so switching would change the cached zoo's weights and with them every
    # toy score, which the project keeps byte-identical. Nor does this loop need what train_phase
    # carries (the multimodal collator, gradient accumulation, Accelerate, resumable step
    # checkpoints): it trains a whole small model from scratch on plain token pairs.
    cfg = cfg or LMConfig()
    if not pairs:
        raise ConfigError("pretrain_lm: no training pairs")
    t0 = time.perf_counter()
    train_pairs, eval_items = split_heldout(list(pairs), cfg.n_eval, cfg.seed)
    data = [encode_pair(tokenizer, p, a) for p, a in train_pairs]
    longest = max(len(x) for x, _ in data)
    if longest > cfg.max_position_embeddings:
        raise ConfigError(f"lm: a training sequence has {longest} tokens > max_position_embeddings")

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(cfg.llama_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    n_params = count_parameters(model)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    pad = tokenizer.pad_token_id
    losses: list[float] = []

    model.train()
    bar = tqdm(range(cfg.steps), desc="toy LM", disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        if len(order) < cfg.batch_size:  # a new epoch: reshuffle (the remainder is carried over)
            order += torch.randperm(len(data), generator=gen).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        # One random batch, run as a few micro-batches of similar lengths (less padding); the loss
        # is summed over the answer tokens of the whole batch and divided once: the same gradient.
        idx.sort(key=lambda i: len(data[i][0]))
        n_tokens = sum(sum(t != IGNORE_INDEX for t in data[i][1][1:]) for i in idx)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for part in _split(idx, cfg.micro_batches):
            x = _pad([data[i][0] for i in part], pad)
            y = _pad([data[i][1] for i in part], IGNORE_INDEX)
            mask = _pad([[1] * len(data[i][0]) for i in part], 0)
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(logits, y[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(total)
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    ev = evaluate_exact_match(model, tokenizer, eval_items, cfg.eval_batch_size, kind)
    t_eval = time.perf_counter() - t1

    summary = {
        "params": n_params,
        "vocab_size": len(tokenizer),
        "n_train_pairs": len(train_pairs),
        "n_train_tokens_max": longest,
        "steps": cfg.steps,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "eval_exact_match": ev["exact_match"],
        "n_eval": ev["n"],
        "eval_by_kind": ev["by_kind"],
        "eval_examples": ev["examples"],
        "seconds_train": round(t_train, 2),
        "seconds_eval": round(t_eval, 2),
        "config": cfg.model_dump(),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, _quiet_hf(not progress):
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))  # HF convention: the LM folder loads its own tokenizer too
        summary["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
        write_json(tmp / "train_summary.json", summary)
    summary["path"] = str(out_dir)
    return summary
