"""Kept prompt prefills: the KV of earlier prompts, reused by prompts that start the same way.

An entry is the one-row cache a finished prefill leaves behind (model/runner.py
keeps it instead of dropping it: no copy at store time) with the prompt's ids
and vision mask. A new prompt reuses the longest entry whose tokens it starts
with: multi-turn chats and follow-up questions about one video then prefill
only what is new.

Keyed by token ids *and* the vision mask: a media part enters the prompt as
its VQGAN codes, so equal ids mean equal content, sampling and VQGAN (the
vision cache's key), and the same id as text or as a code are different
tokens. Equal tokens give equal keys/values for the same weights, so reuse is
exact.

Memory: least recently used entries go first once the bytes kept exceed the
budget. An entry in use (`acquire`d: being copied into a new prefill, or
pinned by a session) is never evicted. Host-side bookkeeping only: the caller
(the engine's single worker thread) serialises every call, and a lock guards
the counters read from other threads.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class PrefixEntry:
    """One kept prefill: tokens [n] in slots offset..offset+n of `cache` (one row)."""

    ids: np.ndarray
    vision_mask: np.ndarray
    cache: Any
    offset: int
    nbytes: int
    key: int = 0
    refs: int = 0
    pins: set[str] = field(default_factory=set)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def evictable(self) -> bool:
        return self.refs == 0 and not self.pins


def common_prefix(a_ids: np.ndarray, a_mask: np.ndarray, b_ids: np.ndarray, b_mask: np.ndarray) -> int:
    """How many leading tokens two prompts share (id and vision flag)."""
    n = min(len(a_ids), len(b_ids))
    differ = (a_ids[:n] != b_ids[:n]) | (a_mask[:n] != b_mask[:n])
    hits = np.flatnonzero(differ)
    return int(hits[0]) if hits.size else n


def cache_nbytes(cache: Any) -> int:
    return int(sum(x.nbytes for x in (*cache.k, *cache.v)) + cache.valid.nbytes + cache.index.nbytes)


@dataclass
class PrefixStats:
    entries: int
    bytes: int
    budget: int
    queries: int          # prompts looked up
    query_tokens: int     # their tokens
    hit_tokens: int       # tokens served from kept prefills
    hits: int             # lookups that reused something
    evictions: int


class PrefixCache:
    """LRU store of prompt prefills under a byte budget.

    Args:
      budget_bytes: most bytes of kept caches (0 disables keeping).
      min_reuse: shortest shared prefix worth reusing (shorter ones are recomputed).
    """

    def __init__(self, budget_bytes: int, min_reuse: int = 16) -> None:
        self.budget, self.min_reuse = budget_bytes, min_reuse
        self._entries: collections.OrderedDict[int, PrefixEntry] = collections.OrderedDict()
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self._bytes = 0
        self._queries = self._query_tokens = self._hit_tokens = self._hits = self._evictions = 0
        self._too_big = 0  # the largest prefill refused for its size (each larger one is logged)

    # ------------------------------------------------------------------ lookup

    def lookup(self, ids: np.ndarray, vision_mask: np.ndarray) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with a prompt, and that length.

        The entry comes back acquired (call `release` when its cache was copied);
        (None, 0) when no entry shares `min_reuse` tokens.
        """
        best, best_len = None, 0
        with self._lock:
            for entry in self._entries.values():
                n = common_prefix(entry.ids, entry.vision_mask, ids, vision_mask)
                if n > best_len:
                    best, best_len = entry, n
            self._queries += 1
            self._query_tokens += len(ids)
            if best is None or best_len < self.min_reuse:
                return None, 0
            best.refs += 1
            self._entries.move_to_end(best.key)
            return best, best_len

    def record_hit(self, tokens: int) -> None:
        """Counts tokens actually served from an entry (the caller may reuse fewer than matched)."""
        if tokens > 0:
            with self._lock:
                self._hits += 1
                self._hit_tokens += tokens

    def release(self, entry: PrefixEntry) -> None:
        with self._lock:
            entry.refs = max(0, entry.refs - 1)
            self._evict()

    # ------------------------------------------------------------------ store

    def store(self, ids: np.ndarray, vision_mask: np.ndarray, cache: Any, offset: int) -> PrefixEntry | None:
        """Keeps a finished prefill; returns its entry (None when it cannot fit the budget).

        A prompt equal to a kept one replaces it (the newer cache); a kept prompt
        that is a strict prefix of this one is dropped when evictable, since this
        entry serves every prompt it served.
        """
        nbytes = cache_nbytes(cache)
        if nbytes > self.budget:
            if self.budget and nbytes > self._too_big:
                self._too_big = nbytes
                logger.warning("a prefill of %d tokens (%.0f MiB of keys and values) does not fit the prefix "
                               "cache (%.0f MiB): it is not kept, so a follow-up on it prefills it all again; "
                               "raise --prefix-cache-bytes", len(ids), nbytes / 2**20, self.budget / 2**20)
            return None
        ids, vision_mask = np.asarray(ids, np.int32).copy(), np.asarray(vision_mask, bool).copy()
        with self._lock:
            for key, old in list(self._entries.items()):
                shared = common_prefix(old.ids, old.vision_mask, ids, vision_mask)
                if shared == old.length and old.length <= len(ids) and old.evictable and not old.pins:
                    self._drop(key)
            entry = PrefixEntry(ids, vision_mask, cache, offset, nbytes, key=next(self._keys))
            self._entries[entry.key] = entry
            self._bytes += nbytes
            self._evict()
            return entry if entry.key in self._entries else None

    def pin(self, entry: PrefixEntry, owner: str) -> None:
        with self._lock:
            entry.pins.add(owner)

    def unpin(self, owner: str) -> None:
        """Releases every entry pinned by `owner` (a session that ended)."""
        with self._lock:
            for entry in self._entries.values():
                entry.pins.discard(owner)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.evictable]:
                self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes

    def _evict(self) -> None:
        for key in list(self._entries):
            if self._bytes <= self.budget:
                return
            if self._entries[key].evictable:
                self._drop(key)
                self._evictions += 1

    # ------------------------------------------------------------------ introspection

    def stats(self) -> PrefixStats:
        with self._lock:
            return PrefixStats(len(self._entries), self._bytes, self.budget, self._queries,
                               self._query_tokens, self._hit_tokens, self._hits, self._evictions)

    def in_use(self) -> int:
        """Entries acquired right now (0 whenever no prefill is being set up)."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.refs)
