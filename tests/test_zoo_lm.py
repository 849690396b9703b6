"""The toy model zoo: word-level tokenizer, tiny Llama pre-training, and the cached zoo build."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import itertools
import random
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mera.errors import MeraError
from mera.io import sha256_file
from mera.zoo.lm import IGNORE_INDEX, LMConfig, encode_pair, pretrain_lm
from mera.zoo.tokenizer import build_tokenizer

torch.set_num_threads(2)

# A miniature of the toy language, independent of mera.data.toy_world.
SIZES = ["big", "small"]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["top left", "top right", "bottom left", "bottom right"]
WORDS = SIZES + COLOURS + SHAPES + "top bottom left right describe : , . ? a at the what colour is where".split()


def tiny_pairs() -> list[tuple[str, str]]:
    out = []
    for s, c, sh, p in itertools.product(SIZES, COLOURS, SHAPES, PLACES):
        out.append((f"describe : {s} {c} {sh} , {p}", f"a {s} {c} {sh} at the {p}"))
        out.append((f"{s} {c} {sh} , {p} . what colour is the {sh} ?", c))
        out.append((f"{s} {c} {sh} , {p} . where is the {sh} ?", f"at the {p}"))
    random.Random(0).shuffle(out)
    return out


# ~4 s on 2 threads; held-out exact match 1.0 for seeds 0, 1 and 2 on the dev machine
TINY_LM = dict(hidden_size=96, intermediate_size=384, num_layers=2, num_heads=4, steps=300, batch_size=32, lr=3e-3,
               warmup_steps=10, micro_batches=1, n_eval=40, seed=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_saves_loads_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(WORDS, tmp_path)
    t = AutoTokenizer.from_pretrained(tmp_path)
    assert [t.pad_token_id, t.unk_token_id, t.bos_token_id, t.eos_token_id] == [0, 1, 2, 3]
    assert (t.pad_token, t.bos_token, t.eos_token, t.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(t) == 7 + len(set(WORDS))
    assert t.model_max_length == 256
    # lower-casing, punctuation split off even when glued to a word
    assert t.tokenize("Where is the RED circle?") == ["where", "is", "the", "red", "circle", "?"]
    assert t.tokenize("red,blue.") == ["red", ",", "blue", "."]
    for s in ["describe : big red circle , top left", "a small blue square at the bottom right",
              "big green triangle , top right . what colour is the triangle ?"]:
        ids = t.encode(s, add_special_tokens=False)
        assert t.unk_token_id not in ids and len(ids) == len(s.split())
        assert t.decode(ids) == s
    # unknown words become <unk>, they are not split into pieces
    assert t.encode("red zebra", add_special_tokens=False) == [t.convert_tokens_to_ids("red"), t.unk_token_id]
    # padding side is settable and honoured
    t.padding_side = "left"
    batch = t(["red", "big red circle"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1]


def test_chat_template_keeps_content_verbatim(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(WORDS, tmp_path)
    t = AutoTokenizer.from_pretrained(tmp_path)
    user = [{"role": "user", "content": "<image> what colour is the circle ?"}]
    assert t.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<s> <|user|> <image> what colour is the circle ? <|assistant|>")
    assert t.apply_chat_template(user, tokenize=False) == "<s> <|user|> <image> what colour is the circle ?"
    conv = [{"role": "user", "content": "where is the circle ?"}, {"role": "assistant", "content": "at the top left"},
            {"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "red"}]
    text = t.apply_chat_template(conv, tokenize=False)
    assert text == ("<s> <|user|> where is the circle ? <|assistant|> at the top left </s>"
                    " <|user|> <audio> <|assistant|> red </s>")
    ids = t.encode(text, add_special_tokens=False)
    assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id and ids.count(t.eos_token_id) == 2
    assert t.convert_ids_to_tokens(ids[:2]) == ["<s>", "<|user|>"]  # role markers are single tokens
    with pytest.raises(Exception, match="unknown role"):
        t.apply_chat_template([{"role": "robot", "content": "red"}], tokenize=False)


def test_encode_pair_masks_everything_but_the_answer(tok):
    ids, labels = encode_pair(tok, "where is the circle ?", "at the top left")
    full = tok.apply_chat_template([{"role": "user", "content": "where is the circle ?"},
                                    {"role": "assistant", "content": "at the top left"}], tokenize=False)
    assert ids == tok.encode(full, add_special_tokens=False)
    n_answer = len("at the top left".split()) + 1  # + </s>
    assert labels[-n_answer:] == ids[-n_answer:] and labels[-1] == tok.eos_token_id
    assert labels[:-n_answer] == [IGNORE_INDEX] * (len(ids) - n_answer)


# ---------------------------------------------------------------- LM pre-training


@pytest.mark.slow
def test_lm_learns_held_out_prompts_and_reloads(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = tiny_pairs()
    s = pretrain_lm(tok, pairs, tmp_path / "lm", LMConfig(**TINY_LM), progress=False)
    assert s["n_eval"] == 40 and s["n_train_pairs"] == len(pairs) - 40  # one answer per prompt here
    assert s["params"] < 400_000
    # Chance: an LM that ignores the prompt can at best repeat the most frequent held-out answer.
    # Held-out prompts are new combinations, so getting them right means composing, not recalling.
    refs = [a for p, a in pairs]
    held = [e["reference"] for e in s["eval_examples"]]
    assert len(set(held)) > 1
    best_constant = max(refs.count(a) for a in set(refs)) / len(refs)
    assert best_constant < 0.1
    assert s["eval_exact_match"] >= 0.8, s["eval_examples"]
    # what was saved is what was trained, and it loads with the Auto classes
    out = tmp_path / "lm"
    assert not list(tmp_path.glob(".lm.*"))  # no temporary folder left behind
    assert s["weights_sha256"] == sha256_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    t2 = AutoTokenizer.from_pretrained(out)
    ex = next(e for e in s["eval_examples"] if e["correct"])
    prompt = t2.apply_chat_template([{"role": "user", "content": ex["prompt"]}], tokenize=False,
                                    add_generation_prompt=True)
    x = torch.tensor([t2.encode(prompt, add_special_tokens=False)])
    y = model.generate(x, max_new_tokens=12, do_sample=False)[0, x.shape[1]:].tolist()
    assert y[-1] == t2.eos_token_id and t2.decode(y[:-1]) == ex["reference"]


def test_lm_weights_are_deterministic(tok, tmp_path):
    cfg = LMConfig(**{**TINY_LM, "steps": 6, "n_eval": 0, "micro_batches": 4})
    pairs = tiny_pairs()
    a = pretrain_lm(tok, pairs, tmp_path / "a", cfg, progress=False)
    b = pretrain_lm(tok, pairs, tmp_path / "b", cfg, progress=False)
    c = pretrain_lm(tok, pairs, tmp_path / "c", cfg.model_copy(update={"seed": 1}), progress=False)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert a["eval_exact_match"] is None and a["n_eval"] == 0
    # micro-batches only change the padding, not the gradient
    e = pretrain_lm(tok, pairs, tmp_path / "e", cfg.model_copy(update={"micro_batches": 1}), progress=False)
    wa, we = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "e" / "model.safetensors"))
    assert cfg.micro_batches == 4 and wa.keys() == we.keys()
    assert all(torch.allclose(wa[k], we[k], atol=1e-5) for k in wa)
    wc = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not all(torch.allclose(wa[k], wc[k], atol=1e-5) for k in wa)  # the check above can fail
    assert e["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)
    # saving again over an existing folder replaces it whole
    d = pretrain_lm(tok, pairs, tmp_path / "a", cfg.model_copy(update={"seed": 1}), progress=False)
    assert sha256_file(tmp_path / "a" / "model.safetensors") == c["weights_sha256"] == d["weights_sha256"]


# ---------------------------------------------------------------- the zoo cache


@pytest.fixture
def zb():
    """mera.zoo.build (it needs mera.data.toy_world for ToyWorldConfig)."""
    pytest.importorskip("mera.data.toy_world")
    from mera.zoo import build

    return build


class FakeEncoders:
    """Stands in for pretrain_toy_encoders: writes one small weights file per modality."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, out_dir, world_cfg, seed=0, progress=True):
        self.calls += 1
        out = {}
        for i, m in enumerate(("image", "audio", "point")):
            (Path(out_dir) / m).mkdir(parents=True)
            save_file({"w": torch.full((4, 8), float(seed + i))}, str(Path(out_dir) / m / "model.safetensors"))
            out[m] = {"path": str(Path(out_dir) / m), "aux_accuracy": {"colour": 0.5 + 0.1 * i},
                      "chance": {"colour": 0.2}, "seconds": 0.01}
            if self.fail and m == "audio":
                raise RuntimeError("boom: encoder training crashed")
        return out


