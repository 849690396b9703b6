"""LLM judges: prompt, reply parsing, disk cache, an OpenAI-compatible endpoint (a scripted
local HTTP server), retries and failures, and a tiny random local HF causal LM."""

from __future__ import annotations

import collections
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mera.errors import ConfigError, DataError, MeraError
from mera.eval import llm_judge
from mera.eval.judges import get_judge, judge_qa
from mera.eval.llm_judge import (
    ANSWER_JOINER,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    JudgeCache,
    OpenAIJudge,
    build_messages,
    cache_key,
    parse_reply,
)

KEY_ENV = "MERA_TEST_JUDGE_KEY"
SECRET = "sk-mera-PLANTED-9f27c4e1d0"
YES = "{'pred': 'yes', 'score': 5}"
NO = "{'pred': 'no', 'score': 1}"

# ----------------------------------------------------------------------------- prompt and parsing


def test_build_messages_joins_answers_and_fills_the_prompt():
    msgs = build_messages("What colour\nis the ball?", ["red", "crimson"], "  a  red ball ")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT
    assert "evaluating the correctness of generative outputs for question-answer pairs" in SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert "Question: What colour is the ball?\n" in user
    assert f"Correct Answer: red{ANSWER_JOINER}crimson\n" in user and ANSWER_JOINER == " / "
    assert "Predicted Answer: a red ball\n" in user
    assert "{'pred': 'yes', 'score': 4}" in user  # the example survives str.format
    assert PROMPT_VERSION


@pytest.mark.parametrize(
    "reply,pred,score",
    [
        ("{'pred': 'yes', 'score': 4}", "yes", 4.0),
        ("{'pred': 'no', 'score': 0}", "no", 0.0),
        ('{"pred": "yes", "score": 5}', "yes", 5.0),
        ("Sure! Here it is: {'Pred': 'Yes', 'Score': 3} Hope this helps.", "yes", 3.0),
        ("```python\n{'pred': 'NO', 'score': 1}\n```", "no", 1.0),
        ("{'pred': 'yes.', 'score': '4'}", "yes", 4.0),
        ("{'pred': 'yes'}", "yes", None),  # score missing: still a judgement
        ('{"pred": true, "score": 5}', "yes", 5.0),  # JSON booleans
        ("{not a dict} then {'pred': 'no', 'score': 2}", "no", 2.0),  # first *parseable* dict
        ("{'score': 5} {'pred': 'yes', 'score': 5}", "yes", 5.0),  # a dict without pred is skipped
    ],
)
def test_parse_reply(reply, pred, score):
    parsed = parse_reply(reply)
    assert parsed is not None
    assert (parsed.pred, parsed.score) == (pred, score)
    assert parsed.judgement == (1.0 if pred == "yes" else 0.0)


@pytest.mark.parametrize(
    "reply",
    ["", None, "yes", "The prediction is correct.", "{'pred': 'maybe', 'score': 3}", "{'score': 5}",
     "{'pred': 'yes', 'score': 5", "['yes', 5]"],
)
def test_parse_reply_unparseable(reply):
    assert parse_reply(reply) is None


def test_cache_key_covers_every_component():
    base = cache_key("q", ["a", "b"], "p", "openai:m", "v1")
    assert base == cache_key("q", ["a", "b"], "p", "openai:m", "v1")
    assert len(base) == 64 and int(base, 16) >= 0
    variants = [
        cache_key("q2", ["a", "b"], "p", "openai:m", "v1"),
        cache_key("q", ["a"], "p", "openai:m", "v1"),
        cache_key("q", ["b", "a"], "p", "openai:m", "v1"),
        cache_key("q", ["a b"], "p", "openai:m", "v1"),
        cache_key("q", ["a", "b"], "p2", "openai:m", "v1"),
        cache_key("q", ["a", "b"], "p", "openai:m2", "v1"),
        cache_key("q", ["a", "b"], "p", "openai:m", "v2"),
    ]
    assert base not in variants and len(set(variants)) == len(variants)
    assert cache_key("q", ["a"], "p", "m") == cache_key("q", ["a"], "p", "m", PROMPT_VERSION)


