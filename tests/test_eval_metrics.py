"""Evaluation metrics on hand-made cases with known answers."""

import math

import pytest

from lmflow_ray.eval.metrics import (
    accuracy, extract_binary, extract_choice, extract_number, math_match, nll, normalize_text, perplexity,
    pick_option, text_match,
)


@pytest.mark.parametrize("prediction,reference,same", [
    ("The order is ORD-123456.", "the order is ord123456", True),
    ("  Paris ", "paris", True),
    ("An apple", "apple", True),
    ("ORD-123456", "ORD-123457", False),
    ("Paris, France", "Paris", False),
])
def test_text_answers_match_after_normalisation(prediction, reference, same):
    assert text_match(prediction, reference) is same


def test_normalize_text():
    assert normalize_text("The  Quick, brown FOX!") == "quick brown fox"


@pytest.mark.parametrize("text,number", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", 12.0),
    ("So the answer is 1,250.", 1250.0),
    ("Answer: -3.5 (rounded)", -3.5),
    ("First 2 then 7 then 41", 41.0),
    ("no digits here", None),
])
def test_math_answers_take_the_final_number(text, number):
    assert extract_number(text) == number


def test_math_match():
    assert math_match("It costs 18 dollars in total. #### 18", "#### 18")
    assert math_match("the answer is 0.5", 0.5)
    assert not math_match("the answer is 19", "#### 18")
    assert not math_match("I do not know", "#### 18")


@pytest.mark.parametrize("text,index", [
    ("(B) because ...", 1), ("C. Mitochondria", 2), ("The answer is A", 0), ("answer: d", 3),
    ("It is the mitochondria.", 2), ("Either ribosome or nucleus", None), ("Z", None),
])
def test_multiple_choice_answers_by_generation(text, index):
    options = ["ribosome", "nucleus", "mitochondria", "golgi apparatus"]
    assert extract_choice(text, options) == index


@pytest.mark.parametrize("text,value", [("Yes, it is.", True), ("no.", False), ("It is false", False), ("maybe", None)])
def test_binary_answers_by_generation(text, value):
    assert extract_binary(text) is value


def test_options_by_log_likelihood():
    options = [[-1.0, -1.0, -1.0], [-2.5], [-0.5, -0.5, -0.5, -0.5, -4.0]]
    assert pick_option(options) == 1  # sum: -3.0, -2.5, -6.0
    assert pick_option(options, length_normalized=True) == 0  # mean: -1.0, -2.5, -1.2


def test_nll_ppl_and_accuracy():
    logprobs = [math.log(0.5), math.log(0.25)]
    assert nll(logprobs) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert perplexity(-sum(logprobs), 2) == pytest.approx(math.sqrt(8))
    assert accuracy([True, False, True, True]) == 0.75 and accuracy([]) == 0.0
    with pytest.raises(ValueError):
        nll([])


def test_judge_reads_each_answer_type():
    from lmflow_ray.eval.metrics import judge, parse_options

    assert judge("text", "ORD-123456", "ord 123456") is False and judge("text", "ORD-123456", "ord-123456.") is True
    assert judge("math", "3 + 4 = 7, so the answer is 7.", "#### 7") is True
    assert judge("math", "about 8", "#### 7") is False
    opts = parse_options("Which colour?\n(A) red\n(B) blue\nC. green\nAnswer:")
    assert opts == ["red", "blue", "green"]
    assert judge("multiple_choice", "(B)", "B", opts) and judge("multiple_choice", "It is blue.", "(B)", opts)
    assert not judge("multiple_choice", "(A) or (B)", "B", opts)  # names several: no answer
    assert judge("binary_choice", "Yes, it arrived.", "yes", ["yes", "no"])
    assert not judge("binary_choice", "No.", "yes", ["yes", "no"])
    assert judge("pubmedqa", "Maybe: the evidence is mixed.", "maybe", ["yes", "no", "maybe"])
    assert not judge("pubmedqa", "no", "maybe", ["yes", "no", "maybe"])
    # Options are matched as whole words: "not" and "know" do not say "no".
    assert not judge("pubmedqa", "I do not know", "no", ["yes", "no", "maybe"])


def test_lmflow_metric_and_answer_type_names_are_accepted():
    from lmflow_ray.config import load_recipe
    from lmflow_ray.errors import UserError

    assert load_recipe(None, ["--metric", "accuracy"]).eval.metric == ["acc"]
    assert load_recipe(None, ["metric=accuracy,nll"]).eval.metric == ["acc", "nll"]
    assert load_recipe(None, ["--answer_type", "gsm8k"]).eval.answer_type == "math"
    assert load_recipe(None, ["--answer_type", "medmcqa"]).eval.answer_type == "multiple_choice"
    assert load_recipe(None, ["--answer_type", "usmle"]).eval.answer_type == "multiple_choice"
    assert load_recipe(None, ["--answer_type", "pubmedqa"]).eval.answer_type == "pubmedqa"
    with pytest.raises(UserError, match="answer_type"):
        load_recipe(None, ["answer_type=essay"])
