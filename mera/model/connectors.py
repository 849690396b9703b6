"""Connectors: map a frozen encoder's features [B, T, D] into the LLM's embedding space [B, T', H].

Two families:

- :class:`MLPConnector` (LLaVA-1.5's ``mlp2x_gelu`` at depth 2, PointLLM's 3-layer projector at
  depth 3): T' = T.
- :class:`QFormerConnector` (BLIP-2 / X-InstructBLIP): learned queries cross-attend to the
  features through transformers' ``Blip2QFormerModel``, then ``Linear(hidden, H)``: T' = number
  of queries. It can start from a BERT checkpoint (:meth:`QFormerConnector.from_bert`).

Every connector has ``num_tokens(in_tokens) -> int``: how many LLM tokens it produces from
``in_tokens`` feature tokens.

Each type registers a builder ``builder(params, in_dim, out_dim)`` with
``register("connector", name, Params)`` (:mod:`mera.config.registry`), ``Params`` declaring its
parameters; :func:`build_connector` looks ``cfg.type`` up there.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, model_validator
from torch import nn

from mera.config.base import StrictModel
from mera.config.registry import lookup, register
from mera.errors import CheckpointError, ConfigError


def _check_mlp(depth: int, hidden_sizes: list[int] | None) -> None:
    if depth < 1:
        raise ValueError(f"connector depth must be >= 1, got {depth}")
    if hidden_sizes is not None:
        if len(hidden_sizes) != depth - 1:
            raise ValueError(
                f"connector hidden_sizes has {len(hidden_sizes)} entries; "
                f"depth {depth} needs depth - 1 = {depth - 1}"
            )
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"connector hidden_sizes must be positive, got {hidden_sizes}")


_QFORMER_SIZES = ("num_queries", "qformer_hidden", "qformer_layers", "qformer_heads", "qformer_intermediate",
                  "cross_attention_frequency")


def _check_qformer(p) -> None:
    for name in _QFORMER_SIZES:
        if getattr(p, name) < 1:
            raise ValueError(f"connector {name} must be >= 1, got {getattr(p, name)}")
    if p.qformer_hidden % p.qformer_heads:
        raise ValueError(
            f"qformer_hidden ({p.qformer_hidden}) must be a multiple of qformer_heads ({p.qformer_heads})"
        )


# ----------------------------------------------------------------------------------------------
# MLP


class MLPParams(StrictModel):
    depth: int = 2
    hidden_sizes: list[int] | None = None

    @model_validator(mode="after")
    def _check_mlp(self):
        _check_mlp(self.depth, self.hidden_sizes)
        return self


class MLPConnector(nn.Sequential):
    """``Linear(D, h1) -> GELU -> ... -> Linear(h_{n-1}, H)``.

    A ``Sequential``, so its state-dict keys are ``0.weight``, ``2.weight``, ... as in LLaVA's
    ``mm_projector``.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_sizes: list[int] | None = None):
        if hidden_sizes is None:
            hidden_sizes = [out_dim] * (depth - 1)
        if len(hidden_sizes) != depth - 1:
            raise ConfigError(f"MLP connector: depth {depth} needs {depth - 1} hidden sizes, got {hidden_sizes}")
        dims = [in_dim, *hidden_sizes, out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_tokens(self, in_tokens: int) -> int:
        return in_tokens


@register("connector", "mlp", MLPParams)
def build_mlp(params: MLPParams, in_dim: int, out_dim: int) -> MLPConnector:
    return MLPConnector(in_dim, out_dim, params.depth, params.hidden_sizes)


# ----------------------------------------------------------------------------------------------
# Q-Former

# BERT parameter names (after BertModel loading, no "bert." prefix) that the Q-Former does not use.
_BERT_DROPPED = re.compile(
    r"^(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.|"
    r"embeddings\.position_ids$|pooler\.)"
)
# BERT name -> Blip2QFormerModel name (transformers 5.x module layout).
_BERT_RENAMES = [
    (re.compile(r"^embeddings\.LayerNorm\.(weight|bias)$"), r"layernorm.\1"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$"),
     r"encoder.layer.\1.attention.attention.\2.\3"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.(dense|LayerNorm)\.(weight|bias)$"),
     r"encoder.layer.\1.attention.output.\2.\3"),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$"),
     r"encoder.layer.\1.intermediate_query.dense.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.(dense|LayerNorm)\.(weight|bias)$"),
     r"encoder.layer.\1.output_query.\2.\3"),
]