def test_cache_imports_a_first_release_jsonl_with_a_torn_last_line(tmp_path):
    legacy = tmp_path / "judgements.jsonl"
    legacy.write_text(json.dumps({"key": "k1", "judgement": 1.0, "reply": YES}) + "\n"
                      + json.dumps({"key": "k2", "judgement": None, "reply": "junk"}) + "\n"
                      + '{"key": "k3", "judgement": 1.0, "rep')  # a crash mid-write
    cache = JudgeCache(tmp_path)
    assert set(cache.load()) == {"k1", "k2"}
    assert cache.get("k2")["judgement"] is None and cache.get("k2")["reply"] == "junk"
    assert not legacy.exists() and (tmp_path / "judgements.jsonl.imported").is_file()  # imported once
    cache.put({"key": "k4", "judgement": 0.0, "reply": NO})
    cache.close()
    assert set(JudgeCache(tmp_path).load()) == {"k1", "k2", "k4"}


def test_cache_caps_stored_replies_and_names_a_file_that_is_not_a_cache(tmp_path):
    cache = JudgeCache(tmp_path)
    cache.put({"key": "big", "judgement": 1.0, "reply": "y" * 10 * llm_judge.MAX_REPLY_CHARS})
    rec = JudgeCache(tmp_path).get("big")
    assert len(rec["reply"]) == llm_judge.MAX_REPLY_CHARS and rec["reply_chars"] == 10 * llm_judge.MAX_REPLY_CHARS
    assert rec["judgement"] == 1.0 and len(cache) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / llm_judge.CACHE_FILE).write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(DataError, match="not a judge cache"):
        JudgeCache(bad).get("k")


# ----------------------------------------------------------------------------- a scripted endpoint

_FIELD = {name: re.compile(rf"^{name}: (.*)$", re.M) for name in ("Question", "Correct Answer", "Predicted Answer")}


class FakeEndpoint:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1, scripted by question prefix.

    ``rate:`` 429 twice then OK; ``5xx:`` 503 once; ``slow:`` first reply after 1.5 s;
    ``drop:`` first connection closed without a response; ``fail:`` always 500; ``auth:`` 401;
    ``nodict:`` a reply without a dict; ``stray:`` a dict wrapped in chatter and a code fence;
    ``conc:`` 0.3 s per reply; anything else: yes iff the prediction appears in the answer.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.attempts: collections.Counter = collections.Counter()  # question -> requests seen
        self.bodies: list[dict] = []
        self.auth_headers: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                q, ans, pred = (_FIELD[k].search(user).group(1) for k in _FIELD)
                with endpoint.lock:
                    endpoint.attempts[q] += 1
                    n = endpoint.attempts[q]
                    endpoint.bodies.append(body)
                    endpoint.auth_headers.append(self.headers.get("Authorization", ""))
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    self._respond(body, q, ans, pred, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

            def _respond(self, body, q, ans, pred, n):
                if q.startswith("rate:") and n <= 2:
                    return self._json(429, {"error": {"message": "Rate limit reached", "type": "requests"}})
                if q.startswith("5xx:") and n == 1:
                    return self._json(503, {"error": {"message": "overloaded"}})
                if q.startswith("fail:"):
                    return self._json(500, {"error": {"message": "boom"}})
                if q.startswith("auth:"):
                    return self._json(401, {"error": {"message": "Incorrect API key provided"}})
                if q.startswith("drop:") and n == 1:
                    self.close_connection = True
                    return  # no status line, no body: the socket just closes
                if q.startswith("slow:") and n == 1:
                    time.sleep(1.5)
                if q.startswith("conc:"):
                    time.sleep(0.3)
                if q.startswith("nodict:"):
                    content = "The predicted answer looks correct to me."
                elif q.startswith("stray:"):
                    content = "Sure! Here is my evaluation:\n```python\n{'Pred': 'Yes', 'score': 5}\n```\nThanks."
                else:
                    content = YES if pred.lower() in ans.lower() else NO
                self._json(200, {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1700000000,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                })

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.attempts.values())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    ep = FakeEndpoint()
    yield ep
    ep.close()


