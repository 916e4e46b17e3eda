"""Tests of memagent_jax.evaluation.verifier: extraction, normalisation, metrics, rewards."""

import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memagent_jax.evaluation import verifier as V

# ---------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------

BOXED_CASES = [
    (r"\boxed{Paris}", "Paris"),
    (r"so the result is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{{{deep}}}", "{{deep}}"),
    (r"\boxed{a} then \boxed{b}", "b"),  # several: the last wins
    (r"\boxed{a \boxed{b}}", "b"),  # nested command: the one starting last
    (r"\boxed{a} and a truncated \boxed{b", "a"),  # unclosed last command is skipped
    (r"\boxed{", None),
    (r"no box here", None),
    ("", None),
    (r"\fbox{framed}", "framed"),
    (r"\boxed{x} \fbox{y}", "y"),
    (r"\boxed {spaced}", "spaced"),
    (r"\boxed{}", ""),
    (r"}}} \boxed{ok} }}}", "ok"),
    (r"\boxed{a}\boxed{b{}", "a"),  # b's brace closes only the inner '{'
    (r"\boxed{日本語}", "日本語"),
    (r"\boxed{ Yes }", " Yes "),
    (r"\boxedx{no}", None),
    (r"\boxed{\text{New York City}}", r"\text{New York City}"),
    ("\\boxed{first line\nsecond line}", "first line\nsecond line"),
]


@pytest.mark.parametrize("text,expected", BOXED_CASES)
def test_extract_boxed_table(text, expected):
    assert V.extract_boxed(text) == expected


