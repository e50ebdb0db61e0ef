"""Prefix caching for the transformers engine: the KV of recent prompts, per adapter, so a new
prompt that begins like one of them (the same system prompt and template header, an earlier turn of
the same chat) prefills only what differs. Entries are whole prompts, dropped least recently used
first to keep at most ``max_tokens`` cached tokens; a prompt that extends an entry replaces it.
The bookkeeping here holds no tensors of its own making and is tested alone; the engine copies the
KV in and out.
"""

from __future__ import annotations

import collections
from typing import Any


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n and a[0] != b[0]:
        return 0
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(a[:mid]) == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Recent prompts' KV per adapter; ``find`` gives the entry sharing the longest prefix."""

    def __init__(self, max_tokens: int, min_tokens: int = 16):
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.entries: collections.OrderedDict[tuple[str | None, tuple[int, ...]], Any] = collections.OrderedDict()
        self.tokens = 0
        self.lookups = self.hits = self.reused_tokens = self.prompt_tokens = 0

    def find(self, adapter: str | None, ids: list[int]) -> tuple[Any, int]:
        """(the entry's KV, the number of its tokens to reuse), or (None, 0). At least one prompt
        token is always left to prefill: its logits give the first reply token."""
        self.lookups += 1
        self.prompt_tokens += len(ids)
        best, n = None, 0
        for key in self.entries:
            if key[0] == adapter:
                m = common_prefix(key[1], ids)
                if m > n:
                    best, n = key, m
        n = min(n, len(ids) - 1)
        if best is None or n < self.min_tokens:
            return None, 0
        self.entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += n
        return self.entries[best], n

    def add(self, adapter: str | None, ids: list[int], kv: Any) -> None:
        """Keep ``kv`` (the KV of all of ``ids``); entries it extends are dropped."""
        if len(ids) > self.max_tokens or len(ids) < self.min_tokens:
            return
        key = (adapter, tuple(ids))
        for old in [k for k in self.entries if k[0] == adapter and len(k[1]) <= len(ids) and key[1][:len(k[1])] == k[1]]:
            self._drop(old)
        self.entries[key] = kv
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[str | None, tuple[int, ...]]) -> None:
        del self.entries[key]
        self.tokens -= len(key[1])

    def describe(self) -> dict[str, Any]:
        return {"entries": len(self.entries), "cached_tokens": self.tokens, "max_tokens": self.max_tokens,
                "lookups": self.lookups, "hits": self.hits, "reused_prompt_tokens": self.reused_tokens,
                "prompt_tokens": self.prompt_tokens}
