"""The toy world's word-level tokenizer, built locally with HF ``tokenizers``.

One id per word of the toy language; punctuation is split off as its own token
("red?" -> "red", "?"), text is lower-cased. Decoding joins tokens with single
spaces, so a sentence written with spaces around its punctuation round-trips.

The chat template keeps user content verbatim: modality placeholders such as
``<image>`` are *not* vocabulary; the model code splits the formatted string on
them and splices encoder features in at the embedding level.

    <s> <|user|> {prompt} <|assistant|> {answer} </s>
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from mera.errors import ConfigError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, USER, ASSISTANT, SYSTEM)
ROLE_TOKENS = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}

# Jinja chat template (HF convention: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).
# Turns are separated by single spaces; the assistant turn ends with eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is not string %}"
    "{{ raise_exception('toy chat template: message content must be a string') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ ' <|user|> ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' <|assistant|> ' + message['content'] + ' ' + eos_token }}"
    "{% elif message['role'] == 'system' %}"
    "{{ ' <|system|> ' + message['content'] }}"
    "{% else %}"
    "{{ raise_exception('toy chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' <|assistant|>' }}{% endif %}"
)


def _vocab(words: list[str]) -> dict[str, int]:
    """Special tokens first (fixed ids 0..6), then the words in first-seen order, lower-cased, deduplicated."""
    vocab: dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ConfigError(f"tokenizer: vocabulary entry {w!r} is not a non-empty word")
        w = w.strip().lower()
        if any(c.isspace() for c in w):
            raise ConfigError(f"tokenizer: vocabulary entry {w!r} contains whitespace; give single words")
        if w not in vocab:
            vocab[w] = len(vocab)
    return vocab


def build_backend(words: list[str]) -> Tokenizer:
    """The raw ``tokenizers.Tokenizer`` (WordLevel, lowercase, whitespace + isolated punctuation)."""
    tk = Tokenizer(WordLevel(vocab=_vocab(words), unk_token=UNK))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    # no decoder: tokenizers joins the tokens with single spaces
    # special tokens are matched whole before pre-tokenisation, and never lower-cased or split
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return tk


def build_tokenizer(
    words: list[str],
    out_dir: str | os.PathLike | None = None,
    model_max_length: int = 256,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer over ``words`` and, if ``out_dir`` is given, save it there.

    Ids 0..6 are ``<pad> <unk> <s> </s> <|user|> <|assistant|> <|system|>``; then the words.
    No special tokens are added automatically when encoding (the chat template writes ``<s>``
    and ``</s>`` itself), so ``decode(encode(text)) == text`` for lower-case text whose tokens
    are separated by single spaces. ``padding_side`` can be changed later on the object.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(words),
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok
