"""CIDEr-D: our tokenizer + pycocoevalcap's scorer."""

from __future__ import annotations

import shutil

import pytest
from pycocoevalcap.cider.cider import Cider

from mera.errors import DataError
from mera.eval.cider import cider_d, cider_d_scores, tokenize

REFS = {
    "a": ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave.", "Man surfing on a wave!"],
    "b": ["Two dogs play in the snow.", "Two dogs are playing, in the snow.", "A pair of dogs in snow."],
    "c": ["A red car parked on the street.", "A red car is parked by the road.", "The car is red."],
    "d": ["A plate of food with broccoli.", "Broccoli and rice on a plate.", "A dish with vegetables."],
}
PREDS = {
    "a": "a man riding a wave on a surfboard",
    "b": "two dogs playing in snow",
    "c": "a blue car on the road",
    "d": "a cat sleeping on a couch",
}


@pytest.mark.parametrize(
    "text,tokens",
    [
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ("Two dogs playing in the snow, near a tree!", "two dogs playing in the snow near a tree"),
        ("  Multiple   spaces\tand TABS\n", "multiple spaces and tabs"),
        ("The dog's bone isn't there; it's gone...", "the dog 's bone is n't there it 's gone"),
        ("People can't, won't; I'm here", "people ca n't wo n't i 'm here"),
        ("A well-known 3.5 inch, 1,000-piece set: $50 and 20% off.", "a well-known 3.5 inch 1,000-piece set $ 50 and 20 % off"),
        ("The U.S. flag at 5 p.m.", "the u.s. flag at 5 p.m."),
        ("A dog -- running fast.", "a dog running fast"),
        ('he said,"hi" `quoted\'', "he said hi quoted"),
        ("", ""),
    ],
)
def test_tokenize_examples(text, tokens):
    assert tokenize(text) == tokens


def test_equals_pycocoevalcap_on_pretokenised_text():
    gts = {k: [tokenize(r) for r in refs] for k, refs in REFS.items()}
    res = {k: [tokenize(p)] for k, p in PREDS.items()}
    expected, expected_each = Cider().compute_score(gts, res)
    corpus, each = cider_d_scores(PREDS, REFS)
    assert corpus == pytest.approx(100.0 * expected, rel=1e-12)
    assert cider_d(PREDS, REFS) == pytest.approx(100.0 * expected, rel=1e-12)
    assert list(each) == list(PREDS)
    assert [each[k] for k in PREDS] == pytest.approx([100.0 * s for s in expected_each], rel=1e-12)
    assert corpus == pytest.approx(sum(each.values()) / len(each))  # corpus = mean of samples
    # sanity on the ranking: near-copies (a, b) > wrong colour (c) > unrelated, sharing only "a ... on a" (d)
    assert min(each["a"], each["b"]) > each["c"] > each["d"] > 0.0


def test_perfect_prediction_scores_higher_than_wrong_one():
    perfect = {k: refs[0] for k, refs in REFS.items()}
    wrong = {k: "purple elephants juggling xylophones" for k in REFS}  # no n-gram in any reference
    assert cider_d(perfect, REFS) > cider_d(PREDS, REFS) > cider_d(wrong, REFS)
    assert cider_d(wrong, REFS) == 0.0


def test_punctuation_and_case_do_not_change_the_score():
    noisy = {k: p.upper() + " ." for k, p in PREDS.items()}
    assert cider_d(noisy, REFS) == pytest.approx(cider_d(PREDS, REFS), rel=1e-12)


def test_extra_references_are_ignored():
    refs = dict(REFS, z=["something else entirely"])
    assert cider_d(PREDS, refs) == pytest.approx(cider_d(PREDS, REFS), rel=1e-12)


def test_errors():
    with pytest.raises(DataError, match="'x' has a prediction but no reference"):
        cider_d(dict(PREDS, x="a caption"), REFS)
    with pytest.raises(DataError, match="non-empty list"):
        cider_d({"a": "a man"}, {"a": []})
    with pytest.raises(DataError, match="non-empty list"):
        cider_d({"a": "a man"}, {"a": "a man surfing"})
    with pytest.raises(DataError, match="empty predictions"):
        cider_d({}, REFS)


@pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH (PTBTokenizer needs it)")
def test_tokenize_matches_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [
        "A man riding a wave on top of a surfboard.",
        "Two dogs playing in the snow, near a tree!",
        "The dog's bone isn't there; it's gone...",
        "People can't won't don't I'm you're we've they'll he'd",
        "A well-known 3.5 inch, 1,000-piece set costs $50 and 20% off.",
        "The children's toys' boxes",
        "a cat: sitting; on - a mat",
        "Mr. Brown and Dr. Who at St. Louis.",
        "The U.S. flag at 5 p.m.",
        "we're here, aren't we?",
        "A cat sits.\nA dog runs.",
    ]
    try:
        out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    except OSError as e:  # e.g. a read-only site-packages (it writes a temp file beside its jar)
        pytest.skip(f"PTBTokenizer could not run: {e}")
    for i, caption in enumerate(captions):
        assert tokenize(caption) == out[i][0], caption


def test_cider_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, mera.eval.cider as c; c.cider_d({1: 'a b'}, {1: ['a b']}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
