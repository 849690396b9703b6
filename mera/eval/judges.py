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

from pydantic import BaseModel

from mera.config.registry import UnknownPlugin, lookup, names, register
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


@register("judge", "exact_match")
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
#
# Judges are plug-ins of kind "judge" in mera.config.registry. A built-in judge registers a
# factory ``factory(params)`` (``factory()`` when it takes no options) with the pydantic model of
# its options, next to its code: ``exact_match`` below, ``openai`` and ``local_llm`` in
# mera.eval.llm_judge (the registry imports both modules, its PACKAGES["judge"], before it looks a
# judge up; llm_judge imports neither openai nor torch until a judge is built). A judge added with
# :func:`register_judge` is called as ``factory(**opts)``; its options are checked at config-load
# time only when it gives a parameter model.


def register_judge(name: str, factory: Callable[..., Judge], params: type[BaseModel] | None = None) -> None:
    """Make ``get_judge(name, **opts)`` return ``factory(**opts)`` (``opts`` validated by ``params``
    first, when given: ``factory(**<the options given, as the model read them>)``)."""
    register("judge", name, params, kwargs=True)(factory)


def _entry(name: str):
    try:
        return lookup("judge", name)
    except UnknownPlugin:  # a plug-in that fails to load says so itself
        raise ConfigError(f"unknown judge {name!r}; known judges: {', '.join(names('judge'))}") from None


def _params(entry, opts: dict) -> BaseModel | None:
    """``opts`` validated against the judge's parameter model; ValueError naming the judge and option.

    Values are never echoed for unknown options (one might be a misplaced secret).
    """
    from pydantic import ValidationError

    if entry.params is None:
        if opts and not entry.info.get("kwargs"):
            raise ValueError(f"judge {entry.name!r} takes no options, got {', '.join(sorted(opts))}")
        return None
    try:
        return entry.params.model_validate(opts)
    except ValidationError as e:
        errors = e.errors()
        unknown = sorted(str(err["loc"][-1]) for err in errors if err["type"] == "extra_forbidden")
        if unknown:
            raise ValueError(f"judge {entry.name!r}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(entry.params.model_fields)})") from None
        parts = []
        for err in errors:
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "value_error":
                parts.append(msg)  # our validators name the option themselves
            else:
                parts.append(f"{loc}: {msg}" if loc else msg)
        raise ValueError(f"judge {entry.name!r}: " + "; ".join(parts)) from None


def check_judge_options(name: str, options: dict) -> None:
    """Raise ValueError (naming the judge and the option) unless ``name`` is a registered judge and
    ``options`` are valid options of it. Config-load time: contacts no server, reads no environment
    variable, loads no model."""
    try:
        entry = _entry(name)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    _params(entry, dict(options or {}))


def get_judge(name: str, **opts) -> Judge:
    """The judge registered under ``name``, built with ``opts``; ConfigError on an unknown name or bad options."""
    entry = _entry(name)
    try:
        params = _params(entry, opts)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if entry.info.get("kwargs"):
        return entry.obj(**(params.model_dump(exclude_unset=True) if params is not None else opts))
    return entry.obj(params) if params is not None else entry.obj()


# ----------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class QAResult:
    """``accuracy`` = sum of the judgements / ``num_items``: an unparseable judgement (None) counts as
    wrong (0), so a judge that cannot answer can never raise the accuracy; ``num_unparseable`` is
    reported beside it."""

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
    """Judge every item; accuracy = (sum of non-None scores) / (number of items): unparseable = wrong."""
    _check_lengths(questions, answers, predictions)
    if not predictions:
        raise DataError("no QA items to judge")
    scores = list(judge.score(list(questions), [list(a) for a in answers], list(predictions)))
    if len(scores) != len(predictions):
        raise DataError(f"judge {judge.name!r} returned {len(scores)} judgements for {len(predictions)} items")
    judged = [float(s) for s in scores if s is not None]
    if not judged:
        raise DataError(f"judge {judge.name!r} could not parse any of its {len(scores)} judgements")
    return QAResult(sum(judged) / len(scores), len(scores), len(judged), len(scores) - len(judged), tuple(scores))


def qa_accuracy(
    judge: Judge, questions: list[str], answers: list[list[str]], predictions: list[str]
) -> float:
    """Accuracy in [0, 1]: the mean judgement over all items (an unparseable judgement counts as wrong).

    Use :func:`judge_qa` to also get the number of unparseable judgements.
    """
    return judge_qa(judge, questions, answers, predictions).accuracy

