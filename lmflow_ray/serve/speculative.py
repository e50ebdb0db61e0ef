"""Speculative decoding for the transformers engine: each row of the running batch gets up to
``gamma`` proposed tokens (from an n-gram match in its own prompt and output, or from a small draft
model), the target scores all of them in one forward, and the row keeps the longest prefix the
target agrees with plus the target's own next token. Greedy rows come out token for token as plain
decoding; sampled rows use the rejection rule for a proposal that is one token (accept it with the
target's probability, else sample from the target with that token taken out), which keeps the
target's distribution. The pieces here are pure (no engine state), so they are tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable


def _follow(source: list[int], tail: list[int], k: int, stop: int) -> list[int]:
    """The ``k`` tokens after the earliest occurrence of ``tail`` in ``source`` starting before ``stop``."""
    n, first = len(tail), tail[0]
    for start in range(0, stop):
        if source[start] == first and source[start:start + n] == tail:
            follow = source[start + n:start + n + k]
            if follow:
                return follow
    return []


def ngram_proposal(seq: list[int], k: int, max_n: int = 3, min_n: int = 1,
                   recent: Iterable[list[int]] = ()) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the earliest earlier occurrence of the
    sequence's last n tokens, trying the longest n first (``max_n`` down to ``min_n``). Where the
    sequence itself has no match, ``recent`` replies (newest first) are looked in the same way, for
    at most n + 1 tokens: another request's reply shares the form of this one (a template's
    `ORD-`), rarely its particulars, and a rejected proposal costs verify time."""
    if k <= 0:
        return []
    size = len(seq)
    lengths = range(min(max_n, size - 1), min_n - 1, -1)
    for n in lengths:
        follow = _follow(seq, seq[size - n:], k, size - n)
        if follow:
            return follow
    recent = list(recent)
    for n in lengths:
        for reply in recent:
            follow = _follow(reply, seq[size - n:], min(k, n + 1), len(reply) - n)
            if follow:
                return follow
    return []


@dataclass
class Verdict:
    """What one row keeps from a verify forward: ``tokens`` (the accepted proposals, then the
    target's own token); token i was chosen from window position i's logits."""

    tokens: list[int]
    accepted: int  # drafts kept


def accept(draft: list[int], logits: Any, pick: Callable[[Any], Any] | None, generator: Any = None) -> Verdict:
    """Check ``draft`` against the target's ``logits`` (one row per window position: position j
    predicts the token after draft[:j]). ``pick`` is None for greedy, else it turns a logits row
    into the target's sampling probabilities (temperature, top_p)."""
    import torch

    tokens: list[int] = []
    for j, proposed in enumerate(draft):
        if pick is None:
            best = int(logits[j].argmax())
            if best != proposed:
                return Verdict(tokens + [best], j)
            tokens.append(proposed)
            continue
        probs = pick(logits[j])
        if float(torch.rand((), generator=generator)) < float(probs[proposed]):
            tokens.append(proposed)
            continue
        probs = probs.clone()
        probs[proposed] = 0.0
        if float(probs.sum()) <= 0.0:  # the target puts all its mass on the proposal (top_p)
            tokens.append(proposed)
            continue
        return Verdict(tokens + [int(torch.multinomial(probs / probs.sum(), 1, generator=generator))], j)
    last = logits[len(draft)]
    bonus = int(last.argmax()) if pick is None else int(torch.multinomial(pick(last), 1, generator=generator))
    return Verdict(tokens + [bonus], len(draft))


@dataclass
class Counters:
    """Speculation figures for /health and the benchmark."""

    verify_forwards: int = 0  # target forwards that checked proposals
    plain_forwards: int = 0  # decode forwards with nothing proposed
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # proposals kept
    emitted: int = 0  # tokens produced by decode forwards (kept proposals + the target's own)
    row_steps: int = 0  # rows decoded, summed over decode forwards (plain decoding: one token each)
    draft_forwards: int = 0  # draft model forwards

    def describe(self, method: str, gamma: int) -> dict[str, Any]:
        return {"method": method, "num_speculative_tokens": gamma, "verify_forwards": self.verify_forwards,
                "plain_forwards": self.plain_forwards, "draft_forwards": self.draft_forwards,
                "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
                "tokens_per_target_forward": round(self.emitted / self.row_steps, 3) if self.row_steps else None}
