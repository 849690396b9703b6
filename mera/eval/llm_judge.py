"""LLM judges for QA: an OpenAI-compatible endpoint or a local Hugging Face causal LM.

The paper judged QA answers with GPT-4o mini through a fixed prompt in the style of
Video-ChatGPT's QA evaluation: the judge sees the question, the correct answer and the
predicted answer and replies with a Python dict string ``{'pred': 'yes', 'score': 4}``.
``pred == 'yes'`` gives the judgement 1.0, ``'no'`` gives 0.0; the 0-5 score is recorded
but does not decide the judgement. A reply that cannot be parsed is judged ``None``: it is
counted as unparseable (see :class:`mera.eval.judges.QAResult`), never silently scored.

Judges registered (:mod:`mera.config.registry`, kind ``judge``; see :mod:`mera.eval.judges`):

* ``openai`` -> :class:`OpenAIJudge` (any OpenAI-compatible chat-completions endpoint)
* ``local_llm`` -> :class:`LocalLLMJudge` (any HF causal LM in a local folder)

Both keep a disk cache (:class:`JudgeCache`, an SQLite table) so that a rerun never asks
the judge twice about the same (question, answers, prediction, judge model, prompt version).
After ``score`` each judge's ``stats`` (that call) and ``total_stats`` (since construction)
give the number of requests made, cache hits and unparseable judgements.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import model_validator

from mera.config.base import StrictModel
from mera.config.registry import register
from mera.errors import ConfigError, DataError, MeraError
from mera.faults import fault_point
from mera.io import write_errno, writing

# ----------------------------------------------------------------------------- the prompt

#: Bump whenever SYSTEM_PROMPT, USER_PROMPT, ANSWER_JOINER or the parsing rules change:
#: it is part of the cache key, so old judgements are not reused for a different prompt.
PROMPT_VERSION = "qa-correctness-v1"

#: Several acceptable answers are shown to the judge as one "Correct Answer", joined by this.
ANSWER_JOINER = " / "

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative "
    "outputs for question-answer pairs. Your task is to compare the predicted answer with the "
    "correct answer and determine if they match meaningfully. Here's how you can accomplish "
    "the task:\n"
    "------\n"
    "##INSTRUCTIONS:\n"
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer.\n"
    "- When several correct answers are given, separated by ' / ', the prediction is correct "
    "if it matches any one of them."
)

USER_PROMPT = (
    "Please evaluate the following question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value "
    "between 0 and 5, with 5 indicating the highest meaningful match. Please generate the "
    "response in the form of a Python dictionary string with keys 'pred' and 'score', where "
    "value of 'pred' is a string of 'yes' or 'no' and value of 'score' is in INTEGER, not "
    "STRING. DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python "
    "dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4}}."
)


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so an item cannot break the prompt's layout."""
    return " ".join(str(text).split())