@pytest.fixture
def zoo_env(zb, monkeypatch, tmp_path):
    """A zoo home in tmp_path, the tiny world's text, and fake encoders (no heavy training)."""
    from mera.data import toy_world

    monkeypatch.setenv("MERA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(toy_world, "vocabulary", lambda *a, **k: list(WORDS))
    monkeypatch.setattr(toy_world, "text_instructions", lambda n, seed=0, *a, **k: tiny_pairs()[:n])
    fake = types.ModuleType("mera.zoo.encoders")
    fake.pretrain_toy_encoders = FakeEncoders()
    monkeypatch.setitem(sys.modules, "mera.zoo.encoders", fake)
    monkeypatch.setattr(zb, "_cores", lambda: 1)  # the fake encoders live in this process: no second one
    cfg = zb.ZooConfig(lm=LMConfig(**{**TINY_LM, "steps": 3, "n_eval": 10}), n_text_pairs=200)
    return cfg, fake, tmp_path / "home"


def test_zoo_home_and_paths_before_build(zb, zoo_env, monkeypatch, tmp_path):
    cfg, _, home = zoo_env
    assert zb.zoo_home() == home and zb.zoo_dir(cfg) == home / "toy-zoo-v1"
    assert zb.zoo_home({"home": str(tmp_path / "x")}) == tmp_path / "x"
    assert zb.zoo_dir(cfg.model_copy(update={"home": str(tmp_path / "y")})) == tmp_path / "y" / "toy-zoo-v1"
    monkeypatch.delenv("MERA_HOME")
    assert zb.zoo_home() == Path.home() / ".cache" / "mera"
    monkeypatch.setenv("MERA_HOME", str(home))
    with pytest.raises(MeraError, match="run `mera toy build`"):
        zb.zoo_paths(cfg)


def test_build_then_cache_hit(zb, zoo_env):
    cfg, fake, home = zoo_env
    m = zb.build_zoo(cfg, progress=False)
    assert not m.from_cache and fake.pretrain_toy_encoders.calls == 1
    root = home / "toy-zoo-v1"
    assert (root / "manifest.json").is_file() and m.root == str(root)
    assert sorted(p.name for p in home.iterdir()) == [".toy-zoo-v1.lock", "toy-zoo-v1"]  # no leftovers
    # the manifest describes the files truthfully
    llm = m.parts["llm"]
    w = root / llm.path / "model.safetensors"
    assert llm.files["model.safetensors"].sha256 == hashlib.sha256(w.read_bytes()).hexdigest()
    assert llm.files["model.safetensors"].bytes == w.stat().st_size
    assert llm.params > 0 and m.parts["image"].params == 32 and m.parts["tokenizer"].params is None
    assert m.aux_accuracies["audio"] == {"colour": pytest.approx(0.6)}
    assert m.parts["audio"].metrics["chance"] == {"colour": 0.2} and "path" not in m.parts["audio"].metrics
    assert set(m.lm_accuracy_by_kind) == {"describe", "question"}
    assert m.lm_accuracy == llm.metrics["eval_exact_match"]
    assert m.parts["tokenizer"].metrics["vocab_size"] == 7 + len(set(WORDS))

    paths = zb.zoo_paths(cfg)
    assert paths["llm"] == root / "llm" and paths["tokenizer"] == root / "tokenizer"
    assert set(paths["encoders"]) == {"image", "video", "audio", "point"}
    assert paths["encoders"]["video"] == paths["encoders"]["image"] == root / "encoders" / "image"

    mtime = (root / "manifest.json").stat().st_mtime_ns
    again = zb.build_zoo(cfg, progress=False)
    assert again.from_cache and fake.pretrain_toy_encoders.calls == 1  # nothing rebuilt
    assert (root / "manifest.json").stat().st_mtime_ns == mtime
    assert again.parts["llm"].files == m.parts["llm"].files

    text = zb.format_build_summary(again)
    assert str(root) in text and "cached" in text
    for part in ("tokenizer", "llm", "image", "audio", "point", "video"):
        assert part in text
    assert "built in" in zb.format_build_summary(m)


def test_rebuild_on_force_config_change_or_damage(zb, zoo_env):
    cfg, fake, home = zoo_env
    enc = fake.pretrain_toy_encoders
    zb.build_zoo(cfg, progress=False)
    zb.build_zoo(cfg, force=True, progress=False)
    assert enc.calls == 2
    other = cfg.model_copy(update={"seed": 7})
    assert zb.config_hash(other) != zb.config_hash(cfg)
    assert zb.config_hash(cfg.model_copy(update={"home": "/elsewhere"})) == zb.config_hash(cfg)
    with pytest.raises(MeraError, match="different config.*mera toy build"):
        zb.zoo_paths(other)
    zb.build_zoo(other, progress=False)
    assert enc.calls == 3
    w = home / "toy-zoo-v1" / "encoders" / "point" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4])  # a truncated weights file
    with pytest.raises(MeraError, match="incomplete"):
        zb.zoo_paths(other)
    zb.build_zoo(other, progress=False)
    assert enc.calls == 4 and zb.zoo_paths(other)["llm"].is_dir()


