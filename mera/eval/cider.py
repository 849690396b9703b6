"""CIDEr-D (x100) with the COCO caption toolkit's scorer, on text tokenised without Java.

``pycocoevalcap.cider.cider.Cider`` is the COCO toolkit's CIDEr-D (n-grams 1..4,
tf-idf with document frequencies from the references of the evaluated corpus,
clipping and a Gaussian length penalty, sigma 6). The toolkit normally tokenises with
Stanford's PTBTokenizer (Java); :func:`tokenize` reproduces its tokens on plain
captions in pure Python.
"""

from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

from mera.errors import DataError

# Tokens that pycocoevalcap removes after PTB tokenisation (and the brackets, which PTB
# would turn into -lrb- / -rrb- tokens that survive its lower-cased filter: we drop them).
_CLITICS = ("n't", "'s", "'m", "'d", "'re", "'ve", "'ll")
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "prof", "mt")
_TOKEN = re.compile(
    r"""
      (?:[^\W\d_]\.){2,}                                   # acronyms: u.s.a.  e.g.  p.m.
    | (?:%s)\.(?=\s|$)                                     # a few abbreviations: mr.  dr.  st.
    | \w+(?:(?:[-&/']|(?<=\d)[.,:](?=\d)|\.(?=\w))\w+)*     # words, numbers, well-known, 1,000, 10:30, o'clock
    | n't | '(?:s|m|d|re|ve|ll)\b                          # clitics already split off
    | [$%%#*+=~^&@<>|\\]                                   # symbols PTB keeps as tokens
    """ % "|".join(_ABBREVIATIONS),
    re.VERBOSE,
)


def _split_clitic(word: str) -> list[str]:
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            return _split_clitic(word[: -len(clitic)]) + [clitic]  # they'd've -> they 'd 've
    return [word]


def tokenize(text: str) -> str:
    """PTB-style tokens of a caption, space-joined: lower-cased, punctuation removed.

    Matches ``PTBTokenizer`` + pycocoevalcap's punctuation filter on plain captions:
    clitics are split (``isn't`` -> ``is n't``, ``dog's`` -> ``dog 's``), hyphenated
    words, decimals and acronyms stay whole, ``$ % # * + = ~ ^ &`` are separate tokens,
    and ``. , ; : ! ? ' " ` - ( ) [ ] { }`` are dropped. Known differences, none of
    them in plain captions: brackets (PTB keeps ``-lrb-`` etc.), ``?!``, ``@`` ``<`` ``>``
    inside words, underscores, and rare clitics such as ``'tis``.
    """
    tokens: list[str] = []
    for match in _TOKEN.finditer(str(text).lower()):
        tokens.extend(_split_clitic(match.group(0)))
    return " ".join(tokens)


def _prepare(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[dict, dict]:
    if not predictions:
        raise DataError("no captions to score (empty predictions)")
    gts: dict = {}
    res: dict = {}
    for key, pred in predictions.items():
        refs = references.get(key)
        if refs is None:
            raise DataError(f"caption id {key!r} has a prediction but no reference captions")
        if isinstance(refs, str) or len(refs) == 0:
            raise DataError(f"caption id {key!r}: expected a non-empty list of reference captions, got {refs!r}")
        if not isinstance(pred, str):
            raise DataError(f"caption id {key!r}: prediction is not a string ({pred!r})")
        gts[key] = [tokenize(r) for r in refs]
        res[key] = [tokenize(pred)]
    return gts, res


def cider_d_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[float, dict]:
    """Corpus CIDEr-D x100 and the per-sample CIDEr-D x100 ({id: score}).

    The corpus score is the mean of the per-sample scores. Only the ids of
    ``predictions`` are evaluated (extra references are ignored; they would change the
    idf); a prediction id without references raises DataError. Note that CIDEr-D's idf
    is corpus-level: a corpus of one sample scores 0.
    """
    from pycocoevalcap.cider.cider import Cider

    gts, res = _prepare(predictions, references)
    score, per_sample = Cider().compute_score(gts, res)
    return float(score) * 100.0, {k: float(s) * 100.0 for k, s in zip(gts, per_sample)}


def cider_d(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D x100 of ``predictions`` ({id: caption}) against ``references`` ({id: [captions]})."""
    return cider_d_scores(predictions, references)[0]