def build_messages(question: str, answers: list[str], prediction: str) -> list[dict[str, str]]:
    """The chat messages (system + user) asking the judge about one QA item.

    The acceptable answers are joined with :data:`ANSWER_JOINER`; whitespace runs in the
    question, answers and prediction are collapsed to single spaces.
    """
    user = USER_PROMPT.format(
        question=_one_line(question),
        answer=ANSWER_JOINER.join(_one_line(a) for a in answers),
        prediction=_one_line(prediction),
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------- reply parsing


@dataclass(frozen=True)
class ParsedReply:
    """A parsed judge reply: ``pred`` is 'yes' or 'no'; ``score`` the 0-5 score if given."""

    pred: str
    score: float | None

    @property
    def judgement(self) -> float:
        """1.0 for 'yes', 0.0 for 'no'."""
        return 1.0 if self.pred == "yes" else 0.0


_DICT_CANDIDATE = re.compile(r"\{[^{}]*\}")
_YES = frozenset({"yes", "y", "true"})
_NO = frozenset({"no", "n", "false"})


def _literal_dict(text: str) -> dict | None:
    """``text`` as a dict via ``ast.literal_eval`` (or JSON, for true/false/null), else None."""
    for loads in (ast.literal_eval, json.loads):
        try:
            value = loads(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_reply(reply: str | None) -> ParsedReply | None:
    """The first ``{...}`` dict in ``reply`` that has a 'pred' key, parsed; None if there is none.

    Stray text and code fences around the dict are ignored; keys are matched case-insensitively
    ('Pred'), values too ('Yes', 'NO.'). 'pred' must be yes or no (booleans are accepted); a
    missing or non-numeric score is recorded as None and does not make the reply unparseable.
    """
    if not reply:
        return None
    for match in _DICT_CANDIDATE.finditer(str(reply)):
        d = _literal_dict(match.group(0))
        if d is None:
            continue
        d = {str(k).strip().lower(): v for k, v in d.items()}
        if "pred" not in d:
            continue
        raw = d["pred"]
        pred = str(raw).strip().strip(".!'\"").strip().lower() if not isinstance(raw, bool) else str(raw).lower()
        if pred in _YES:
            pred = "yes"
        elif pred in _NO:
            pred = "no"
        else:
            return None  # a dict that answers, but not with yes/no: unparseable
        return ParsedReply(pred, _parse_score(d.get("score")))
    return None


def _parse_score(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        score = float(str(value).strip()) if value is not None else None
    except ValueError:
        return None
    return score if score is not None and score == score else None  # drop NaN


# ----------------------------------------------------------------------------- the disk cache

SECRET_QUERY = ("key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "password", "secret", "sig",
                "signature")


def url_credentials(url: str) -> str | None:
    """What in ``url`` is a credential (a user name or password, a key-like query parameter), or None.
    Keys belong in an environment variable (``api_key_env``), never in a config or a URL: a config
    is saved in the run directory and URLs are shown in errors."""
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(str(url))
        user = parts.username or parts.password
    except ValueError:
        return None
    if user:
        return "a user name or password before '@'"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in SECRET_QUERY:
            return f"the query parameter {name!r}"
    return None


CACHE_FILE = "judgements.sqlite"
LEGACY_CACHE_FILE = "judgements.jsonl"  # the first release's cache: imported once, then renamed
MAX_REPLY_CHARS = 4096  # a longer reply is stored cut (the judgement is parsed from the whole reply first)


def default_cache_dir() -> Path:
    """``<zoo_home()>/judge-cache`` ($MERA_HOME or ~/.cache/mera)."""
    from mera.paths import zoo_home

    return zoo_home() / "judge-cache"


def cache_key(question: str, answers: list[str], prediction: str, judge_model: str,
              prompt_version: str | None = None) -> str:
    """sha256 (hex) of the canonical JSON of [question, answers, prediction, judge_model, prompt_version].

    The strings are used as given (order of ``answers`` kept: it is the order in the prompt);
    ``prompt_version`` defaults to the current :data:`PROMPT_VERSION`.
    """
    if prompt_version is None:
        prompt_version = PROMPT_VERSION
    payload = json.dumps([str(question), [str(a) for a in answers], str(prediction), str(judge_model),
                          str(prompt_version)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Judgements on disk: an indexed SQLite table in ``<cache_dir>/judgements.sqlite`` (standard
    library), opened once per judge and queried one key at a time, so that a lookup costs the same
    time and memory whatever the cache's size (benchmarks/judge_cache_bench.py). Several processes
    may share it (SQLite's own locking, write-ahead log); a record is committed as soon as its
    reply arrives, so a crash loses at most the replies in flight.

    Records hold the key, the judge model, prompt version, the item, the raw reply (cut to
    :data:`MAX_REPLY_CHARS`), the parsed pred/score and the judgement (None when unparseable),
    never credentials. A first-release ``judgements.jsonl`` in the folder is imported once (a torn
    last line skipped) and renamed ``judgements.jsonl.imported``. A file that is not a judge cache
    is an error naming it.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.path = self.dir / CACHE_FILE
        self._lock = threading.Lock()
        self._db = None

    def _conn(self):
        import sqlite3

        if self._db is not None:
            return self._db
        with writing(self.path):  # a full disk (or another failed write): one line naming the cache
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, record TEXT NOT NULL)")
            except sqlite3.DatabaseError as e:
                if write_errno(e) is not None:
                    raise
                raise DataError(f"{self.path}: not a judge cache ({e}); move it away and the judge starts a new one") from None
            self._db = db
            legacy = self.dir / LEGACY_CACHE_FILE
            if legacy.is_file():
                self._import(legacy)
        return db

    def _import(self, legacy: Path) -> None:
        rows = []
        for line in legacy.read_bytes().split(b"\n"):
            try:
                rec = json.loads(line) if line.strip() else None
            except (ValueError, UnicodeDecodeError):
                continue  # a torn line from an interrupted write
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                rows.append((rec["key"], json.dumps(_capped(rec), ensure_ascii=False)))
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?)", rows)  # a later line wins
        try:
            os.replace(legacy, legacy.with_name(legacy.name + ".imported"))
        except OSError:
            pass

    def load(self) -> dict[str, dict]:
        """Every record, key -> record (for inspection and tests: the judge itself reads by key)."""
        with self._lock:
            rows = self._conn().execute("SELECT key, record FROM judgements").fetchall()
        return {k: json.loads(r) for k, r in rows}

    def get(self, key: str) -> dict | None:
        """The record for ``key``, else None."""
        import sqlite3

        with self._lock:
            try:
                row = self._conn().execute("SELECT record FROM judgements WHERE key = ?", (key,)).fetchone()
            except sqlite3.DatabaseError as e:
                raise DataError(f"{self.path}: unreadable judge cache ({e})") from None
        if row is None:
            return None
        try:
            rec = json.loads(row[0])
        except ValueError:
            return None  # a damaged record: asked again
        return rec if isinstance(rec, dict) else None

    def put(self, record: dict) -> None:
        """Store ``record`` (which must have a 'key'), replacing an older one for that key."""
        text = json.dumps(_capped(record), ensure_ascii=False, separators=(",", ":"))
        with self._lock, writing(self.path):
            fault_point("write_judge")
            self._conn().execute("INSERT OR REPLACE INTO judgements VALUES (?, ?)", (record["key"], text))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM judgements").fetchone()[0])


def _capped(record: dict) -> dict:
    reply = record.get("reply")
    if isinstance(reply, str) and len(reply) > MAX_REPLY_CHARS:
        return {**record, "reply": reply[:MAX_REPLY_CHARS], "reply_chars": len(reply)}
    return record


# ----------------------------------------------------------------------------- the shared judge logic


@dataclass
class JudgeStats:
    """Counts for one ``score`` call (``stats``) or a judge's lifetime (``total_stats``).

    ``requests``: calls made to the judge model (HTTP attempts, retries included, or items
    generated locally); ``retries``: the attempts among them that repeated a failed one;
    ``cache_hits``: items answered from the cache (or from a duplicate in the same call);
    ``unparseable``: items judged None; ``items``: items scored.
    """

    items: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    unparseable: int = 0

    def add(self, other: "JudgeStats") -> None:
        for name in ("items", "requests", "retries", "cache_hits", "unparseable"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Judgement:
    """One item's judgement: ``value`` 1.0/0.0/None, the parsed pred/score and the raw reply."""

    value: float | None
    pred: str | None
    score: float | None
    reply: str
    cached: bool


@dataclass
class _Item:
    question: str
    answers: list[str]
    prediction: str
    key: str
    indices: list[int] = field(default_factory=list)


def _reject_unknown(judge: str, extra: dict) -> None:
    if extra:
        raise ConfigError(f"judge {judge!r}: unknown option(s) {', '.join(sorted(extra))}")


class _CachedLLMJudge:
    """Cache lookup, de-duplication, parsing and stats; subclasses implement ``_ask``."""

    name = "llm"

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.cache = JudgeCache(cache_dir)
        self.stats = JudgeStats()
        self.total_stats = JudgeStats()
        self.last_judgements: list[Judgement] = []

    @property
    def judge_model(self) -> str:
        """The judge's identity in the cache key (e.g. ``openai:gpt-4o-mini``)."""
        raise NotImplementedError

    def _ask(self, items: list[_Item], stats: JudgeStats) -> Iterable[tuple[_Item, str]]:
        """Ask the judge model about ``items``; yield (item, raw reply) as replies arrive.

        Must raise :class:`MeraError` if some items could not be asked (after yielding the
        ones that were answered, so that their replies are cached).
        """
        raise NotImplementedError

    def score(self, questions: list[str], answers: list[list[str]], predictions: list[str]
              ) -> list[float | None]:
        """One judgement per item: 1.0 (pred yes), 0.0 (pred no) or None (unparseable reply)."""
        return [j.value for j in self.judge(questions, answers, predictions)]

    def judge(self, questions: list[str], answers: list[list[str]], predictions: list[str]
              ) -> list[Judgement]:
        """Like :meth:`score` but with the parsed pred/score and raw reply of each item."""
        from mera.eval.judges import _check_lengths

        _check_lengths(questions, answers, predictions)
        stats = JudgeStats(items=len(predictions))
        self.stats = stats
        model = self.judge_model
        out: list[Judgement | None] = [None] * len(predictions)
        todo: dict[str, _Item] = {}
        for i, (q, acc, p) in enumerate(zip(questions, answers, predictions)):
            acc = [str(a) for a in acc]
            key = cache_key(q, acc, p, model)
            rec = self.cache.get(key)
            if rec is not None:
                out[i] = _from_record(rec, cached=True)
                stats.cache_hits += 1
            elif key in todo:
                todo[key].indices.append(i)
                stats.cache_hits += 1  # a duplicate of an item asked in this call
            else:
                todo[key] = _Item(str(q), acc, str(p), key, [i])
        try:
            for item, reply in self._ask(list(todo.values()), stats):
                parsed = parse_reply(reply)
                rec = {
                    "key": item.key, "judge": model, "prompt_version": PROMPT_VERSION,
                    "question": item.question, "answers": item.answers, "prediction": item.prediction,
                    "reply": reply, "pred": parsed.pred if parsed else None,
                    "score": parsed.score if parsed else None,
                    "judgement": parsed.judgement if parsed else None,
                }
                self.cache.put(rec)
                for n, i in enumerate(item.indices):
                    out[i] = _from_record(rec, cached=n > 0)
        finally:
            done = [j for j in out if j is not None]
            stats.unparseable = sum(j.value is None for j in done)
            self.total_stats.add(stats)
        self.last_judgements = [j for j in out if j is not None]
        if len(self.last_judgements) != len(out):  # _ask must raise instead; keep the contract anyway
            missing = len(out) - len(self.last_judgements)
            raise MeraError(f"judge {self.name!r} returned no reply for {missing} items")
        return self.last_judgements


def _from_record(rec: dict, cached: bool) -> Judgement:
    value = rec.get("judgement")
    return Judgement(None if value is None else float(value), rec.get("pred"), rec.get("score"),
                     str(rec.get("reply", "")), cached)


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint

_RETRY_STATUS = frozenset({408, 409, 429})


class OpenAIJudge(_CachedLLMJudge):
    """Judge with a chat-completions model behind any OpenAI-compatible endpoint.

    Options: ``model`` (default "gpt-4o-mini"), ``base_url`` (default: the openai client's,
    i.e. $OPENAI_BASE_URL or api.openai.com), ``api_key_env`` (the environment variable
    holding the key, default "OPENAI_API_KEY"; the key is read from the environment only and
    never written to the cache, logs or error messages), ``max_concurrency`` (parallel
    requests, default 8), ``max_retries`` (retries per item after the first attempt, default
    5), ``backoff_base`` / ``backoff_max`` (seconds: retry n waits about
    ``min(backoff_max, backoff_base * 2**n)``, or the server's Retry-After if longer),
    ``timeout`` (seconds per request, default 60), ``max_tokens`` (default 64), ``cache_dir``.
    Temperature is 0.

    Retries are ours: the openai client is built with ``max_retries=0`` so that the number
    of attempts, the backoff and the stats are under our control. We retry on 408/409/429,
    5xx, timeouts and dropped connections; any other HTTP error (bad key, unknown model) stops
    the run at once. When an item exhausts its retries no new items are started, and
    :class:`MeraError` names the endpoint and how many items could not be judged (the replies
    that did arrive are cached): an unreachable judge is an error, not a zero score.
    """

    name = "openai"

    def __init__(self, *, model: str = "gpt-4o-mini", base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8, max_retries: int = 5,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, timeout: float = 60.0,
                 max_tokens: int = 64, cache_dir: str | os.PathLike | None = None, **extra):
        _reject_unknown(self.name, extra)
        what = url_credentials(base_url) if base_url else None
        if what:
            raise ConfigError(f"judge 'openai': base_url holds credentials ({what}); give the key through "
                              "api_key_env, the NAME of an environment variable, never in a URL")
        if int(max_concurrency) < 1:
            raise ConfigError(f"judge 'openai': max_concurrency must be >= 1, got {max_concurrency}")
        if int(max_retries) < 0:
            raise ConfigError(f"judge 'openai': max_retries must be >= 0, got {max_retries}")
        if float(timeout) <= 0:
            raise ConfigError(f"judge 'openai': timeout must be > 0 seconds, got {timeout}")
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(
                f"judge 'openai': the environment variable {api_key_env} holding the API key is not set "
                f"(set it, or name another variable with the api_key_env option)"
            )
        try:
            import openai  # imported here: only this judge needs it (the optional extra mera[judge])
        except ImportError:
            raise ConfigError("judge 'openai' needs the openai package: pip install 'mera[judge]'") from None
        super().__init__(cache_dir)

        self._openai = openai
        self.model = str(model)
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.timeout = float(timeout)
        self.max_tokens = int(max_tokens)
        self._secret = key
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=self.timeout, max_retries=0)
        self.endpoint = str(self._client.base_url).rstrip("/")

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, endpoint={self.endpoint!r})"

    @property
    def judge_model(self) -> str:
        return f"openai:{self.model}"

    def _scrub(self, text: str) -> str:
        """``text`` with the API key (should a server echo it) replaced by ***."""
        return text.replace(self._secret, "***") if self._secret else text

    def _request(self, item: _Item) -> str:
        resp = self._client.chat.completions.create(
            model=self.model,
            messages=build_messages(item.question, item.answers, item.prediction),
            temperature=0,
            max_tokens=self.max_tokens,
        )
        if not resp.choices:
            return ""
        return resp.choices[0].message.content or ""

    def _retryable(self, err: Exception) -> bool:
        o = self._openai
        if isinstance(err, o.APIConnectionError):  # includes APITimeoutError, dropped connections
            return True
        if isinstance(err, o.APIStatusError):
            return err.status_code in _RETRY_STATUS or err.status_code >= 500
        return False

    def _delay(self, attempt: int, err: Exception) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** attempt)
        delay *= 1 + 0.25 * random.random()  # jitter, so concurrent retries do not stay in step
        response = getattr(err, "response", None)
        if response is not None:
            try:
                delay = max(delay, float(response.headers.get("retry-after", 0)))
            except (TypeError, ValueError):
                pass
        return min(delay, self.backoff_max)

    def _describe(self, err: Exception) -> str:
        o = self._openai
        if isinstance(err, o.APITimeoutError):
            return f"timed out after {self.timeout:g} s"
        if isinstance(err, o.APIConnectionError):
            return "connection failed or dropped"
        if isinstance(err, o.APIStatusError):
            msg = _one_line(getattr(err, "message", "") or "")[:200]
            return f"HTTP {err.status_code}" + (f": {msg}" if msg else "")
        return f"{type(err).__name__}: {_one_line(str(err))[:200]}"

    def _ask(self, items: list[_Item], stats: JudgeStats) -> Iterable[tuple[_Item, str]]:
        if not items:
            return
        abort = threading.Event()
        lock = threading.Lock()
        failures: list[str] = []  # reasons, one per item that failed

        def run(item: _Item) -> tuple[_Item, str | None]:
            for attempt in range(self.max_retries + 1):
                if abort.is_set():
                    return item, None
                with lock:
                    stats.requests += 1
                    stats.retries += attempt > 0
                try:
                    return item, self._request(item)
                except self._openai.OpenAIError as err:  # APIError and friends
                    if not self._retryable(err):
                        reason = f"{self._describe(err)} (not retried)"
                        break
                    reason = f"{self._describe(err)} (after {attempt + 1} attempts)"
                    if attempt < self.max_retries:
                        if abort.wait(self._delay(attempt, err)):
                            return item, None
            with lock:
                failures.append(reason)
            abort.set()  # stop starting new items: the endpoint is failing
            return item, None

        not_done = 0
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)),
                                thread_name_prefix="mera-judge") as pool:
            for item, reply in pool.map(run, items):  # in order; the pool keeps max_concurrency busy
                if reply is None:
                    not_done += 1
                else:
                    yield item, reply
        if not_done:
            reason = self._scrub(failures[0]) if failures else "aborted"
            raise MeraError(
                f"judge endpoint {self.endpoint} (model {self.model}) failed: {not_done} of {len(items)} "
                f"items could not be judged ({len(failures)} failed, {not_done - len(failures)} abandoned "
                f"after the first failure); first error: {reason}. Replies received so far are cached "
                f"in {self.cache.path}"
            )


