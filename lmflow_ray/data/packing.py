"""Packing and batching as pure functions.

Conversation / text2text samples are packed whole into rows of at most ``block_size`` tokens
(best fit, longest first). ``lengths`` records the samples in a row; the collate function restarts
position ids at each sample, and transformers then builds a block-diagonal causal mask, so no
sample attends to another (the model must be called with ``attention_mask=None`` and
``use_cache=False``). text_only documents are concatenated and cut into blocks, as LMFlow does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from lmflow_ray.data.tokenize import IGNORE_INDEX, Encoded


@dataclass
class Row:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0  # samples in this row that were cut at block_size

    def add(self, sample: Encoded) -> None:
        self.truncated += sample.truncated
        self.input_ids += sample.input_ids
        # The first token of a sample is never predicted from the previous sample.
        self.labels += [IGNORE_INDEX] + sample.labels[1:]
        self.lengths.append(len(sample.input_ids))


def best_fit(items: list, size, capacity: int) -> list[list]:
    """Best-fit decreasing: each item (of ``size(item)`` tokens) goes to the fullest bin that still
    has room for it; returns the bins' items in the order they went in."""
    bins: list[list] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for item in sorted(items, key=size, reverse=True):
        need = size(item)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, index = free.pop(at)
        else:
            bins.append([])
            room, index = capacity, len(bins) - 1
        bins[index].append(item)
        if room - need > 0:
            bisect.insort(free, (room - need, index))
    return bins


def pack(samples: list[Encoded], block_size: int) -> list[Row]:
    """Samples into rows of at most ``block_size`` tokens, best fit (longest first)."""
    rows = []
    for group in best_fit(samples, lambda s: len(s.input_ids), block_size):
        row = Row()
        for sample in group:
            row.add(sample)
        rows.append(row)
    return rows


def last_reply(labels: list[int]) -> int:
    """Where the last run of trained tokens starts (the final reply), or len(labels) if none."""
    at = len(labels)
    while at > 0 and labels[at - 1] == IGNORE_INDEX:
        at -= 1
    while at > 0 and labels[at - 1] != IGNORE_INDEX:
        at -= 1
    return at if any(label != IGNORE_INDEX for label in labels) else len(labels)


def prepare_side(side: Encoded, block_size: int, mask_prompt: bool, max_prompt_length: int | None) -> Encoded:
    """One side of a preference pair, untruncated in: with ``mask_prompt`` only its final reply is
    trained; ``max_prompt_length`` keeps the prompt's last N tokens (TRL's keep-end). A side still
    longer than ``block_size`` loses the start of its prompt first (the reply is what a pair
    compares), then the end of its reply."""
    ids, labels = list(side.input_ids), list(side.labels)
    reply = last_reply(labels)
    if mask_prompt:
        labels = [IGNORE_INDEX] * reply + labels[reply:]
    cut = reply - max_prompt_length if max_prompt_length is not None and reply > max_prompt_length else 0
    over = len(ids) - cut > block_size
    if over:
        cut = min(reply, len(ids) - block_size)
    ids, labels = ids[cut:], labels[cut:]
    return Encoded(ids[:block_size], labels[:block_size], side.truncated or over)


@dataclass
class PairRow(Row):
    margins: list[float] = field(default_factory=list)

    def add_pair(self, chosen: Encoded, rejected: Encoded, margin: float) -> None:
        self.add(chosen)
        self.add(rejected)
        self.margins.append(margin)


def pack_pairs(pairs: list[tuple[Encoded, Encoded, float]], capacity: int | None) -> list[PairRow]:
    """Preference pairs into rows, each pair whole (its chosen segment, then its rejected one):
    best-fit decreasing into rows of ``capacity`` tokens, or one pair per row (None)."""
    groups = [[p] for p in pairs] if capacity is None else \
        best_fit(pairs, lambda p: len(p[0].input_ids) + len(p[1].input_ids), capacity)
    rows = []
    for group in groups:
        row = PairRow()
        for chosen, rejected, margin in group:
            row.add_pair(chosen, rejected, margin)
        rows.append(row)
    return rows


def one_per_row(samples: list[Encoded]) -> list[Row]:
    """LMFlow's layout: one sample per row (the collate function pads it to the block size)."""
    rows = []
    for sample in samples:
        row = Row()
        row.add(sample)
        rows.append(row)
    return rows


def group_texts(samples: list[Encoded], block_size: int) -> list[Row]:
    """text_only: concatenate every document and cut into block_size rows (the last may be short)."""
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    rows = []
    for start in range(0, len(ids), block_size):
        chunk = ids[start : start + block_size]
        rows.append(Row(chunk, labels[start : start + block_size], [len(chunk)]))
    return rows


def collate(rows: list[dict], pad_token_id: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Rows (dicts with input_ids, labels, lengths) -> padded arrays with per-sample position ids.

    ``pad_to`` fixes the width (LMFlow-style pad-to-block); otherwise the longest row sets it.
    Padding is a segment of its own with label -100, so it changes no loss.
    """
    width = pad_to or max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((n, width), dtype=np.int64)
    for i, row in enumerate(rows):
        size = len(row["input_ids"])
        input_ids[i, :size] = row["input_ids"]
        labels[i, :size] = row["labels"]
        position_ids[i] = np.concatenate(
            [np.arange(length) for length in row["lengths"]] + [np.arange(width - size)]
        )
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_columns(batch: dict, pad_token_id: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """``collate`` for a columnar batch as Ray Data hands it out (``iter_batches`` / ``iter_torch_batches``)."""
    rows = [
        {"input_ids": ids, "labels": labels, "lengths": lengths}
        for ids, labels, lengths in zip(batch["input_ids"], batch["labels"], batch["lengths"])
    ]
    return collate(rows, pad_token_id, pad_to)
