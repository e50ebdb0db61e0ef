"""Pure choices over scored samples: which to keep (RAFT) and how to pair them (iterative DPO).

A sample is (prompt index, sample index, reward, token count). Rewards are adjusted for length
first (``length_penalty`` per response token, LMFlow's key). Ties go to the earlier sample, so a
choice never depends on anything but the scores and the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

PAIRING = ("max_min", "max_max", "max_random", "random")
COLLECTION = ("local", "top")


@dataclass(frozen=True)
class Scored:
    prompt: int
    sample: int
    reward: float
    tokens: int = 0


def adjusted(samples: Sequence[Scored], length_penalty: float) -> list[Scored]:
    """Each reward minus ``length_penalty`` per response token."""
    if not length_penalty:
        return list(samples)
    return [Scored(s.prompt, s.sample, s.reward - length_penalty * s.tokens, s.tokens) for s in samples]


def by_prompt(samples: Sequence[Scored]) -> dict[int, list[Scored]]:
    groups: dict[int, list[Scored]] = {}
    for s in samples:
        groups.setdefault(s.prompt, []).append(s)
    return {p: sorted(g, key=lambda s: s.sample) for p, g in sorted(groups.items())}


def _best(group: Sequence[Scored]) -> Scored:
    return max(group, key=lambda s: (s.reward, -s.sample))


def keep_local(samples: Sequence[Scored]) -> list[Scored]:
    """RAFT's ``collection_strategy: local``: the best sample of every prompt."""
    return [_best(g) for g in by_prompt(samples).values()]


def keep_top(samples: Sequence[Scored], fraction: float) -> list[Scored]:
    """RAFT's ``collection_strategy: top``: the global top ``fraction`` of all samples (at least one),
    in prompt order. Among equal rewards, every prompt's best sample comes before any prompt's
    second: when many samples are right, the kept set spans as many prompts as it can, instead of
    the K copies of the first few prompts' answer."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top_reward_percentage must be in (0, 1], got {fraction}")
    n = max(1, math.ceil(fraction * len(samples))) if samples else 0
    rank = {(s.prompt, s.sample): r for g in by_prompt(samples).values()
            for r, s in enumerate(sorted(g, key=lambda s: (-s.reward, s.sample)))}
    ranked = sorted(samples, key=lambda s: (-s.reward, rank[(s.prompt, s.sample)], s.prompt, s.sample))[:n]
    return sorted(ranked, key=lambda s: (s.prompt, s.sample))


def collect(samples: Sequence[Scored], strategy: str, fraction: float) -> list[Scored]:
    if strategy == "local":
        return keep_local(samples)
    if strategy == "top":
        return keep_top(samples, fraction)
    raise ValueError(f"collection_strategy must be one of {', '.join(COLLECTION)}, got {strategy!r}")


def pair(group: Sequence[Scored], method: str, rng: random.Random) -> tuple[Scored, Scored] | None:
    """(chosen, rejected) from one prompt's samples by ``sampling_paired_method``, or None when the
    two picked have the same reward (a tie teaches nothing) or there are fewer than two samples.
    max_min: best vs worst; max_max: best vs second best; max_random: best vs a random other;
    random: two random samples, the better one chosen."""
    if len(group) < 2:
        return None
    ranked = sorted(group, key=lambda s: (-s.reward, s.sample))
    if method == "max_min":
        chosen, rejected = ranked[0], min(group, key=lambda s: (s.reward, -s.sample))
    elif method == "max_max":
        chosen, rejected = ranked[0], ranked[1]
    elif method == "max_random":
        chosen = ranked[0]
        rejected = rng.choice([s for s in group if s is not chosen])
    elif method == "random":
        a, b = rng.sample(list(group), 2)
        chosen, rejected = (a, b) if (a.reward, -a.sample) >= (b.reward, -b.sample) else (b, a)
    else:
        raise ValueError(f"sampling_paired_method must be one of {', '.join(PAIRING)}, got {method!r}")
    if chosen.reward == rejected.reward:
        return None
    return chosen, rejected


def make_pairs(samples: Sequence[Scored], method: str, seed: int) -> list[tuple[Scored, Scored]]:
    """One pair per prompt (prompts whose pick ties are left out), in prompt order."""
    rng = random.Random(seed)
    out = []
    for group in by_prompt(samples).values():
        picked = pair(group, method, rng)
        if picked is not None:
            out.append(picked)
    return out
