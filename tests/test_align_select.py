"""RAFT's keeping and iterative DPO's pairing, as pure functions on hand-made scores."""

import random

import pytest

from lmflow_ray.align.select import Scored, adjusted, collect, keep_local, keep_top, make_pairs, pair


def group(prompt, rewards, tokens=None):
    return [Scored(prompt, i, r, (tokens or [0] * len(rewards))[i]) for i, r in enumerate(rewards)]


SAMPLES = group(0, [0.1, 0.9, 0.5, 0.9]) + group(1, [-1.0, -0.2, -0.5, -0.3]) + group(2, [0.0, 0.0, 0.0, 0.7])


def test_local_keeps_each_prompts_best_and_the_earlier_of_a_tie():
    kept = keep_local(SAMPLES)
    assert [(s.prompt, s.sample) for s in kept] == [(0, 1), (1, 1), (2, 3)]


def test_top_keeps_the_global_share_in_prompt_order():
    kept = keep_top(SAMPLES, 0.25)  # 3 of 12
    assert [(s.prompt, s.sample) for s in kept] == [(0, 1), (0, 3), (2, 3)]
    assert [(s.prompt, s.sample) for s in keep_top(SAMPLES, 0.01)] == [(0, 1)]  # at least one
    assert len(keep_top(SAMPLES, 1.0)) == 12
    with pytest.raises(ValueError):
        keep_top(SAMPLES, 0.0)
    assert collect(SAMPLES, "top", 0.25) == kept
    # Equal rewards: each prompt's best comes before any prompt's second best.
    right = group(0, [1.0, 1.0, 1.0]) + group(1, [1.0, 1.0, 0.0]) + group(2, [0.0, 1.0, 0.5])
    assert [(s.prompt, s.sample) for s in keep_top(right, 3 / 9)] == [(0, 0), (1, 0), (2, 1)]
    assert [(s.prompt, s.sample) for s in keep_top(right, 5 / 9)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)]
    with pytest.raises(ValueError, match="collection_strategy"):
        collect(SAMPLES, "best", 0.25)


def test_length_penalty_turns_a_tie_to_the_shorter_answer():
    two = group(0, [1.0, 1.0], tokens=[12, 4])
    assert keep_local(two)[0].sample == 0
    assert keep_local(adjusted(two, 0.01))[0].sample == 1
    assert adjusted(two, 0.01)[0].reward == pytest.approx(0.88)
    assert adjusted(two, 0.0) == two


def test_pairing_methods_on_hand_made_scores():
    g = group(0, [0.2, 0.9, -0.4, 0.5])
    rng = random.Random(0)
    c, r = pair(g, "max_min", rng)
    assert (c.sample, r.sample) == (1, 2)
    c, r = pair(g, "max_max", rng)
    assert (c.sample, r.sample) == (1, 3)
    for seed in range(20):  # max_random: always the best, against any other
        c, r = pair(g, "max_random", random.Random(seed))
        assert c.sample == 1 and r.sample in (0, 2, 3)
    seen = set()
    for seed in range(40):  # random: two distinct samples, the better one chosen
        c, r = pair(g, "random", random.Random(seed))
        assert c.reward > r.reward and c.sample != r.sample
        seen.add((c.sample, r.sample))
    assert len(seen) == 6  # every pair of the four comes up
    with pytest.raises(ValueError, match="sampling_paired_method"):
        pair(g, "min_max", rng)


def test_ties_and_single_samples_make_no_pair():
    assert pair(group(0, [0.3, 0.3, 0.3]), "max_min", random.Random(0)) is None
    assert pair(group(0, [0.3]), "max_min", random.Random(0)) is None
    pairs = make_pairs(SAMPLES, "max_max", seed=1)  # prompt 0's best two tie at 0.9
    assert [(c.prompt, c.sample, r.sample) for c, r in pairs] == [(1, 1, 3), (2, 3, 0)]
    assert make_pairs(SAMPLES, "max_random", seed=3) == make_pairs(SAMPLES, "max_random", seed=3)
