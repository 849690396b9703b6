"""The multimodal LLM: one shared HF causal LM + one branch (frozen encoder, connector) per modality.

Placeholders are not vocabulary. The collator (``mera.model.collate``) writes, for each media
item, ``num_media_tokens(modality)`` copies of a NEGATIVE sentinel id (``media_token_id``) into
``input_ids``; :meth:`MultimodalLM.embed` looks up the token embeddings of the clamped ids and
overwrites the rows at the sentinel positions with the connector outputs. The LLM's vocabulary
and embedding matrix never change.

Batch keys read here: ``input_ids`` [B, L] (with sentinels), ``attention_mask`` [B, L],
``labels`` [B, L] (forward only; -100 = ignored), and either ``media: {modality: [n_m, ...]}``
(preprocessed inputs of the encoder) or ``features: {modality: [n_m, T, D]}`` (encoder outputs,
precomputed: the encoder is skipped). The n_m items of a modality are in the order in which their
sentinel runs appear in the batch (sample by sample, left to right).

Routing by modality. :meth:`MultimodalLM.embed` (so ``forward`` and ``generate_ids`` too, and
anything that embeds and then calls ``model.llm`` itself) records the batch it embeds in
``model.batch_modalities`` (a :class:`BatchModalities`): LLM submodules that choose a path by the
input's modality (PathWeave's per-modality paths, under its original protocol) read there which
modality each sample (each row of the batch) is. The record is kept until the next ``embed``, so a gradient-checkpointed layer
recomputed during the backward pass reads the same batch. Recording is one attribute assignment:
the per-sample list is only worked out (from the sentinels in ``input_ids``) when a submodule asks,
so a model without such submodules computes nothing more and its numbers are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mera import MODALITIES
from mera.errors import ConfigError

_SENTINEL_BASE = -1000


def media_token_id(modality: str) -> int:
    """The sentinel id of ``modality``: ``-1000 - index in mera.MODALITIES`` (stable across runs)."""
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
    return _SENTINEL_BASE - MODALITIES.index(modality)


def _module_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in module.parameters():
        return t.device, t.dtype
    for t in module.buffers():
        return t.device, (t.dtype if t.is_floating_point() else None)
    return None, None


class Branch(nn.Module):
    """A modality's frozen encoder and trainable connector.

    The encoder never receives gradients and stays in eval mode even under ``train()``.
    """

    def __init__(self, encoder: nn.Module, connector: nn.Module):
        super().__init__()
        for name in ("output_dim", "num_tokens"):
            if not hasattr(encoder, name):
                raise ConfigError(f"encoder {type(encoder).__name__} lacks the attribute {name!r}")
        if not hasattr(connector, "num_tokens"):
            raise ConfigError(f"connector {type(connector).__name__} lacks num_tokens(in_tokens)")
        self.encoder = encoder
        self.connector = connector
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.connector.num_tokens(int(self.encoder.num_tokens)))

    @torch.no_grad()
    def encode(self, media: torch.Tensor) -> torch.Tensor:
        self.encoder.eval()
        device, dtype = _module_device_dtype(self.encoder)
        if device is not None:
            media = media.to(device)
        if dtype is not None and media.is_floating_point():
            media = media.to(dtype)
        return self.encoder(media)

    def connect(self, features: torch.Tensor) -> torch.Tensor:
        device, dtype = _module_device_dtype(self.connector)
        if device is not None:
            features = features.to(device)
        if dtype is not None:
            features = features.to(dtype)
        return self.connector(features)


class BatchModalities:
    """The modality of each sample of the batch a :class:`MultimodalLM` last embedded.

    ``get()`` is a list with one entry per row of that batch: the modality whose media sentinels the
    row holds, or None for a row without media (a text-only sample). A row holding the sentinels of
    two modalities is an error when read (no sample of this project has two). ``get()`` is None
    before the first ``embed``. Read by LLM submodules that route by modality; a plain object (not a
    module, nothing in the state dict).
    """

    __slots__ = ("_ids", "_value")

    def __init__(self):
        self._ids: torch.Tensor | None = None
        self._value: list[str | None] | None = None

    def record(self, input_ids: torch.Tensor) -> None:
        """The batch being run is ``input_ids`` [B, L] (with sentinels); worked out lazily."""
        self._ids, self._value = input_ids, None

    def get(self) -> list[str | None] | None:
        if self._value is None and self._ids is not None:
            ids = self._ids
            present = {m: (ids == media_token_id(m)).any(dim=-1).tolist() for m in MODALITIES}
            rows: list[str | None] = []
            for i in range(ids.shape[0]):
                found = [m for m in MODALITIES if present[m][i]]
                if len(found) > 1:
                    raise ValueError(f"row {i} of the batch holds media of several modalities {found}: a sample "
                                     "has one modality, by which modality-routed LLM modules choose its path")
                rows.append(found[0] if found else None)
            self._value = rows
        return self._value


class MultimodalLM(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer, branches: dict[str, Branch] | None = None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        # which modality each sample of the batch being run is (module docstring: routing by modality)
        self.batch_modalities = BatchModalities()
        self.branches = nn.ModuleDict()
        for modality, branch in (branches or {}).items():
            self._check_modality(modality)
            self.branches[modality] = branch

    # ------------------------------------------------------------------ branches

    @staticmethod
    def _check_modality(modality: str) -> None:
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")

    @property
    def modalities(self) -> list[str]:
        return list(self.branches.keys())

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().weight.shape[1]

    def add_branch(self, modality: str, encoder: nn.Module, connector: nn.Module) -> Branch:
        self._check_modality(modality)
        if modality in self.branches:
            raise ConfigError(f"the model already has a {modality!r} branch")
        branch = Branch(encoder, connector)
        self.branches[modality] = branch
        return branch

    def branch(self, modality: str) -> Branch:
        if modality not in self.branches:
            raise ConfigError(f"the model has no {modality!r} branch (it has: {self.modalities})")
        return self.branches[modality]

    def num_media_tokens(self, modality: str) -> int:
        return self.branch(modality).num_tokens

    def media_token_id(self, modality: str) -> int:
        return media_token_id(modality)

    def connector_parameters(self, modality: str | None = None) -> list[nn.Parameter]:
        """Parameters of one connector, or of every connector when ``modality`` is None."""
        mods = self.modalities if modality is None else [modality]
        return [p for m in mods for p in self.branch(m).connector.parameters()]

    # ------------------------------------------------------------------ embedding

    @torch.no_grad()
    def encode(self, modality: str, media: torch.Tensor) -> torch.Tensor:
        """Encoder features [n, T, D] of preprocessed media [n, ...] (no grad, encoder in eval)."""
        return self.branch(modality).encode(media)

    def embed(self, batch: dict) -> torch.Tensor:
        """Input embeddings [B, L, H]: token embeddings, with the connector outputs at the sentinels.
        Records the batch in ``batch_modalities`` (routing by modality: the module's docstring)."""
        input_ids = batch["input_ids"]
        emb_layer = self.llm.get_input_embeddings()
        input_ids = input_ids.to(emb_layer.weight.device)
        self.batch_modalities.record(input_ids)
        embeds = emb_layer(input_ids.clamp(min=0))
        media = batch.get("media") or {}
        features = batch.get("features") or {}
        both = set(media) & set(features)
        if both:
            raise ValueError(f"a batch carries both media and features for {sorted(both)}")
        outputs: dict[str, torch.Tensor] = {}
        for modality, x in media.items():
            outputs[modality] = self.branch(modality).connect(self.encode(modality, x))
        for modality, x in features.items():
            outputs[modality] = self.branch(modality).connect(x)

        known = torch.zeros_like(input_ids, dtype=torch.bool)
        embeds = embeds.clone() if outputs else embeds
        for modality in MODALITIES:
            mask = input_ids == media_token_id(modality)
            known |= mask
            n_pos = int(mask.sum())
            if modality not in outputs:
                if n_pos:
                    raise ValueError(f"the batch has {n_pos} {modality!r} media positions but no media or features")
                continue
            out = outputs[modality]
            if out.shape[0] * out.shape[1] != n_pos:
                raise ValueError(
                    f"{modality!r}: {out.shape[0]} items x {out.shape[1]} tokens from the connector, "
                    f"but {n_pos} media positions in input_ids"
                )
            embeds[mask] = out.reshape(-1, out.shape[-1]).to(device=embeds.device, dtype=embeds.dtype)
        if bool(((input_ids < 0) & ~known).any()):
            bad = sorted(set(input_ids[(input_ids < 0) & ~known].tolist()))
            raise ValueError(f"input_ids hold negative ids that are no modality's sentinel: {bad[:5]}")
        return embeds

    # ------------------------------------------------------------------ LM

    def forward(self, batch: dict) -> CausalLMOutputWithPast:
        """Logits, and (when the batch has ``labels``) the mean next-token cross-entropy over the
        labelled positions (answer tokens + eos), computed in float32."""
        embeds = self.embed(batch)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        loss = None
        labels = batch.get("labels")
        if labels is not None:
            labels = labels.to(logits.device)
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:]
            n = (shift_labels != -100).sum()
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            ) / n.clamp(min=1)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.llm, "generation_config", None)
        extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        if isinstance(extra, int):
            extra = [extra]
        for i in extra or []:
            if int(i) not in ids:
                ids.append(int(i))
        return ids

    @torch.no_grad()
    def generate_ids(self, batch: dict, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy decoding with the KV cache for a LEFT-padded batch (``MultimodalCollator(train=False)``):
        the new token ids of each sample, cut before the first eos."""
        was_training = self.training
        self.eval()
        try:
            embeds = self.embed(batch)
            attention_mask = batch.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            attention_mask = attention_mask.to(embeds.device)
            if bool((attention_mask[:, -1] == 0).any()):
                raise ValueError("generate needs a left-padded batch (use MultimodalCollator(train=False))")
            eos = self._eos_ids()
            pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = eos[0] if eos else 0
            seqs = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=eos or None,
            )
        finally:
            self.train(was_training)
        # with inputs_embeds only, a decoder-only generate returns the new tokens alone
        out = []
        for row in seqs.tolist():
            for j, tok in enumerate(row):
                if tok in eos:
                    row = row[:j]
                    break
            out.append(row)
        return out

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 32) -> list[str]:
        """Greedy answers of a left-padded batch: one stripped string per sample (special tokens skipped)."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in self.generate_ids(batch, max_new_tokens)]