def _reference_boxed(text: str):
    """Naive stack-based definition of the same rule, quadratic-free but slow (for comparison)."""
    import re

    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)[ \t]*\{", text):
        depth = 0
        for q in range(m.end() - 1, len(text)):
            if text[q] == "{":
                depth += 1
            elif text[q] == "}":
                depth -= 1
                if depth == 0:
                    best = text[m.end() : q]
                    break
    return best


_BOX_ALPHABET = st.sampled_from(["\\boxed{", "\\fbox{", "{", "}", "a", "b", " ", "\\", "\\boxed", "\\boxed {"])


@given(st.lists(_BOX_ALPHABET, max_size=40).map("".join))
@settings(max_examples=400, deadline=None)
def test_extract_boxed_matches_naive_definition(text):
    assert V.extract_boxed(text) == _reference_boxed(text)


# ---------------------------------------------------------------------------------------------
# extract_answer_phrase
# ---------------------------------------------------------------------------------------------

PHRASE_CASES = [
    ("The answer is Paris.", "Paris"),
    ("THE ANSWER IS: 42", "42"),
    ("the answer is x. Wait, the answer is y.", "y"),
    ("So the  answer\nis **Rome**.\nDone.", "Rome"),
    ("The answer is\nnext line", None),  # nothing on the rest of the line
    ("no phrase", None),
    ("the answer is ", None),
    ('The answer is "Lyon"', "Lyon"),
    ("the answer is São Paulo.", "São Paulo"),
]


@pytest.mark.parametrize("text,expected", PHRASE_CASES)
def test_extract_answer_phrase_table(text, expected):
    assert V.extract_answer_phrase(text) == expected


def test_extract_prediction_modes():
    r = "Thinking... the answer is Rome. Final: \\boxed{Paris}"
    assert V.extract_prediction(r, "boxed") == "Paris"
    assert V.extract_prediction(r, "answer_phrase") == "Rome. Final: \\boxed{Paris}"
    assert V.extract_prediction("the answer is Rome", "boxed_or_phrase") == "Rome"
    assert V.extract_prediction("plain text", "boxed_or_raw") == "plain text"
    assert V.extract_prediction("plain text", "boxed") is None
    with pytest.raises(ValueError):
        V.extract_prediction("x", "nope")


# ---------------------------------------------------------------------------------------------
# normalisation and metrics
# ---------------------------------------------------------------------------------------------

NORMALIZE_CASES = [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   Apple, a Day!! ", "apple day"),
    ("Theatre", "theatre"),  # 'the' only as a whole word
    ("A.B.C.", "abc"),
    ("“Quoted” — text…", "quoted text"),  # Unicode punctuation
    ("São Paulo", "são paulo"),
    ("ÉCOLE", "école"),
    ("the the a an", ""),
    ("$1,000", "1000"),
    ("yes.", "yes"),
    ("Tab\tand\nnewline", "tab and newline"),
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize_table(text, expected):
    assert V.normalize_answer(text) == expected


METRIC_CASES = [
    # (prediction, ground truths, em, sub_em, f1)
    ("Paris", ["paris"], 1.0, 1.0, 1.0),
    ("The Paris.", ["paris"], 1.0, 1.0, 1.0),
    ("Paris, France", ["Paris"], 0.0, 1.0, 2 * (1 / 2 * 1) / (1 / 2 + 1)),
    ("Lyon", ["Paris", "Lyon"], 1.0, 1.0, 1.0),  # several ground truths: max
    ("Marseille", ["Paris", "Lyon"], 0.0, 0.0, 0.0),
    ("the red car", ["a red bus"], 0.0, 0.0, 0.5),
    ("yes", ["no"], 0.0, 0.0, 0.0),
    ("no", ["no"], 1.0, 1.0, 1.0),
    ("", ["paris"], 0.0, 0.0, 0.0),
    ("the", ["the"], 0.0, 0.0, 0.0),  # both normalise to "": never a match
    ("...", ["paris"], 0.0, 0.0, 0.0),
    ("par", ["Paris"], 0.0, 1.0, 0.0),  # character containment, as in the reference
    ("北京", ["北京"], 1.0, 1.0, 1.0),
    ("cat cat dog", ["cat dog dog"], 0.0, 0.0, 2 / 3),  # P = R = 2/3
]


@pytest.mark.parametrize("pred,gts,em,sub,f1", METRIC_CASES)
def test_metrics_table(pred, gts, em, sub, f1):
    assert V.exact_match(pred, gts) == em
    assert V.sub_exact_match(pred, gts) == sub
    assert V.f1(pred, gts) == pytest.approx(f1)


def test_ground_truths_may_be_one_string_or_array():
    import numpy as np

    assert V.exact_match("paris", "Paris") == 1.0
    assert V.exact_match("paris", np.array(["Lyon", "Paris"])) == 1.0
    assert V.exact_match("paris", ()) == 0.0
    assert V.exact_match(None, ["x"]) == 0.0


STRING_MATCH_CASES = [
    ("codes: 123 and 456", ["123", "456"], 1.0),
    ("codes: 123", ["123", "456"], 0.5),
    ("ABC def", ["abc", "DEF", "ghi"], 2 / 3),
    ("anything", [], 0.0),
    ("anything", ["", "any"], 0.5),  # an empty reference never counts
]


@pytest.mark.parametrize("pred,refs,expected", STRING_MATCH_CASES)
def test_string_match_all_table(pred, refs, expected):
    assert V.string_match_all(pred, refs) == pytest.approx(expected)


def test_score():
    assert V.score("\\boxed{in Paris}", ["Paris"], metric="sub_em") == 1.0
    assert V.score("\\boxed{in Paris}", ["Paris"], metric="em") == 0.0
    assert V.score("no box", ["no box"], metric="em") == 0.0
    assert V.score("no box", ["no box"], metric="em", extract="raw") == 1.0
    with pytest.raises(ValueError):
        V.score("x", ["x"], metric="bleu")


# ---------------------------------------------------------------------------------------------
# reward
# ---------------------------------------------------------------------------------------------

REWARD_CASES = [
    # (response, ground truths, style, reward)
    ("reasoning ... \\boxed{Paris}", ["Paris"], "boxed_em", 1.0),
    ("\\boxed{The Paris!}", ["paris"], "boxed_em", 1.0),
    ("\\boxed{Paris} \\boxed{Lyon}", ["Paris"], "boxed_em", 0.0),  # last box counts
    ("\\boxed{Lyon} \\boxed{Paris}", ["Paris"], "boxed_em", 1.0),
    ("Paris", ["Paris"], "boxed_em", 0.0),  # no boxed answer
    ("\\boxed{}", [""], "boxed_em", 0.0),
    ("\\boxed{Yes}", ["yes"], "boxed_em", 1.0),
    ("\\boxed{no}", ["yes"], "boxed_em", 0.0),
    ("\\boxed{Paris, France}", ["Paris"], "boxed_em", 0.0),
    ("\\boxed{Paris, France}", ["Paris"], "boxed_sub_em", 1.0),
    ("\\boxed{Marseille}", ["Paris", "Marseille"], "boxed_em", 1.0),
    ("the answer is Paris.", ["Paris"], "answer_phrase_em", 1.0),
    ("the answer is Paris.", ["Paris"], "any_em", 1.0),
    ("the answer is Lyon. \\boxed{Paris}", ["Paris"], "any_em", 1.0),
    ("\\boxed{Zürich}", ["zürich"], "boxed_em", 1.0),
    ("\\boxed{1234567, 7654321}", ["7654321", "1234567"], "boxed_all", 1.0),
    ("\\boxed{1234567}", ["7654321", "1234567"], "boxed_all", 0.0),
]


@pytest.mark.parametrize("response,gts,style,expected", REWARD_CASES)
def test_reward_table(response, gts, style, expected):
    assert V.reward(response, gts, style=style) == expected


def test_reward_default_is_boxed_em_and_unknown_style_raises():
    assert V.reward("\\boxed{a b}", ["A B"]) == 1.0
    assert V.reward("\\boxed{a b c}", ["A B"]) == 0.0
    with pytest.raises(ValueError):
        V.reward("x", ["x"], style="format_bonus")


# ---------------------------------------------------------------------------------------------
# properties: never raises, idempotent normalisation
# ---------------------------------------------------------------------------------------------

_ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200)
_NASTY = st.lists(
    st.sampled_from(
        ["\\boxed{", "\\fbox{", "{", "}", "\\", "the answer is", "The", "a", " ", "\n", "é", "\ud800", "ǅ", "İ", "ß"]
    ),
    max_size=60,
).map("".join)


@given(st.one_of(_ANY_TEXT, _NASTY), st.lists(st.one_of(_ANY_TEXT, _NASTY), max_size=3))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example("\\boxed{\ud800}", ["\ud800"])
def test_never_raises(text, gts):
    assert V.extract_boxed(text) is None or isinstance(V.extract_boxed(text), str)
    assert V.extract_answer_phrase(text) is None or isinstance(V.extract_answer_phrase(text), str)
    assert isinstance(V.normalize_answer(text), str)
    for fn in (V.exact_match, V.f1, V.sub_exact_match, V.string_match_all):
        value = fn(text, gts)
        assert 0.0 <= value <= 1.0
    for style in V.REWARD_STYLES:
        assert V.reward(text, gts, style=style) in (0.0, 1.0)


@given(st.one_of(_ANY_TEXT, _NASTY))
@settings(max_examples=500, deadline=None)
@example("the a the")
@example("İstanbul")
@example("a.the")
def test_normalize_idempotent(text):
    once = V.normalize_answer(text)
    assert V.normalize_answer(once) == once


@given(st.one_of(_ANY_TEXT, _NASTY))
@settings(max_examples=200, deadline=None)
def test_boxed_self_consistency(answer):
    """Boxing a brace-balanced answer and extracting gives it back; reward of the gold is 1."""
    if answer.count("{") != answer.count("}") or "\\boxed" in answer or "\\fbox" in answer:
        return
    depth = 0
    for ch in answer:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return
    assert V.extract_boxed("blah \\boxed{" + answer + "} end") == answer
    if V.normalize_answer(answer):
        assert V.reward("\\boxed{" + answer + "}", [answer]) == 1.0


# ---------------------------------------------------------------------------------------------
# adversarial timing and import hygiene
# ---------------------------------------------------------------------------------------------

ADVERSARIAL = {
    "open_braces": "{" * 1_000_000,
    "close_braces": "}" * 1_000_000,
    "backslashes": "\\" * 1_000_000,
    "boxed_openers": "\\boxed{" * 150_000,
    "boxed_no_brace": "\\boxed" * 170_000,
    "nested_unclosed": ("\\boxed{" + "{" * 100) * 9_000,
    "boxed_spaces": "\\boxed" + " " * 1_000_000,
    "phrases": "the answer is " * 75_000,
    "mixed": ("\\boxed{a}}{{\\fbox{ the answer is \\" * 30_000),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_megabyte_is_fast(name):
    text = ADVERSARIAL[name]
    assert len(text) >= 900_000
    t0 = time.perf_counter()
    V.extract_boxed(text)
    V.extract_answer_phrase(text)
    V.normalize_answer(text)
    V.sub_exact_match(text, ["x"])
    V.f1(text, ["x y"])
    for style in V.REWARD_STYLES:
        V.reward(text, ["x"], style=style)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s"


def test_verifier_imports_no_jax():
    code = (
        "import sys, memagent_jax.evaluation.verifier; "
        "assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules), 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resolve_reward_style():
    assert V.resolve_reward_style("rule") == "boxed_em"
    assert V.resolve_reward_style(None, default="any_em") == "any_em"
    assert V.resolve_reward_style("boxed_all") == "boxed_all"
    with pytest.raises(ValueError):
        V.resolve_reward_style("rule", default="nope")


def test_readable_answer_is_the_extraction_without_surrounding_space():
    """What answer surfaces show: `\\boxed{ Ra}` (the main job's answers copy the notes' " Ra" token) reads "Ra";
    the scores are those of the unstripped extraction (every metric normalises white space)."""
    from memagent_jax.evaluation.verifier import extract_prediction, readable_answer, score

    assert extract_prediction("\\boxed{ Ra}") == " Ra" and readable_answer("\\boxed{ Ra}") == "Ra"
    assert readable_answer("no box here") is None and readable_answer("x", "raw") == "x"
    assert readable_answer("<think>\\boxed{A}</think> the answer is  Bo ", "answer_phrase") == "Bo"
    for metric in ("em", "sub_em", "f1", "string_match_all"):
        assert score("\\boxed{ Ra}", ["Ra"], metric) == score("\\boxed{Ra}", ["Ra"], metric) == 1.0
