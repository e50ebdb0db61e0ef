"""The feed (train/feed.py): the run's one ordered stream of packed rows, read by row number. On a
real local Ray cluster with real Ray Data datasets; no training."""

import numpy as np
import pytest

from lmflow_ray.config import TrainSection
from lmflow_ray.train.feed import cut, make_feed, rank_steps, where, window_order
from lmflow_ray.train.plan import make_plan

N = 50  # rows per epoch


def rows_ds(ray, blocks: int):
    items = [{"input_ids": [i] * (i % 3 + 1), "n": i} for i in range(N)]
    return ray.data.from_items(items, override_num_blocks=blocks)


def read_run(feed, groups, train):
    """Every rank's rows, step by step, for worker groups of the given sizes, each going on
    (as a restart would) from the rows the last one trained; returns the row numbers in order."""
    import ray

    plan = make_plan(N, groups[0][0], train)
    step = rows = 0
    seen = []
    for world, steps in groups:
        plan = plan.for_world(world, step, rows)
        readers = [rank_steps(feed, plan, step, rows, rank) for rank in range(world)]
        for _ in range(steps):
            parts = [next(r) for r in readers]
            assert len({(s, done) for s, _, done in parts}) == 1  # every rank at the same step and row count
            for _, micro, _ in parts:
                assert len(micro) == plan.accumulation and all(len(m["n"]) == plan.micro_batch for m in micro)
                seen += [int(x) for m in micro for x in m["n"]]
            step, rows = parts[0][0] + 1, parts[0][2]
        del readers
    ray.get(feed.info.remote())
    return seen, plan


def test_rows_are_dealt_once_per_epoch_in_an_order_no_worker_count_or_block_size_changes(ray_local):
    train = TrainSection(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=3)
    kept = make_feed(rows_ds(ray_local, 7), seed=3, window=16)
    # 2 workers for 5 steps (8 rows a step), then 3 workers (12 a step), then 1 (4): the rows go on where they stopped.
    seen, plan = read_run(kept, [(2, 5), (3, 6), (1, 7)], train)
    assert len(seen) == 40 + 72 + 28 == 140
    by_epoch = [seen[i:i + N] for i in range(0, 100, N)]
    assert all(sorted(e) == list(range(N)) for e in by_epoch)  # every row once in each epoch
    assert by_epoch[0] != by_epoch[1] and by_epoch[0] != list(range(N))  # shuffled, each epoch its own way
    # One worker all along reads the same rows in the same order: the order is the data's alone ...
    alone, _ = read_run(make_feed(rows_ds(ray_local, 2), seed=3, window=16), [(1, 35)], train)
    assert alone == seen
    # ... and streaming (no rows kept, the pipeline read again each epoch) deals them alike.
    streamed = make_feed(rows_ds(ray_local, 5), seed=3, window=16, keep=False, per_epoch=N)
    again, _ = read_run(streamed, [(2, 5), (3, 6), (1, 7)], train)
    assert again == seen
    info = ray_local.get(streamed.info.remote())
    assert info["passes"] == 3 and info["windows_held"] <= 3  # one pass per epoch; passed windows let go
    assert ray_local.get(kept.info.remote())["passes"] == 1


def test_a_restart_goes_back_to_its_checkpoint_rows_even_after_streaming_let_them_go(ray_local):
    train = TrainSection(per_device_train_batch_size=3, max_steps=40)
    feed = make_feed(rows_ds(ray_local, 4), seed=0, window=8, keep=False)  # not counted: N found at the end
    plan = make_plan(None, 2, train)
    first = [rank_steps(feed, plan, 0, 0, rank) for rank in range(2)]
    ahead = [[next(r) for _ in range(12)] for r in first]  # 72 rows: into epoch 2 (N learnt at the end of 1)
    assert ray_local.get(feed.info.remote())["per_epoch"] == N
    again = [rank_steps(feed, plan, 4, 24, rank) for rank in range(2)]  # back to the step-4 checkpoint
    redo = [[next(r) for _ in range(8)] for r in again]
    for rank in range(2):
        old = [m["n"].tolist() for _, micro, _ in ahead[rank][4:] for m in micro]
        new = [m["n"].tolist() for _, micro, _ in redo[rank] for m in micro]
        assert new == old
    assert [type(x) for x in ahead[0][0][1][0]["input_ids"]] == [np.ndarray] * 3  # lists come as arrays


def test_order_and_cutting_are_pure():
    assert where(123, 50, 16) == (2, 1, 7) and where(123, None, 16) == (0, 7, 11)
    assert sorted(window_order(16, 1, 0, 0)) == list(range(16))
    assert (window_order(16, 1, 0, 0) == window_order(16, 1, 0, 0)).all()
    assert not (window_order(16, 1, 0, 0) == window_order(16, 1, 1, 0)).all()
    parts = cut({"n": np.arange(6)}, 3)
    assert [p["n"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError):
        make_plan(None, 1, TrainSection())
