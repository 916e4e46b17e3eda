"""The reference reward and evaluation rules: tables worked out by hand from MemAgent's rules.

Training reward of the reference (its HotpotQA reward): the last 300 characters of the response, lower-cased; the
last ``\\boxed``; the answer and each ground truth (lower-cased) lose spaces and newlines (and a few LaTeX
spellings) and must then be equal.  Evaluation: text after the last ``</think>``, last boxed answer, SQuAD
normalisation, F1 with HotpotQA's yes/no/noanswer rule.
"""

import importlib.util
import os

import pytest

from memagent_jax.evaluation import verifier as V

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (response, ground truths, reference_boxed reward, boxed_em reward): each worked out by hand.
REWARD_TABLE = [
    # Articles and punctuation are kept by the reference, dropped by ours.
    ("\\boxed{The Hop-Frog}", ["Hop-Frog"], 0.0, 1.0),
    ("\\boxed{Hop-Frog}", ["Hop-Frog"], 1.0, 1.0),
    ("\\boxed{Paris.}", ["Paris"], 0.0, 1.0),
    # Spaces and newlines go: "hop frog" == "hopfrog" for the reference; ours keeps word boundaries.
    ("\\boxed{Hop Frog}", ["hopfrog"], 1.0, 0.0),
    ("\\boxed{a\nb}", ["ab"], 1.0, 0.0),
    # Case never matters.
    ("\\boxed{PARIS}", ["paris"], 1.0, 1.0),
    ("\\boxed{paris}", ["PARIS"], 1.0, 1.0),
    # Any ground truth may match.
    ("\\boxed{Hop-Frog}", ["Lyon", "hop-frog"], 1.0, 1.0),
    # The 300-character window: a box that ends 300 characters before the end is not seen, nor one cut in two.
    ("\\boxed{Paris}" + "x" * 300, ["Paris"], 0.0, 1.0),
    ("\\boxed{Paris}" + "x" * 295, ["Paris"], 0.0, 1.0),  # window starts inside the command ("aris}xxx...")
    ("y" * 1000 + "\\boxed{Paris}" + "x" * 287, ["Paris"], 1.0, 1.0),  # 13 + 287 = 300: fully inside
    # Only the last \boxed is tried: an unclosed last box hides a complete earlier one (ours skips it).
    ("\\boxed{Paris} then \\boxed{Lyo", ["Paris"], 0.0, 1.0),
    ("\\boxed{Lyon} \\boxed{Paris}", ["Paris"], 1.0, 1.0),
    ("\\boxed{Paris} \\boxed{Lyon}", ["Paris"], 0.0, 0.0),
    # \fbox is found but fails the reference's "\boxed{" check; ours accepts it.
    ("\\fbox{Paris}", ["Paris"], 0.0, 1.0),
    # "\boxed " with a space: everything after the last one up to the first "$".
    ("so \\boxed Paris$ and more", ["Paris"], 1.0, 0.0),
    ("\\boxed {Paris}", ["Paris"], 0.0, 1.0),  # the answer is "{paris}", braces and all
    # LaTeX spellings: \dfrac -> \frac, \% dropped, " ." -> " 0.".
    ("\\boxed{\\dfrac{1}{2}}", ["\\frac{1}{2}"], 1.0, 0.0),
    ("\\boxed{10\\%}", ["10"], 1.0, 1.0),
    ("\\boxed{x .5}", ["x0.5"], 1.0, 0.0),
    ("\\boxed{.5}", ["0.5"], 0.0, 0.0),  # "{." only applies inside the extracted text, which has no "{"
    # An empty box equals an all-space ground truth for the reference (both become ""); never for ours.
    ("\\boxed{}", [" "], 1.0, 0.0),
    # Nothing boxed.
    ("Paris", ["Paris"], 0.0, 0.0),
    ("", ["Paris"], 0.0, 0.0),
    ("\\boxed{Paris}", [], 0.0, 0.0),
]


@pytest.mark.parametrize("response,gts,reference,ours", REWARD_TABLE)
def test_reward_table_reference_vs_ours(response, gts, reference, ours):
    assert V.reward(response, gts, style="reference_boxed") == reference
    assert V.reference_boxed_reward(response, gts) == reference
    assert V.reward(response, gts, style="boxed_em") == ours


def test_reference_reward_single_string_is_one_ground_truth():
    assert V.reward("\\boxed{Hop-Frog}", "Hop-Frog", style="reference_boxed") == 1.0
    assert V.reward("\\boxed{H}", "Hop-Frog", style="reference_boxed") == 0.0  # not iterated character-wise


def test_reward_drop_think_is_an_option_off_by_default():
    thinking = "<think>maybe \\boxed{Paris}?</think> I am not sure."
    for style in ("reference_boxed", "boxed_em"):
        assert V.reward(thinking, ["Paris"], style=style) == 1.0  # the reference scores the whole response
        assert V.reward(thinking, ["Paris"], style=style, drop_think=True) == 0.0
    answered = "<think>\\boxed{Lyon}</think>\n\\boxed{Paris}"
    assert V.reward(answered, ["Paris"], style="reference_boxed", drop_think=True) == 1.0
    assert V.reward(answered, ["Lyon"], style="reference_boxed", drop_think=True) == 0.0


