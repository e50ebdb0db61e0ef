"""The feed: one ordered stream of packed rows that every worker group reads by row number.

The token pipeline (a lazy Ray Data dataset, in a fixed order) is read by one small actor on the
head node. It cuts the stream into windows of ``window`` rows and shuffles each window with a seed
made of (seed, epoch, window), so the order depends on the data alone: not on the number of
workers, nor on how Ray cut the blocks. Epochs follow each other with no gap: global row ``g`` is
row ``g mod N`` of epoch ``g // N`` (N rows per epoch).

A step takes the next ``micro x accumulation x world`` rows; rank r reads its contiguous part of
them. The workers keep one number, the rows trained so far (``rows`` in trainer_state), so a run
resumed on another number of workers reads exactly the rows after the ones already trained.

With ``keep`` the rows stay (in the object store, spilling to disk) once read, for later epochs and
for a restart; without it (``data.streaming``) a window goes as soon as every rank has passed it,
and a later epoch (or a rewind after a restart) reads the pipeline again from its start.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

DEFAULT_WINDOW = 256


def window_order(size: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """The order of a window's rows in an epoch: a permutation fixed by (seed, epoch, window)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, window]).permutation(size)


def where(row: int, per_epoch: int | None, window: int) -> tuple[int, int, int]:
    """(epoch, window, position in the window's canonical order before shuffling) of global row
    ``row``; with ``per_epoch`` not known yet, the row is taken to be in epoch 0."""
    epoch, offset = divmod(row, per_epoch) if per_epoch else (0, row)
    return epoch, offset // window, offset % window


def as_column(items: list) -> np.ndarray:
    """A column as Ray Data's numpy batches give it: numbers as an array, lists as an object array."""
    if items and isinstance(items[0], (np.ndarray, list)):
        out = np.empty(len(items), dtype=object)
        out[:] = [np.asarray(x) for x in items]
        return out
    return np.asarray(items)


