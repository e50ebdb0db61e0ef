"""Scoring, as pure functions: answers read from generated text (LMFlow's answer types text,
multiple_choice, binary_choice, math) and compared with the reference; options picked by their
log-likelihood; NLL and perplexity from token log-probabilities."""

from __future__ import annotations

import math
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def text_match(prediction: str, reference: str) -> bool:
    """Normalised exact match."""
    return normalize_text(prediction) == normalize_text(reference)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The final numeric answer: after GSM8K's ``####``, else after "answer is", else the last
    number in the text."""
    for marker in ("####", "answer is", "answer:"):
        at = text.lower().rfind(marker)
        if at >= 0:
            found = _NUMBER.findall(text[at + len(marker):])
            if found:
                return _number(found[0])
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def math_match(prediction: str, reference: str | float, tolerance: float = 1e-6) -> bool:
    want = reference if isinstance(reference, (int, float)) else extract_number(str(reference))
    got = extract_number(prediction)
    return want is not None and got is not None and math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance)


def extract_choice(text: str, options: Sequence[str]) -> int | None:
    """Which option a generated answer names: a letter such as "(B)", "B." or "Answer: B", or the
    option's own text; None when it names none or several."""
    letters = string.ascii_uppercase[: len(options)]
    head = text.strip()
    m = re.match(rf"^\(?([{letters}])(?:[\).:\s]|$)", head) or \
        re.search(rf"answer(?: is)?[:\s]*\(?([{letters}])\b", head, re.I)
    if m:
        return letters.index(m.group(1).upper())
    said = normalize_text(head)
    hits = [i for i, option in enumerate(options)
            if normalize_text(option) and re.search(rf"\b{re.escape(normalize_text(option))}\b", said)]
    return hits[0] if len(hits) == 1 else None


def extract_binary(text: str) -> bool | None:
    """yes / no (true / false) from the first word that says so."""
    for word in normalize_text(text).split():
        if word in ("yes", "true", "correct"):
            return True
        if word in ("no", "false", "incorrect"):
            return False
    return None


def pick_option(option_logprobs: Sequence[Sequence[float]], length_normalized: bool = False) -> int:
    """The option whose tokens the model finds most likely (sum of log-probs, or their mean)."""
    def score(lp: Sequence[float]) -> float:
        total = float(sum(lp))
        return total / max(1, len(lp)) if length_normalized else total

    return max(range(len(option_logprobs)), key=lambda i: score(option_logprobs[i]))


def nll(token_logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token."""
    if not token_logprobs:
        raise ValueError("no tokens to score")
    return -float(sum(token_logprobs)) / len(token_logprobs)


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean NLL) over a whole set: pass the summed NLL and the token count."""
    if tokens <= 0:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / tokens)


def accuracy(correct: Sequence[bool]) -> float:
    return sum(bool(c) for c in correct) / len(correct) if correct else 0.0


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\).:]\s+(.+?)\s*$", re.M)
BINARY_OPTIONS = ("yes", "no")


def parse_options(text: str) -> list[str]:
    """Options listed in a question as lines "(A) ...", "A. ..." or "A) ...", from A on; [] if none."""
    found: list[str] = []
    for letter, option in _OPTION_LINE.findall(text):
        if ord(letter) - ord("A") == len(found):
            found.append(option)
    return found if len(found) >= 2 else []


def reference_option(answer_type: str, reference: str, options: Sequence[str]) -> int | None:
    """Which option the reference answer names (a letter, the option's text, or yes / no)."""
    picked = extract_choice(reference, options)
    if picked is None and answer_type == "binary_choice":
        said = extract_binary(reference)
        picked = None if said is None else (0 if said else 1)
    return picked


def judge(answer_type: str, prediction: str, reference: str, options: Sequence[str] = ()) -> bool:
    """Whether a generated answer is right, read the way ``answer_type`` says."""
    if answer_type == "text":
        return text_match(prediction, reference)
    if answer_type == "math":
        return math_match(prediction, reference)
    if answer_type == "binary_choice" and tuple(options) == BINARY_OPTIONS:
        want, got = extract_binary(reference), extract_binary(prediction)
        return want is not None and got == want
    want = reference_option(answer_type, reference, options)
    return want is not None and extract_choice(prediction, options) == want
