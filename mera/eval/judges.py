"""QA judges: decide whether a predicted answer matches one of the acceptable answers.

The paper judges QA with an LLM (semantic match); any judge must be swappable. A judge
returns, per item, 1.0 (match), 0.0 (no match) or None (its judgement could not be
parsed, for future LLM judges). Accuracy is the mean over the non-None items.

The offline default is :class:`ExactMatchJudge` (normalised exact match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

from mera.errors import ConfigError, DataError


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(
        self, questions: list[str], answers: list[list[str]], predictions: list[str]
    ) -> list[float | None]:
        """One judgement per item: 1.0, 0.0, or None when unparseable."""
        ...


# ----------------------------------------------------------------------------- normalisation

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCT = re.compile(r"[^\w\s\u0001]|_")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation, drop articles (a, an, the), map zero..twenty to digits.

    Apostrophes are removed ("dog's" -> "dogs"), other punctuation becomes a space
    ("t-shirt" -> "t shirt"), a decimal point between digits is kept ("3.5") and a
    thousands comma removed ("1,000" -> "1000"). If dropping the articles would leave
    nothing (an answer that is just "a", e.g. a multiple-choice letter) they are kept.
    """
    text = str(text).lower()
    text = _DECIMAL_POINT.sub("\u0001", text)  # protect decimal points
    text = _THOUSANDS_COMMA.sub("", text)
    text = _APOSTROPHES.sub("", text)
    text = _PUNCT.sub(" ", text).replace("\u0001", ".")
    tokens = [NUMBER_WORDS.get(t, t) for t in text.split()]
    kept = [t for t in tokens if t not in ARTICLES]
    return " ".join(kept if kept else tokens)


class ExactMatchJudge:
    """1.0 if the normalised prediction equals any normalised acceptable answer, else 0.0."""

    name = "exact_match"

    def score(
        self, questions: list[str], answers: list[list[str]], predictions: list[str]
    ) -> list[float | None]:
        _check_lengths(questions, answers, predictions)
        out: list[float | None] = []
        for acceptable, pred in zip(answers, predictions):
            p = normalize_answer(pred)
            out.append(1.0 if any(p == normalize_answer(a) for a in acceptable) else 0.0)
        return out


# ----------------------------------------------------------------------------- registry

JUDGES: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``get_judge(name, **opts)`` return ``factory(**opts)``."""
    JUDGES[name] = factory


def _exact_match(**opts) -> Judge:
    if opts:
        raise ConfigError(f"judge 'exact_match' takes no options, got {', '.join(sorted(opts))}")
    return ExactMatchJudge()


register_judge("exact_match", _exact_match)


def _llm_judge(cls_name: str) -> Callable[..., Judge]:
    """A factory importing :mod:`mera.eval.llm_judge` (openai, torch) only when used."""

    def factory(**opts) -> Judge:
        from mera.eval import llm_judge

        return getattr(llm_judge, cls_name)(**opts)

    return factory


register_judge("openai", _llm_judge("OpenAIJudge"))  # an OpenAI-compatible endpoint
register_judge("local_llm", _llm_judge("LocalLLMJudge"))  # a local HF causal LM


def get_judge(name: str, **opts) -> Judge:
    """The judge registered under ``name``, built with ``opts``; ConfigError on an unknown name."""
    try:
        factory = JUDGES[name]
    except KeyError:
        raise ConfigError(f"unknown judge {name!r}; known judges: {', '.join(sorted(JUDGES))}") from None
    return factory(**opts)


# ----------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class QAResult:
    """``accuracy`` = mean of the non-None judgements (denominator ``num_judged``)."""

    accuracy: float
    num_items: int
    num_judged: int
    num_unparseable: int
    scores: tuple[float | None, ...]


def _check_lengths(questions: Sequence, answers: Sequence, predictions: Sequence) -> None:
    if not (len(questions) == len(answers) == len(predictions)):
        raise DataError(
            f"QA inputs differ in length: {len(questions)} questions, {len(answers)} answer lists, "
            f"{len(predictions)} predictions"
        )
    for i, acceptable in enumerate(answers):
        if isinstance(acceptable, str) or not acceptable:
            raise DataError(f"QA item {i}: expected a non-empty list of acceptable answers, got {acceptable!r}")


def judge_qa(
    judge: Judge, questions: list[str], answers: list[list[str]], predictions: list[str]
) -> QAResult:
    """Judge every item; accuracy = (sum of non-None scores) / (number of non-None scores)."""
    _check_lengths(questions, answers, predictions)
    if not predictions:
        raise DataError("no QA items to judge")
    scores = list(judge.score(list(questions), [list(a) for a in answers], list(predictions)))
    if len(scores) != len(predictions):
        raise DataError(f"judge {judge.name!r} returned {len(scores)} judgements for {len(predictions)} items")
    judged = [float(s) for s in scores if s is not None]
    if not judged:
        raise DataError(f"judge {judge.name!r} could not parse any of its {len(scores)} judgements")
    return QAResult(sum(judged) / len(judged), len(scores), len(judged), len(scores) - len(judged), tuple(scores))


def qa_accuracy(
    judge: Judge, questions: list[str], answers: list[list[str]], predictions: list[str]
) -> float:
    """Accuracy in [0, 1]: the mean judgement over the items the judge could parse.

    Use :func:`judge_qa` to also get the number of unparseable judgements.
    """
    return judge_qa(judge, questions, answers, predictions).accuracy