class OpenAIJudgeParams(StrictModel):
    """The options of :class:`OpenAIJudge` (same defaults). Checked when a config loads: nothing
    here reads the environment or contacts the endpoint."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key, never the key
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 60.0
    max_tokens: int = 64
    cache_dir: str | Path | None = None

    @model_validator(mode="after")
    def _check(self):
        what = url_credentials(self.base_url) if self.base_url else None
        if what:  # said without the URL itself
            raise ValueError(f"base_url holds credentials ({what}); give the key through api_key_env, the NAME "
                             "of an environment variable, never in a config or a URL")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        return self


@register("judge", "openai", OpenAIJudgeParams)
def openai_judge(params: OpenAIJudgeParams) -> OpenAIJudge:
    """``openai``: an :class:`OpenAIJudge` with the options given."""
    return OpenAIJudge(**params.model_dump(exclude_unset=True))


# ----------------------------------------------------------------------------- local HF causal LM


class LocalLLMJudge(_CachedLLMJudge):
    """Judge with a Hugging Face causal LM loaded from a local folder.

    Options: ``path`` (the folder, required), ``trust_remote_code`` (default False),
    ``batch_size`` (default 8), ``max_new_tokens`` (default 32), ``device`` (default "cuda"
    when available, else "cpu"), ``dtype`` ("float32", "float16", "bfloat16"; default: the
    checkpoint's), ``cache_dir``. The prompt goes through the tokenizer's chat template when
    it has one, else the system and user messages are concatenated (:meth:`build_prompt`).
    Generation is greedy, batched with left padding; only the new tokens are decoded.
    """

    name = "local_llm"

    def __init__(self, *, path: str | os.PathLike | None = None, trust_remote_code: bool = False,
                 batch_size: int = 8, max_new_tokens: int = 32, device: str | None = None,
                 dtype: str | None = None, cache_dir: str | os.PathLike | None = None, **extra):
        _reject_unknown(self.name, extra)
        if not path:
            raise ConfigError("judge 'local_llm' needs the option path (a local model folder)")
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"judge 'local_llm': {folder} is not a model folder (no config.json)")
        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise ConfigError("judge 'local_llm': batch_size and max_new_tokens must be >= 1")
        super().__init__(cache_dir)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = folder.resolve()
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype is not None and dtype not in dtypes:
            raise ConfigError(f"judge 'local_llm': dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
        trust = bool(trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust,
                                                           local_files_only=True)
            kw = {"dtype": dtypes[dtype]} if dtype else {}
            self.model = AutoModelForCausalLM.from_pretrained(self.path, trust_remote_code=trust,
                                                              local_files_only=True, **kw)
        except (OSError, ValueError) as err:
            raise ConfigError(f"judge 'local_llm': cannot load the model in {self.path}: "
                              f"{_one_line(str(err))[:300]}") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"judge 'local_llm': the tokenizer in {self.path} has neither a pad "
                                  f"nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def __repr__(self) -> str:
        return f"LocalLLMJudge(path={str(self.path)!r})"

    @property
    def judge_model(self) -> str:
        return f"local_llm:{self.path}"

    def build_prompt(self, item: _Item) -> str:
        """The prompt text: the chat template applied (with the generation prompt), or
        ``"<system>\\n\\n<user>\\n"`` when the tokenizer has no chat template."""
        messages = build_messages(item.question, item.answers, item.prediction)
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{messages[0]['content']}\n\n{messages[1]['content']}\n"

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy replies (new tokens only, special tokens skipped) for one batch of prompts."""
        import torch

        # A chat template already writes the special tokens (e.g. BOS) it wants.
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True,
                             add_special_tokens=not self.has_chat_template).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _ask(self, items: list[_Item], stats: JudgeStats) -> Iterable[tuple[_Item, str]]:
        prompts = {id(it): self.build_prompt(it) for it in items}
        order = sorted(items, key=lambda it: len(prompts[id(it)]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            replies = self._generate([prompts[id(it)] for it in batch])
            if len(replies) != len(batch):
                raise DataError(f"judge 'local_llm': {len(replies)} replies for a batch of {len(batch)}")
            stats.requests += len(batch)
            yield from zip(batch, replies)


_LOCAL_DTYPES = ("float32", "float16", "bfloat16")


class LocalLLMJudgeParams(StrictModel):
    """The options of :class:`LocalLLMJudge` (same defaults; ``path`` is required). Checked when a
    config loads: the folder is not looked at then."""

    path: str | Path | None = None
    trust_remote_code: bool = False
    batch_size: int = 8
    max_new_tokens: int = 32
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | Path | None = None

    @model_validator(mode="after")
    def _check(self):
        if not self.path:
            raise ValueError("needs the option path (a local model folder)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.dtype is not None and self.dtype not in _LOCAL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_LOCAL_DTYPES)}, got {self.dtype!r}")
        return self


@register("judge", "local_llm", LocalLLMJudgeParams)
def local_llm_judge(params: LocalLLMJudgeParams) -> LocalLLMJudge:
    """``local_llm``: a :class:`LocalLLMJudge` with the options given."""
    return LocalLLMJudge(**params.model_dump(exclude_unset=True))