STRIP_THINK_CASES = [
    ("plain answer", "plain answer"),  # no closing tag: unchanged
    ("<think>a</think> b ", "b"),
    ("<think>a</think>x</think>\n y\n", "y"),  # after the last closing tag
    ("<think>\\boxed{a}</think>  ", "<think>\\boxed{a}</think>  "),  # nothing after: the whole text (as the reference)
    ("<think>unclosed \\boxed{a}", "<think>unclosed \\boxed{a}"),
]


@pytest.mark.parametrize("text,expected", STRIP_THINK_CASES)
def test_strip_think_table(text, expected):
    assert V.strip_think(text) == expected


def test_evaluation_drops_the_think_block():
    inside = "<think>It could be \\boxed{Paris}.</think> The answer is \\boxed{Lyon}"
    assert V.extract_prediction(inside) == "Lyon"
    assert V.score(inside, ["Paris"], "sub_em") == 0.0
    assert V.score(inside, ["Lyon"], "em") == 1.0
    assert V.extract_prediction(inside, drop_think=False) == "Lyon"
    only_inside = "<think>It is \\boxed{Paris}.</think> Not sure."
    assert V.score(only_inside, ["Paris"], "em") == 0.0
    assert V.score(only_inside, ["Paris"], "em", drop_think=False) == 1.0
    assert V.extract_prediction(only_inside, "raw") == "Not sure."


# (prediction, ground truths, f1): HotpotQA's rule, by hand.
F1_TABLE = [
    ("yes and others", ["yes"], 0.0),  # 0.5 without the yes/no rule
    ("yes", ["yes and others"], 0.0),  # a yes/no prediction against a longer gold
    ("Yes.", ["yes"], 1.0),
    ("no", ["no way"], 0.0),
    ("No answer", ["noanswer"], 0.0),  # "no answer" != "noanswer"
    ("noanswer", ["NoAnswer"], 1.0),
    ("yes", ["no", "yes"], 1.0),  # best over the ground truths
    ("red car", ["no red car"], 0.8),  # no rule: P = 1, R = 2/3
    ("not yes", ["yes"], 0.0),
    ("the red car", ["a red bus"], 0.5),
]


@pytest.mark.parametrize("pred,gts,expected", F1_TABLE)
def test_f1_yes_no_rule_table(pred, gts, expected):
    assert V.f1(pred, gts) == pytest.approx(expected)


def test_yes_no_rule_leaves_em_and_sub_em_alone():
    assert V.exact_match("yes and others", ["yes"]) == 0.0
    assert V.sub_exact_match("yes and others", ["yes"]) == 1.0


def _config(name, arg=""):
    return importlib.import_module(f"memagent_jax.configs.{name}").get_config(arg)


def test_reference_recipe_configs_use_the_reference_reward():
    for name in ("qwen2_5_7b_hotpotqa", "qwen2_5_14b_hotpotqa", "qwen3_4b_hotpotqa", "qwen3_8b_hotpotqa"):
        cfg = _config(name)
        assert cfg.data.reward_style == "reference_boxed", name
        assert cfg.data.reward_drop_think is False, name
    assert _config("grpo").data.reward_style == "reference_boxed"
    assert _config("grpo", "cpu").data.reward_style == "boxed_em"


def test_reward_scorer_passes_drop_think():
    from memagent_jax.rl.rollout import RewardScorer

    scorer = RewardScorer("reference_boxed", drop_think=True)
    try:
        rewards, accuracy = scorer.submit(
            ["<think>\\boxed{a}</think> \\boxed{b}", "\\boxed{The Paris}"], [["a"], ["Paris"]]
        ).result()
    finally:
        scorer.close()
    assert rewards.tolist() == [0.0, 0.0]  # 'b' is not 'a'; 'the paris' keeps its article
    assert accuracy.tolist() == [0.0, 1.0]


# (final response, answers, em, f1, sub_em) as the evaluation scores them, worked out by hand from the rules above.
EVAL_TABLE = [
    ("<think>Is it \\boxed{no}?</think>\n\\boxed{Yes and others}", ["yes"], 0.0, 0.0, 1.0),
    ("<think>\\boxed{Hop-Frog}</think> so \\boxed{The Hop-Frog!}", ["Hop-Frog"], 1.0, 1.0, 1.0),
    ("<think>\\boxed{Hop-Frog}</think> I could not decide.", ["Hop-Frog"], 0.0, 0.0, 0.0),
    ("\\boxed{red sports car}", ["the red car"], 0.0, 0.8, 0.0),  # P = 2/3, R = 1 -> F1 = 0.8
]


@pytest.mark.parametrize("response,answers,em,f1,sub_em", EVAL_TABLE)
def test_evaluation_scores_table(response, answers, em, f1, sub_em):
    from memagent_jax.evaluation import score_response

    scores = score_response(response, answers, "sub_em")["scores"]
    assert (scores["em"], scores["sub_em"], scores["accuracy"]) == (em, sub_em, sub_em)
    assert scores["f1"] == pytest.approx(f1)