def cut(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """A batch of rows in ``parts`` equal micro-batches, in order."""
    size = len(next(iter(batch.values()))) // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


class Feed:
    """The actor (``make_feed``). Its methods run one at a time; Ray Data's executor keeps packing
    ahead of the reads in the background, with its own back-pressure."""

    def __init__(self, ds: Any, seed: int, window: int = DEFAULT_WINDOW, keep: bool = True,
                 per_epoch: int | None = None):
        ds.context.execution_options.preserve_order = True
        self.ds, self.seed, self.window, self.keep = ds, seed, window, keep
        self.per_epoch = per_epoch  # N: known from a count, else once the first pass ends
        self.kept: dict[tuple[int, int], Any] = {}  # (pass, window) -> its columns (an ObjectRef), canonical order
        self.decoded: OrderedDict[tuple[int, int], dict] = OrderedDict()  # a few windows at hand
        self.sizes: dict[tuple[int, int], int] = {}
        self.stream: Iterator | None = None
        self.stream_epoch, self.ended = -1, False
        self.next_window = 0  # the next window the stream gives
        self.low: dict[int, int] = {}  # rank -> the first row it asked for last
        self.world = 0
        self.passes = 0  # how many times the pipeline was started

    # ---- what the workers and the driver call --------------------------------------------------

    def fill(self) -> int:
        """Read the whole first pass (kept); returns the rows per epoch."""
        if not (self.stream_epoch == 0 and self.ended):
            self._restart(0, clear=True)
            while self._advance():
                pass
        return self.per_epoch

    def prime(self) -> None:
        """Start the pipeline (the first window), so it packs while the workers start."""
        if self.stream_epoch < 0:
            self._restart(0, clear=True)
            self._advance()

    def rows(self, start: int, count: int, rank: int = 0, world: int = 1, first: bool = False) -> dict[str, np.ndarray]:
        """Global rows [start, start + count) in the run's order; ``first``: the rank's first ask
        in a worker group (a restart may go back to rows let go)."""
        if world != self.world or first:
            self.world, self.low = world, {}
        self.low[rank] = start
        picked: dict[str, list] = {}
        for row in range(start, start + count):
            columns, at = self._locate(row)
            for key, column in columns.items():
                picked.setdefault(key, []).append(column[at])
        self._release()
        return {k: as_column(v) for k, v in picked.items()}

    def info(self) -> dict[str, Any]:
        return {"per_epoch": self.per_epoch, "passes": self.passes, "windows_held": len(self.kept)}

    # ---- inside ------------------------------------------------------------------------------------

    def _locate(self, row: int) -> tuple[dict, int]:
        while True:
            epoch, window, offset = where(row, self.per_epoch, self.window)
            source = 0 if self.keep else epoch  # kept rows serve every epoch
            columns = self._window(source, window)
            if columns is None:  # the first pass ended before this row: N is known now
                continue
            size = self.sizes[(source, window)]
            if offset >= size:  # past the pass's last (short) window: end the pass to learn N
                while self._advance():
                    pass
                continue
            return columns, int(window_order(size, self.seed, epoch, window)[offset])

    def _window(self, source: int, window: int) -> dict | None:
        key = (source, window)
        if key in self.decoded:
            self.decoded.move_to_end(key)
            return self.decoded[key]
        if key in self.kept:
            return self._decode(key)
        if source > self.stream_epoch:  # the next epoch: this one read to its end first (other ranks
            while self.stream_epoch >= 0 and self._advance():  # of the step may still need its last rows)
                pass
            self._restart(source, clear=False)  # the last epoch's windows go as the ranks pass them
        elif source < self.stream_epoch or window < self.next_window:
            self._restart(source, clear=True)  # a rewind to rows let go: read the pipeline again
        while self.next_window <= window:
            if not self._advance():
                return None  # the pass ended before this window: N is known now
        return self._decode(key)

    def _restart(self, epoch: int, clear: bool) -> None:
        self.stream = iter(self.ds.iter_batches(batch_size=self.window, batch_format="numpy", drop_last=False))
        self.stream_epoch, self.next_window, self.ended = epoch, 0, False
        self.passes += 1
        if clear:
            self.kept.clear()
            self.decoded.clear()

    def _advance(self) -> bool:
        """One more window from the stream; False at the end of the pass."""
        import ray

        if self.ended:
            return False
        try:
            batch = next(self.stream)
        except StopIteration:
            self.ended, self.stream = True, None
            total = sum(self.sizes[(self.stream_epoch, w)] for w in range(self.next_window))
            if total == 0:
                raise RuntimeError("feed: the dataset gave no rows") from None
            if self.per_epoch is None:
                self.per_epoch = total
            elif total != self.per_epoch:
                raise RuntimeError(f"feed: the pipeline gave {total} rows this pass, {self.per_epoch} before") from None
            return False
        columns = {k: list(v) for k, v in batch.items()}
        key = (self.stream_epoch, self.next_window)
        self.sizes[key] = len(next(iter(columns.values())))
        self.kept[key] = ray.put(columns)
        self.next_window += 1
        return True

    def _decode(self, key: tuple[int, int]) -> dict:
        import ray

        columns = ray.get(self.kept[key])
        self.decoded[key] = columns
        while len(self.decoded) > 8:
            self.decoded.popitem(last=False)
        return columns

    def _release(self) -> None:
        """Without keep: drop the windows that every rank has passed."""
        if self.keep or len(self.low) < self.world:
            return
        epoch, window, _ = where(min(self.low.values()), self.per_epoch, self.window)
        for key in [k for k in self.kept if k < (epoch, window)]:
            del self.kept[key]
            self.decoded.pop(key, None)


def make_feed(ds: Any, seed: int, window: int = DEFAULT_WINDOW, keep: bool = True, per_epoch: int | None = None):
    """The feed actor, on the head node (a lost worker node does not take it along)."""
    import ray

    from lmflow_ray.credentials import HEAD_RESOURCE

    actor = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001}, max_concurrency=1)(Feed)
    return actor.remote(ds, seed, window, keep, per_epoch)


def rank_steps(feed: Any, plan: Any, step: int, rows: int, rank: int) -> Iterator[tuple[int, list[dict], int]]:
    """(step, its micro-batches, rows trained after it) from ``step`` on, ``rows`` rows already
    trained; the next step's rows are asked for while this one trains."""
    import ray

    mine = plan.micro_batch * plan.accumulation

    def ask(at: int, first: bool = False):
        return feed.rows.remote(at + rank * mine, mine, rank, plan.world_size, first)

    pending = ask(rows, first=True) if step < plan.total_steps else None
    while step < plan.total_steps:
        batch = ray.get(pending)
        rows += plan.step_rows
        if step + 1 < plan.total_steps:
            pending = ask(rows)
        yield step, cut(batch, plan.accumulation), rows
        step += 1