def bert_to_qformer_state_dict(bert_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a ``BertModel`` state dict to ``Blip2QFormerModel`` names.

    Returns (renamed dict, BERT keys that were neither renamed nor in the dropped set). The
    dropped set is the word / position / token-type embeddings, ``position_ids`` and the pooler.
    """
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in bert_state.items():
        if _BERT_DROPPED.match(key):
            continue
        for pattern, repl in _BERT_RENAMES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unused.append(key)
    return out, unused


class QFormerParams(StrictModel):
    """When ``init_from`` (a BERT checkpoint folder) is set, the BERT config's sizes win over
    qformer_hidden / qformer_layers / qformer_heads / qformer_intermediate."""

    num_queries: int = 32
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    cross_attention_frequency: int = 2
    init_from: str | None = None

    @model_validator(mode="after")
    def _check_qformer(self):
        _check_qformer(self)
        return self


class QFormerConnector(nn.Module):
    """Learned queries -> ``Blip2QFormerModel`` (cross-attending to the features) -> ``Linear(hidden, H)``.

    As in BLIP-2 / X-InstructBLIP, the encoder features pass a ``LayerNorm(D)`` first (their
    ``ln_vision`` / ``ln_audio``). The Q-Former runs without text input
    (``use_qformer_text_input=False``), so each layer has only the query feed-forward path.
    """

    def __init__(self, in_dim: int, out_dim: int, qformer_config, num_queries: int = 32):
        super().__init__()
        from transformers import Blip2QFormerModel

        qformer_config.encoder_hidden_size = in_dim
        qformer_config.use_qformer_text_input = False
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.hidden_size = qformer_config.hidden_size
        self.input_norm = nn.LayerNorm(in_dim)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, self.hidden_size).normal_(0.0, 0.02))
        self.proj = nn.Linear(self.hidden_size, out_dim)

    def num_tokens(self, in_tokens: int) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, Q, H]
        x = self.input_norm(x)
        queries = self.query_tokens.expand(x.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=x).last_hidden_state
        return self.proj(out)

    @staticmethod
    def make_config(cfg: "QFormerParams | ConnectorConfig", in_dim: int, bert_config=None):
        from transformers import Blip2QFormerConfig

        common = dict(
            encoder_hidden_size=in_dim,
            cross_attention_frequency=cfg.cross_attention_frequency,
            use_qformer_text_input=False,
        )
        if bert_config is None:
            return Blip2QFormerConfig(
                hidden_size=cfg.qformer_hidden,
                num_hidden_layers=cfg.qformer_layers,
                num_attention_heads=cfg.qformer_heads,
                intermediate_size=cfg.qformer_intermediate,
                **common,
            )
        return Blip2QFormerConfig(
            hidden_size=bert_config.hidden_size,
            num_hidden_layers=bert_config.num_hidden_layers,
            num_attention_heads=bert_config.num_attention_heads,
            intermediate_size=bert_config.intermediate_size,
            layer_norm_eps=bert_config.layer_norm_eps,
            hidden_act=bert_config.hidden_act,
            hidden_dropout_prob=bert_config.hidden_dropout_prob,
            attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
            **common,
        )

    @classmethod
    def from_bert(cls, path: str, in_dim: int, out_dim: int, num_queries: int = 32,
                  cross_attention_frequency: int = 2) -> "QFormerConnector":
        """Build a Q-Former whose self-attention and query FFN weights come from the BERT checkpoint
        folder ``path`` (loaded with ``BertModel.from_pretrained``); the cross-attention layers,
        the queries and the output projection start random (as in BLIP-2).

        Raises :class:`CheckpointError` if any Q-Former weight other than cross-attention is left
        uninitialised, or a BERT weight other than the embeddings / pooler is left unused.
        """
        from transformers import BertModel

        try:
            bert = BertModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load a BERT checkpoint for the Q-Former from {path!r}: {e}") from e
        cfg = QFormerParams(num_queries=num_queries, cross_attention_frequency=cross_attention_frequency)
        conn = cls(in_dim, out_dim, cls.make_config(cfg, in_dim, bert.config), num_queries)
        renamed, unused = bert_to_qformer_state_dict(bert.state_dict())
        if unused:
            raise CheckpointError(f"BERT weights from {path!r} with no place in the Q-Former: {unused[:8]}")
        result = conn.qformer.load_state_dict(renamed, strict=False)
        bad_missing = [k for k in result.missing_keys if ".crossattention." not in k]
        if bad_missing or result.unexpected_keys:
            raise CheckpointError(
                f"initialising the Q-Former from BERT {path!r}: missing non-cross-attention weights "
                f"{bad_missing[:8]}, unexpected weights {list(result.unexpected_keys)[:8]}"
            )
        return conn


# ----------------------------------------------------------------------------------------------


@register("connector", "qformer", QFormerParams)
def build_qformer(params: QFormerParams, in_dim: int, out_dim: int) -> QFormerConnector:
    if params.init_from:
        return QFormerConnector.from_bert(params.init_from, in_dim, out_dim, params.num_queries,
                                          params.cross_attention_frequency)
    return QFormerConnector(in_dim, out_dim, QFormerConnector.make_config(params, in_dim), params.num_queries)


# ----------------------------------------------------------------------------------------------


class ConnectorConfig(MLPParams, QFormerParams):
    """A branch's connector in a run config: ``type`` names a registered connector (``mlp`` or
    ``qformer``); the fields are the union of their parameters (:class:`MLPParams`: depth and
    hidden_sizes, the widths between the layers, default the LLM width everywhere as LLaVA-1.5;
    :class:`QFormerParams`), each read only by its own type. All of them are validated whatever
    the type."""

    type: Literal["mlp", "qformer"] = "mlp"

    def params(self) -> BaseModel | None:
        """The parameters of this type's registered connector, taken from the matching fields."""
        entry = lookup("connector", self.type)
        if entry.params is None:
            return None
        return entry.params.model_validate(self.model_dump(include=set(entry.params.model_fields)))


def build_connector(cfg: ConnectorConfig, in_dim: int, llm_dim: int) -> nn.Module:
    """A fresh connector from ``in_dim``-wide features to the LLM width ``llm_dim``: the registered
    connector ``cfg.type``, called as ``builder(params, in_dim, llm_dim)``."""
    entry = lookup("connector", cfg.type)
    return entry.obj(cfg.params(), in_dim, llm_dim)