@pytest.fixture
def key_env(monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.setenv(KEY_ENV, SECRET)
    return KEY_ENV


def _judge(endpoint, cache_dir, **opts):
    opts = {"model": "judge-mini", "base_url": endpoint.url, "api_key_env": KEY_ENV, "max_retries": 3,
            "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 5.0, "cache_dir": cache_dir, **opts}
    return get_judge("openai", **opts)


def _assert_no_secret(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files, "expected cache files"
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p


ITEMS = [  # question, acceptable answers, prediction, expected judgement
    ("What colour is the ball?", ["red", "crimson"], "crimson", 1.0),  # the second answer matches
    ("How many dogs?", ["three"], "two", 0.0),
    ("What animal?", ["a brown dog"], "dog", 1.0),
    ("nodict: what shape?", ["square"], "square", None),
    ("stray: what sound?", ["a bark"], "meow", 1.0),  # the server says yes: parsed through the chatter
    ("What colour is the ball?", ["red", "crimson"], "crimson", 1.0),  # a duplicate of item 0
]


def test_openai_judge_scores_parses_and_caches(endpoint, key_env, tmp_path):
    qs, ans, preds, expected = (list(x) for x in zip(*ITEMS))
    judge = _judge(endpoint, tmp_path / "cache")
    assert isinstance(judge, OpenAIJudge) and judge.name == "openai"
    result = judge_qa(judge, qs, ans, preds)
    assert list(result.scores) == expected
    assert result.num_unparseable == 1 and result.num_judged == 5
    assert result.accuracy == pytest.approx(4 / 6)  # the unparseable one counts as wrong
    assert endpoint.total == 5  # the duplicate was asked once
    assert (judge.stats.requests, judge.stats.cache_hits, judge.stats.unparseable) == (5, 1, 1)
    assert judge.stats.retries == 0
    assert all(b["model"] == "judge-mini" and b["temperature"] == 0 for b in endpoint.bodies)
    assert set(endpoint.auth_headers) == {f"Bearer {SECRET}"}  # the key came from the env var
    assert judge.last_judgements[4].pred == "yes" and judge.last_judgements[4].score == 5.0
    assert "looks correct" in judge.last_judgements[3].reply  # the raw unparseable reply is kept

    records = list(JudgeCache(tmp_path / "cache").load().values())
    assert len(records) == 5
    unparseable = [r for r in records if r["judgement"] is None]
    assert len(unparseable) == 1 and "looks correct" in unparseable[0]["reply"]
    _assert_no_secret(tmp_path / "cache")

    again = _judge(endpoint, tmp_path / "cache")  # a rerun: everything from the cache
    assert again.score(qs, ans, preds) == expected
    assert endpoint.total == 5
    assert (again.stats.requests, again.stats.cache_hits, again.stats.unparseable) == (0, 6, 1)
    assert all(j.cached for j in again.last_judgements)


def test_cache_misses_on_another_model_or_prompt_version(endpoint, key_env, tmp_path, monkeypatch):
    qs, ans, preds = ["What animal?"], [["a dog"]], ["dog"]
    assert _judge(endpoint, tmp_path).score(qs, ans, preds) == [1.0]
    assert _judge(endpoint, tmp_path).score(qs, ans, preds) == [1.0]
    assert endpoint.total == 1
    other = _judge(endpoint, tmp_path, model="judge-large")
    assert other.score(qs, ans, preds) == [1.0]
    assert endpoint.total == 2 and other.stats.requests == 1 and other.stats.cache_hits == 0
    monkeypatch.setattr(llm_judge, "PROMPT_VERSION", PROMPT_VERSION + "-changed")
    bumped = _judge(endpoint, tmp_path)
    assert bumped.score(qs, ans, preds) == [1.0]
    assert endpoint.total == 3 and bumped.stats.cache_hits == 0
    assert len(JudgeCache(tmp_path).load()) == 3


def test_retries_on_429_5xx_timeout_and_dropped_connection(endpoint, key_env, tmp_path):
    qs = ["rate: what?", "5xx: what?", "slow: what?", "drop: what?", "plain: what?"]
    ans = [["red"], ["blue"], ["green"], ["black"], ["white"]]
    preds = ["red", "blue", "pink", "black", "white"]
    judge = _judge(endpoint, tmp_path, timeout=0.5, max_retries=3)
    t0 = time.monotonic()
    assert judge.score(qs, ans, preds) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert time.monotonic() - t0 < 5
    assert [endpoint.attempts[q] for q in qs] == [3, 2, 2, 2, 1]
    assert judge.stats.requests == 10 and judge.stats.retries == 5
    assert judge.stats.unparseable == 0


def test_requests_run_concurrently_within_the_bound(endpoint, key_env, tmp_path):
    qs = [f"conc: q{i}" for i in range(6)]
    judge = _judge(endpoint, tmp_path, max_concurrency=3)
    t0 = time.monotonic()
    assert judge.score(qs, [["x"]] * 6, ["x"] * 6) == [1.0] * 6
    assert 2 <= endpoint.max_in_flight <= 3
    assert time.monotonic() - t0 < 6 * 0.3  # faster than one at a time


def test_exhausted_retries_raise_and_keep_the_replies_received(endpoint, key_env, tmp_path):
    qs = ["ok: a?", "fail: b?"]
    judge = _judge(endpoint, tmp_path, max_retries=2, max_concurrency=1)
    with pytest.raises(MeraError) as exc:
        judge.score(qs, [["a"], ["b"]], ["a", "b"])
    msg = str(exc.value)
    assert endpoint.url.rstrip("/") in msg and "1 of 2 items" in msg and "HTTP 500" in msg
    assert SECRET not in msg
    assert endpoint.attempts["fail: b?"] == 3  # 1 attempt + 2 retries
    assert judge.stats.retries == 2
    assert len(JudgeCache(tmp_path).load()) == 1  # the successful reply is cached
    assert _judge(endpoint, tmp_path).score(qs[:1], [["a"]], ["a"]) == [1.0]
    assert endpoint.attempts["ok: a?"] == 1


def test_a_rejected_request_is_not_retried(endpoint, key_env, tmp_path):
    judge = _judge(endpoint, tmp_path, max_retries=4)
    with pytest.raises(MeraError, match="HTTP 401") as exc:
        judge.score(["auth: x?"], [["x"]], ["x"])
    assert endpoint.attempts["auth: x?"] == 1
    assert SECRET not in str(exc.value)


def test_an_unreachable_endpoint_is_a_clear_error_without_the_key(key_env, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = get_judge("openai", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV,
                      max_retries=2, backoff_base=0.01, timeout=1.0, cache_dir=tmp_path / "c")
    t0 = time.monotonic()
    with pytest.raises(MeraError) as exc:
        judge.score(["q1?", "q2?", "q3?"], [["a"], ["b"], ["c"]], ["a", "b", "c"])
    assert time.monotonic() - t0 < 5
    msg = str(exc.value)
    assert f"127.0.0.1:{port}" in msg and "3 of 3 items" in msg and "connection" in msg
    assert SECRET not in msg and SECRET not in repr(judge)
    assert judge.stats.requests >= 3  # it did try (first attempt + retries)
    assert len(JudgeCache(tmp_path / "c")) == 0  # nothing judged, nothing cached


def test_missing_key_variable_and_bad_options(monkeypatch, tmp_path):
    pytest.importorskip("openai")
    monkeypatch.delenv("MERA_NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="MERA_NO_SUCH_KEY_VAR"):
        get_judge("openai", api_key_env="MERA_NO_SUCH_KEY_VAR", cache_dir=tmp_path)
    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(ConfigError, match="temprature"):
        get_judge("openai", api_key_env=KEY_ENV, temprature=0)
    with pytest.raises(ConfigError, match="max_concurrency"):
        get_judge("openai", api_key_env=KEY_ENV, max_concurrency=0)
    with pytest.raises(ConfigError, match="path"):
        get_judge("local_llm")
    with pytest.raises(ConfigError, match="no config.json"):
        get_judge("local_llm", path=tmp_path)


# ----------------------------------------------------------------------------- a tiny local causal LM

# No "{" in the vocabulary: the random model can never write a dict, so its replies are unparseable.
WORDS = ("yes no pred score the a answer question is correct predicted ball red dog cat what colour "
         "how many animal shape square sound bark meow one two three four five").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """Two folders with the same tiny random Llama: one tokenizer without, one with a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    folders = {}
    for name, template in (("plain", None), ("chat", CHAT_TEMPLATE)):
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       bos_token="<s>", eos_token="</s>")
        if template:
            fast.chat_template = template
        fast.save_pretrained(folder)
        model.save_pretrained(folder)
        folders[name] = folder
    return folders


def test_local_llm_random_replies_are_unparseable_and_cached(tiny_lm, tmp_path):
    qs = ["what colour is the ball?", "how many dogs?", "what animal?"]
    ans, preds = [["red"], ["two", "2"], ["dog"]], ["red", "three", "cat"]
    judge = get_judge("local_llm", path=tiny_lm["plain"], batch_size=2, max_new_tokens=6,
                      device="cpu", cache_dir=tmp_path)
    assert judge.name == "local_llm" and not judge.has_chat_template
    assert judge.score(qs, ans, preds) == [None, None, None]
    assert (judge.stats.requests, judge.stats.unparseable, judge.stats.cache_hits) == (3, 3, 0)
    records = JudgeCache(tmp_path).load()
    assert len(records) == 3 and all(r["judgement"] is None for r in records.values())
    assert all(r["judge"] == f"local_llm:{tiny_lm['plain'].resolve()}" for r in records.values())
    assert all(isinstance(r["reply"], str) and "{" not in r["reply"] for r in records.values())
    with pytest.raises(Exception, match="could not parse any"):
        judge_qa(judge, qs, ans, preds)  # all unparseable: no accuracy (from the cache this time)
    assert judge.stats.requests == 0 and judge.stats.cache_hits == 3


def test_local_llm_prompt_and_parsing_with_a_stub_generator(tiny_lm, tmp_path, monkeypatch):
    judge = get_judge("local_llm", path=tiny_lm["chat"], batch_size=2, device="cpu", cache_dir=tmp_path)
    assert judge.has_chat_template
    item = llm_judge._Item("what animal?", ["dog", "hound"], "cat", "k")
    prompt = judge.build_prompt(item)
    assert prompt.startswith("<|system|> You are an intelligent chatbot")
    assert "<|user|> Please evaluate" in prompt and prompt.endswith("<|assistant|>")
    assert "Correct Answer: dog / hound" in prompt

    plain = get_judge("local_llm", path=tiny_lm["plain"], device="cpu", cache_dir=tmp_path)
    user = build_messages("what animal?", ["dog", "hound"], "cat")[1]["content"]
    assert plain.build_prompt(item) == SYSTEM_PROMPT + "\n\n" + user + "\n"

    batches = []

    def fake_generate(prompts):
        batches.append(len(prompts))
        out = []
        for p in prompts:
            ans = re.search(r"Correct Answer: (.*)", p).group(1)
            pred = re.search(r"Predicted Answer: (.*)", p).group(1)
            out.append("garbage" if pred == "???" else f"Here: {YES if pred in ans else NO}")
        return out

    monkeypatch.setattr(judge, "_generate", fake_generate)
    scores = judge.score(["q1", "q2", "q3"], [["red"], ["blue"], ["green"]], ["red", "pink", "???"])
    assert scores == [1.0, 0.0, None]
    assert batches == [2, 1]  # batched by batch_size
    assert judge.stats.requests == 3 and judge.stats.unparseable == 1