def test_interrupted_build_leaves_no_zoo(zb, zoo_env):
    cfg, fake, home = zoo_env
    fake.pretrain_toy_encoders = FakeEncoders(fail=True)
    with pytest.raises(RuntimeError, match="boom"):
        zb.build_zoo(cfg, progress=False)
    assert not (home / "toy-zoo-v1").exists()
    assert not [p for p in home.iterdir() if p.name != ".toy-zoo-v1.lock"]  # temporary folder removed
    with pytest.raises(MeraError, match="run `mera toy build`"):
        zb.zoo_paths(cfg)

    # a complete zoo survives a failed forced rebuild untouched
    fake.pretrain_toy_encoders = FakeEncoders()
    good = zb.build_zoo(cfg, progress=False)
    fake.pretrain_toy_encoders = FakeEncoders(fail=True)
    with pytest.raises(RuntimeError):
        zb.build_zoo(cfg, force=True, progress=False)
    assert zb.zoo_paths(cfg)["root"] == home / "toy-zoo-v1"
    assert zb.load_manifest(cfg).parts["llm"].files == good.parts["llm"].files

    # a build killed outright leaves a temporary folder, which is ignored and then cleaned up
    dead = home / ".toy-zoo-v1.tmp-999999-deadbeef"
    dead.mkdir()
    (dead / "manifest.json").write_text("{}")
    fake.pretrain_toy_encoders = FakeEncoders()
    zb.build_zoo(cfg, force=True, progress=False)
    assert not dead.exists()


@pytest.mark.slow
def test_default_toy_lm_answers_text_only_toy_questions(tmp_path):
    """The zoo's real LM recipe (default LMConfig, the toy world's text instructions).

    Threshold 0.85 on held-out colour / shape questions: the most frequent answer covers under
    a quarter of them (6 colours, 4-5 shapes) and a model that ignores the question or picks
    the wrong object of a two-object scene stays far below; the build measured 0.90 here.
    """
    from mera.data import toy_world
    from mera.zoo.build import ZooConfig, _instruction_kind
    from mera.zoo.lm import pretrain_lm
    from mera.zoo.tokenizer import build_tokenizer

    cfg = ZooConfig()
    tok = build_tokenizer(toy_world.vocabulary(), tmp_path / "tok")
    pairs = toy_world.text_instructions(cfg.n_text_pairs, seed=cfg.seed)
    res = pretrain_lm(tok, pairs, tmp_path / "llm", cfg.lm, progress=False, kind=_instruction_kind)
    assert res["eval_by_kind"]["question"]["exact_match"] >= 0.85, res["eval_by_kind"]
