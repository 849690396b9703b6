"""QA judges: normalised exact match, the registry, accuracy with unparseable judgements."""

from __future__ import annotations

import pytest

from mera.errors import ConfigError, DataError, MeraError
from mera.eval.judges import (
    ExactMatchJudge,
    Judge,
    check_judge_options,
    get_judge,
    judge_qa,
    normalize_answer,
    qa_accuracy,
    register_judge,
)


@pytest.mark.parametrize(
    "text,normal",
    [
        ("Two.", "2"),
        ("the red one", "red 1"),
        ("An Apple!", "apple"),
        ("  twenty   cats ", "20 cats"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("t-shirt", "t shirt"),
        ("dog's", "dogs"),
        ("A", "a"),  # only an article: kept (a multiple-choice letter)
        ("twenty-one", "20 1"),
        ("Yes", "yes"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize(
    "prediction,answers,expected",
    [
        ("Two.", ["2"], 1.0),
        ("2", ["two"], 1.0),
        ("the red one", ["red one"], 1.0),
        ("Red one", ["the red one"], 1.0),
        ("YES", ["no", "yes"], 1.0),  # any acceptable answer
        ("t shirt", ["T-shirt"], 1.0),
        ("three", ["2"], 0.0),
        ("red", ["red one"], 0.0),
        ("blue one", ["red one"], 0.0),
        ("12", ["1 2"], 0.0),
        ("", ["red"], 0.0),
        ("the", ["a"], 0.0),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert ExactMatchJudge().score(["q?"], [answers], [prediction]) == [expected]


def test_qa_accuracy_mean():
    judge = get_judge("exact_match")
    assert isinstance(judge, ExactMatchJudge) and isinstance(judge, Judge) and judge.name == "exact_match"
    # 3 of 4 match -> 0.75
    acc = qa_accuracy(
        judge,
        ["how many?", "which?", "what colour?", "what?"],
        [["2"], ["red one"], ["blue"], ["cat"]],
        ["Two.", "the red one", "green", "a cat"],
    )
    assert acc == pytest.approx(0.75)


class HalfParsedJudge:
    """A stand-in LLM judge: its judgement of every third item cannot be parsed."""

    name = "half"

    def score(self, questions, answers, predictions):
        return [None if i % 3 == 2 else float(p == a[0]) for i, (a, p) in enumerate(zip(answers, predictions))]


def test_unparseable_judgements_count_as_wrong_and_are_counted():
    # items 0,1 judged (1.0, 0.0), item 2 unparseable (wrong), items 3,4 judged (1.0, 1.0):
    # accuracy = (1 + 0 + 0 + 1 + 1) / 5 = 0.6, unparseable = 1 (the old rule, over the parsed ones: 0.75)
    answers = [["x"], ["y"], ["z"], ["w"], ["v"]]
    predictions = ["x", "nope", "z", "w", "v"]
    result = judge_qa(HalfParsedJudge(), ["q"] * 5, answers, predictions)
    assert result.accuracy == pytest.approx(0.6)
    assert (result.num_items, result.num_judged, result.num_unparseable) == (5, 4, 1)
    assert result.scores == (1.0, 0.0, None, 1.0, 1.0)
    assert qa_accuracy(HalfParsedJudge(), ["q"] * 5, answers, predictions) == pytest.approx(0.6)


def test_registry():
    with pytest.raises(ConfigError, match="unknown judge 'gpt'.*exact_match"):
        get_judge("gpt")
    with pytest.raises(ConfigError, match="no options"):
        get_judge("exact_match", model="x")
    from mera.config import registry

    assert registry.names("judge") == ["exact_match", "local_llm", "openai"]
    assert registry.lookup("judge", "exact_match").obj is ExactMatchJudge
    assert isinstance(registry.build("judge", "exact_match"), ExactMatchJudge)
    try:
        register_judge("half", lambda: HalfParsedJudge())
        assert "half" in registry.names("judge") and get_judge("half").name == "half"
    finally:
        registry._ENTRIES["judge"].pop("half", None)
    assert "half" not in registry.names("judge")


def test_register_judge_with_options(monkeypatch):
    from mera.config import registry
    from mera.config.base import StrictModel

    class Opts(StrictModel):
        k: int = 1

    made = []
    monkeypatch.setitem(registry._ENTRIES, "judge", dict(registry._ENTRIES["judge"]))
    register_judge("plain", lambda **kw: made.append(kw) or HalfParsedJudge())
    register_judge("typed", lambda **kw: made.append(kw) or HalfParsedJudge(), Opts)
    get_judge("plain", anything="goes")
    get_judge("typed", k="3")
    assert made == [{"anything": "goes"}, {"k": 3}]
    check_judge_options("plain", {"anything": "goes"})  # no model: nothing to check before building
    with pytest.raises(ConfigError, match=r"judge 'typed': unknown option\(s\) j"):
        get_judge("typed", j=2)


def test_check_judge_options_reads_no_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    check_judge_options("exact_match", {})
    check_judge_options("openai", {"model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"})
    check_judge_options("local_llm", {"path": "/nowhere/model"})  # the folder is not looked at
    for name, opts, match in [
        ("gpt", {}, "unknown judge 'gpt'; known judges: exact_match, local_llm, openai"),
        ("exact_match", {"model": "x"}, "judge 'exact_match' takes no options, got model"),
        ("openai", {"api_key": "sk-secret"}, r"judge 'openai': unknown option\(s\) api_key \(known: model, "),
        ("openai", {"max_concurrency": 0}, "judge 'openai': max_concurrency must be >= 1, got 0"),
        ("openai", {"timeout": "soon"}, "judge 'openai': timeout: Input should be a valid number"),
        ("local_llm", {}, "judge 'local_llm': needs the option path"),
        ("local_llm", {"path": "/m", "dtype": "int8"}, "dtype must be one of float32, float16, bfloat16"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            check_judge_options(name, opts)
        assert "sk-secret" not in str(e.value)


def test_input_errors():
    judge = ExactMatchJudge()
    with pytest.raises(DataError, match="differ in length"):
        qa_accuracy(judge, ["q"], [["a"], ["b"]], ["a"])
    with pytest.raises(DataError, match="non-empty list"):
        qa_accuracy(judge, ["q"], [[]], ["a"])
    with pytest.raises(DataError, match="non-empty list"):
        qa_accuracy(judge, ["q"], ["a"], ["a"])  # a bare string, not a list of answers
    with pytest.raises(DataError, match="no QA items"):
        qa_accuracy(judge, [], [], [])

    class NoneJudge:
        name = "none"

        def score(self, questions, answers, predictions):
            return [None] * len(predictions)

    with pytest.raises(MeraError, match="could not parse any"):
        qa_accuracy(NoneJudge(), ["q"], [["a"]], ["a"])


def test_evaluation_counts_unparseable_judgements_as_wrong():
    """A judge that cannot parse some replies: they count as wrong, and are counted."""
    from types import SimpleNamespace

    from mera.eval.evaluate import _score

    class HalfParsed:
        name = "half"

        def score(self, questions, answers, predictions):
            return [None if p == "???" else float(p == a[0]) for a, p in zip(answers, predictions)]

    qa = [SimpleNamespace(id=f"q{i}", prompt=f"question {i}", references=[r], answer=r)
          for i, r in enumerate(["red", "blue", "two", "cube"])]
    rows, ex = _score("image", [], qa, [], ["red", "???", "three", "cube"], HalfParsed(), ("c", "q"))
    assert rows == [{"modality": "image", "dataset": "q", "task": "qa", "score": round(2 / 4, 4)}]
    assert ex["qa_unparseable"] == 1
    assert [p["judgement"] for p in ex["predictions"]] == [1.0, None, 0.0, 1.0]
