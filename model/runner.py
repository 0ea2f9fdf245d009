"""The slot pool: one KV cache allocated once, rows handed to requests as they come and go.

Host-side driver over the jitted steps of model/steps.py, shared by the serving
engine (server/engine/) and the one-request `Generator` (model/generation.py).

* A prompt is prefilled on its own into a one-row scratch cache
  (`start_prefill` + `prefill_step`, one chunk per call, so the engine can
  interleave chunks with decode steps), then copied into a free row of the pool
  (`insert`). The finished scratch is what the prefix cache keeps.
* `decode` runs one token for every occupied row. Rows are allocated lowest
  first and the step runs over the first R rows, R rounded up to a power of
  two; attention reads the pool in place up to the furthest live slot, found at
  run time (model/attention.py `decode_key_block`): one compiled step per R, and
  a lightly loaded pool costs what its live requests need.

Why one-row prefills and not paged blocks: each prompt then compiles to the
same few (chunk, length) shapes whatever else runs, a finished prefill *is* a
prefix-cache entry (no block tables, no copy when kept), and the pool stays the
plain [B, K, S, D] layout that the sequence-sharded decode already handles.
The price is one copy of the prompt's cache into the pool (memory-bound, small
next to the prefill that made it).

Shapes: every prefill step, row copy and insert runs at one of a bounded set of
shapes, each a job of `precompile_jobs` (the server runs those of short prompts
before it says it is ready and the rest in idle time), so no request (a follow-up
question on a kept video above all) waits for a compile:

* pieces (tokens per prefill step): powers of two from `MIN_PIECE` up to
  the chunk, and the chunk;
* scratch lengths (slots of a one-row prefill cache): the chunk times 1, 2, 3,
  4, 6, 8, 12, ... (two per octave), capped at the pool's row length.
  `prefill_lengths()` lists them; a kept prefix is copied into a scratch at
  least as long as itself.

Chunk plan (`chunk_plan`): a prompt of n tokens is prefilled in whole chunks;
the rest is one piece that *ends* at the prompt's last token and starts inside
what came before if need be (those tokens are written again with identical
values). A fresh prompt shorter than a chunk is ONE left-padded piece (its tokens
start at slot `offset`) when that costs no more tokens than starting with the
largest piece it fills and ending with a tail: a 43-token chat turn is one step
of 64 tokens, not two of 32 (each a step that a burst of requests waits for),
nor a 128-token bucket. So no prompt pays more than one piece of padding or
recomputation, and a follow-up question recomputes ~32-64 tokens, not a bucket.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lwm_serve.model import sharding as sharding_lib
from lwm_serve.model import steps
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.kv_cache import KVCache, init_cache
from lwm_serve.model.params import Params
from lwm_serve.model.prefix_cache import PrefixCache, PrefixEntry

logger = logging.getLogger(__name__)

Head = Literal["text", "vision"]
MIN_PIECE = 32  # the smallest prefill piece, a fresh prompt's or a tail's


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def fresh_min(prefill_chunk: int) -> int:
    """The smallest first piece of a fresh prompt (shorter prompts are left-padded to it)."""
    return min(MIN_PIECE, prefill_chunk)


def piece_sizes(prefill_chunk: int) -> list[int]:
    """Tokens a prefill step may run: powers of two from MIN_PIECE, and the chunk."""
    sizes, p = [], min(MIN_PIECE, prefill_chunk)
    while p < prefill_chunk:
        sizes.append(p)
        p *= 2
    return sizes + [prefill_chunk]


def _tail_plan(n: int, done: int, prefill_chunk: int) -> list[tuple[int, int]]:
    """Whole chunks from `done`, then one piece ending at token n (starting inside what came
    before if need be); from 0, a prompt under a chunk starts with the largest piece it fills."""
    chunks, chunk = [], prefill_chunk
    while n - done >= chunk:
        chunks.append((done, chunk))
        done += chunk
    if done == n:
        return chunks
    pieces = piece_sizes(chunk)
    if done == 0:
        p = max(x for x in pieces if x <= n)
        chunks.append((0, p))
        done = p
        if done == n:
            return chunks
    t = min(x for x in pieces if x >= n - done)
    chunks.append((n - t, t))
    return chunks


def _one_piece(n: int, prefill_chunk: int) -> int | None:
    """The one left-padded piece a fresh n-token prompt is prefilled in, when that costs no
    more tokens than `_tail_plan`'s pieces (a prompt then takes one engine step, not two:
    a burst of short chats is admitted twice as fast); None otherwise."""
    if n >= prefill_chunk:
        return None
    t = min(prefill_chunk, next_power_of_two(max(n, fresh_min(prefill_chunk))))
    if n > fresh_min(prefill_chunk) and t > sum(size for _, size in _tail_plan(n, 0, prefill_chunk)):
        return None
    return t


def prompt_offset(n: int, prefill_chunk: int) -> int:
    """Left padding of a fresh n-token prompt: one prefilled in one piece fills it from the right."""
    t = _one_piece(n, prefill_chunk)
    return 0 if t is None else t - n


def max_prompt_offset(prefill_chunk: int) -> int:
    """The most left padding a fresh prompt gets (pool rows have room for it)."""
    return max(prompt_offset(n, prefill_chunk) for n in range(1, prefill_chunk + 1))


def pool_slots(n: int, prefill_chunk: int) -> int:
    """Pool slots a fresh n-token prompt occupies before its first new token."""
    return prompt_offset(n, prefill_chunk) + n


def chunk_plan(n: int, done: int, prefill_chunk: int) -> list[tuple[int, int]]:
    """(first token index, tokens) of each prefill step for tokens done..n of a prompt.

    Indexes count from the prompt's first token: a fresh prompt prefilled in one
    piece (`_one_piece`) starts below 0 (left padding); a last piece may start
    before `done` (recomputing tokens already there).
    """
    if done == 0 and (t := _one_piece(n, prefill_chunk)) is not None:
        return [(n - t, t)]
    return _tail_plan(n, done, prefill_chunk)


@dataclass
class PrefillTask:
    """One prompt being prefilled into its own one-row cache.

    Slots offset..offset+n of `cache` hold the prompt's n tokens once done;
    `reused` of them came from the prefix cache.
    """

    ids: np.ndarray
    vision_mask: np.ndarray
    head: Head
    cache: KVCache
    offset: int
    done: int = 0
    reused: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (first slot, tokens) still to run
    chunks_total: int = 0
    logits: jax.Array | None = None

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def complete(self) -> bool:
        return not self.chunks and self.logits is not None

    @property
    def chunks_done(self) -> int:
        return self.chunks_total - len(self.chunks)


@dataclass(frozen=True)
class PrecompileJob:
    """One shape to compile: `length` is the longest scratch it uses (0: a decode step)."""

    length: int
    run: Callable[[], object]


class SlotPool:
    """A pool of `num_slots` cache rows of `max_length` slots each, and its prefill tasks.

    Args:
      params, cfg: the model (per-layer params: see `params.unstack_layers`).
      num_slots: rows of the pool (the most sequences decoding at once).
      max_length: slots per row (prompt + generation + the left padding of short prompts).
      prefill_chunk: most prompt tokens per prefill step.
      mesh: the dp,fsdp,tp,sp mesh (sequence-sharded pool and scratch) or None.
      prefix_cache: where finished prefills are kept and looked up (None: never reused).
    """

    def __init__(self, params: Params, cfg: ModelConfig, *, num_slots: int, max_length: int,
                 prefill_chunk: int, mesh: Mesh | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.params, self.cfg, self.mesh = params, cfg, mesh
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.num_slots = num_slots
        self.max_length = self._round_length(max_length)
        self.pool = self._new_cache(num_slots, self.max_length)
        self.index = np.zeros(num_slots, np.int64)      # next slot each row writes (host mirror)
        self.position = np.zeros(num_slots, np.int32)   # next RoPE position of each row
        self.used = np.zeros(num_slots, bool)
        self.precompile_logits: dict[int, jax.Array] = {}
        self._jobs: dict[Head, list[PrecompileJob]] = {}

    # ------------------------------------------------------------------ layout

    def _round_length(self, n: int) -> int:
        mult = 1 if self.mesh is None else sharding_lib.cache_length_multiple(self.mesh)
        return -(-n // mult) * mult

    def _new_cache(self, rows: int, length: int) -> KVCache:
        if self.mesh is None:
            return init_cache(self.cfg, rows, length)
        return sharding_lib.init_sharded_cache(self.cfg, rows, length, self.mesh)

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of keys and values per cache slot (all layers, one row)."""
        per = 2 * self.cfg.num_hidden_layers * self.cfg.kv_heads * self.cfg.head_dim
        return per * jnp.dtype(self.pool.k[0].dtype).itemsize

    # ------------------------------------------------------------------ rows

    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.used)]

    def allocate(self, count: int) -> list[int] | None:
        """The `count` lowest free rows (marked used), or None when too few are free."""
        free = self.free_slots()
        if len(free) < count:
            return None
        rows = free[:count]
        self.used[rows] = True
        return rows

    def release(self, rows: list[int]) -> None:
        self.used[rows] = False

    # ------------------------------------------------------------------ prefill

    def _plan(self, n: int, done: int, offset: int) -> list[tuple[int, int]]:
        return [(offset + first, t) for first, t in chunk_plan(n, done, self.prefill_chunk)]

    def prefill_lengths(self) -> list[int]:
        """Every scratch length a prefill may use (see `scratch_length`)."""
        lengths, k = [], 1
        while True:
            length = self._round_length(min(self.max_length, k * self.prefill_chunk))
            lengths.append(length)
            if length >= self.max_length:
                return sorted(set(lengths))
            k = k * 4 // 3 if k >= 3 and k & (k - 1) else (k * 3 // 2 if k >= 2 else k + 1)

    def scratch_length(self, slots: int) -> int:
        """The one-row cache a prompt occupying `slots` slots is prefilled into: the
        shortest of `prefill_lengths()` that holds it (few shapes to compile)."""
        for length in self.prefill_lengths():
            if length >= slots:
                return length
        raise ValueError(f"a prompt of {slots} slots does not fit rows of {self.max_length}")

    def start_prefill(self, ids, vision_mask, head: Head = "text", reuse: bool = True) -> PrefillTask:
        """A task for one prompt, starting from the longest kept prefix that fits."""
        ids = np.asarray(ids, np.int32)
        vision_mask = np.asarray(vision_mask, bool)
        n = len(ids)
        if n == 0:
            raise ValueError("empty prompt")
        entry, shared = (None, 0)
        if reuse and self.prefix_cache is not None:
            entry, shared = self.prefix_cache.lookup(ids, vision_mask)
        try:
            if entry is not None:
                task = self._from_entry(ids, vision_mask, head, entry, shared)
                if task is not None:
                    self.prefix_cache.record_hit(task.reused)
                    return task
            offset = prompt_offset(n, self.prefill_chunk)
            task = PrefillTask(ids, vision_mask, head, self._new_cache(1, self.scratch_length(offset + n)), offset)
            task.chunks = self._plan(n, 0, offset)
            task.chunks_total = len(task.chunks)
            return task
        finally:
            if entry is not None:
                self.prefix_cache.release(entry)

    def _from_entry(self, ids, vision_mask, head, entry: PrefixEntry, shared: int) -> PrefillTask | None:
        n, offset = len(ids), entry.offset
        # The last token is always recomputed: its logits start the generation.
        reuse = min(shared, n - 1)
        chunks = self._plan(n, reuse, offset)
        if not chunks or chunks[0][0] < 0:
            return None  # the new part needs a chunk reaching before the prompt: start afresh
        reuse = min(reuse, chunks[0][0] - offset)  # the last chunk may start inside the kept part
        if reuse <= 0:
            return None
        # Never shorter than the entry (a prompt that branches off inside it): one resize
        # shape per pair of lengths going up, not every pair.
        length = max(entry.cache.max_length, self.scratch_length(offset + n))
        cache = self._resize(entry.cache, offset + reuse, length)
        task = PrefillTask(ids, vision_mask, head, cache, offset, done=reuse, reused=reuse,
                           chunks=chunks, chunks_total=len(chunks))
        return task

    def prefill_step(self, task: PrefillTask) -> bool:
        """Runs the task's next chunk; True once the prompt is complete (logits ready)."""
        start, t = task.chunks.pop(0)
        first = start - task.offset                     # token index of the chunk's first slot
        idx = np.arange(first, first + t)
        real = idx >= 0
        tokens = np.where(real, task.ids[np.maximum(idx, 0)], 0).astype(np.int32)[None]
        vmask = (real & task.vision_mask[np.maximum(idx, 0)])[None]
        positions = np.maximum(idx, 0).astype(np.int32)[None]
        task.logits, task.cache = self._prefill_into(task.cache, tokens, vmask, real[None], positions, start, task.head)
        task.done = max(task.done, first + t)
        if task.chunks:
            task.logits = None
        return task.complete

    # The device calls of a prefill, one place each, so `precompile` builds exactly the
    # executables that serving looks up (same argument types, shapes and placement).

    def _prefill_into(self, cache: KVCache, tokens: np.ndarray, vmask: np.ndarray, real: np.ndarray,
                      positions: np.ndarray, start: int, head: Head) -> tuple[jax.Array, KVCache]:
        return steps.prefill_into(
            self.params, self.cfg, jnp.asarray(tokens), jnp.asarray(vmask), jnp.asarray(real.astype(np.int32)),
            jnp.asarray(positions), cache, jnp.asarray([start], jnp.int32), head, self.mesh)

    def _resize(self, cache: KVCache, keep: int, length: int) -> KVCache:
        return steps.resize_row(cache, jnp.asarray(keep, jnp.int32), length, self.mesh)

    def _insert_row(self, cache: KVCache, row: int) -> None:
        self.pool = steps.insert_row(self.pool, cache, jnp.asarray(row, jnp.int32), self.mesh)

    def keep(self, task: PrefillTask) -> PrefixEntry | None:
        """Offers a finished prefill to the prefix cache (it keeps the cache, no copy);
        the entry, or None when it was not kept."""
        if self.prefix_cache is None or not task.complete:
            return None
        return self.prefix_cache.store(task.ids, task.vision_mask, task.cache, task.offset)

    def insert(self, task: PrefillTask, row: int) -> None:
        """Copies a finished prefill into pool row `row`; the row decodes from there."""
        if task.cache.max_length > self.max_length:
            raise ValueError(f"a prefill of {task.cache.max_length} slots does not fit rows of "
                             f"{self.max_length}")
        self._insert_row(task.cache, row)
        self.index[row] = task.offset + task.length
        self.position[row] = task.length

    # ------------------------------------------------------------------ decode

    def decode(self, tokens: dict[int, int], head: Head = "text") -> jax.Array:
        """One step for the rows in `tokens` (row -> the token it feeds).

        Returns logits [R, V] for pool rows 0..R-1 (rows not fed are junk). Each
        fed row writes its next slot and advances; the caller checks that rows
        have room (`room`).
        """
        rows, feed, positions, active = self._decode_inputs(tokens)
        logits = self._decode_rows(feed, positions, active[:rows], head)
        self._advance(rows, active)
        return logits

    def _decode_rows(self, feed: np.ndarray, positions: np.ndarray, active: np.ndarray, head: Head) -> jax.Array:
        logits, self.pool = steps.decode_rows(
            self.params, self.cfg, jnp.asarray(feed), jnp.asarray(positions), jnp.asarray(active), self.pool,
            head, self.mesh)
        return logits

    def _decode_inputs(self, tokens: dict[int, int]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(rows R run, the [R] fed tokens, the [R] positions, the [num_slots] active mask) of a step.

        Every array is a fresh one that nothing writes to later. On the CPU, JAX may
        use a host array's memory without copying it and read it only when the step
        runs, after earlier steps finish: handing it a view of `self.position`, which
        `_advance` then bumps in place, made a queued step read the next positions
        (wrong logits, at random; jax-ml/jax#37830).
        """
        active = np.zeros(self.num_slots, bool)
        active[list(tokens)] = True
        rows = self.num_slots if self.mesh is not None else min(self.num_slots, next_power_of_two(max(tokens) + 1))
        feed = np.zeros(rows, np.int32)
        for row, tok in tokens.items():
            feed[row] = tok
        return rows, feed, self.position[:rows].copy(), active

    def _advance(self, rows: int, active: np.ndarray) -> None:
        self.index[:rows] += 1
        self.position[active] += 1

    def decode_mixed(self, tokens: dict[int, int], vision_rows: set[int]) -> dict[Head, jax.Array]:
        """`decode` for rows of both kinds: rows in `vision_rows` feed vision tokens.

        Returns {"text": [R, V], "vision": [R, V_vision]} (each row reads its head's).
        """
        rows, feed, positions, active = self._decode_inputs(tokens)
        is_vision = np.zeros(rows, bool)
        is_vision[list(vision_rows)] = True
        text, vision, self.pool = steps.decode_rows_mixed(
            self.params, self.cfg, jnp.asarray(feed), jnp.asarray(is_vision), jnp.asarray(positions),
            jnp.asarray(active[:rows]), self.pool, self.mesh)
        self._advance(rows, active)
        return {"text": text, "vision": vision}

    def decode_shapes(self) -> list[int]:
        """Every row count R a decode step can take (powers of two, then all rows): what
        `precompile` builds. The slots read are decided at run time, not compiled for."""
        if self.mesh is not None:
            return [self.num_slots]
        rows, r = [], 1
        while r < self.num_slots:
            rows.append(r)
            r *= 2
        return rows + [self.num_slots]

    def precompile_jobs(self, head: Head = "text") -> list[PrecompileJob]:
        """Every prefill, resize, insert and decode shape, one job each, in the order to run
        them: decode steps first, then scratch lengths shortest first (a job's `length` is
        the longest scratch it uses, 0 for decode), so a caller can compile the shapes of
        short prompts before serving and the rest later (`run_precompile_job`).

        Each shape runs as a real call on scratch buffers, not `lower().compile()`:
        that is what fills the jitted functions' own call caches. The logits of each
        decode width are left in `precompile_logits` (rows -> [rows, V]): junk values of
        exactly the type the sampler meets (placement included)."""
        jobs: list[PrecompileJob] = []
        for rows in self.decode_shapes():
            jobs.append(PrecompileJob(0, functools.partial(self._precompile_decode, rows, head)))
        lengths = self.prefill_lengths()
        for i, length in enumerate(lengths):
            for source in lengths[:i + 1]:  # a kept prefix copied into this scratch length
                jobs.append(PrecompileJob(length, functools.partial(self._precompile_resize, source, length)))
            for t in (p for p in piece_sizes(self.prefill_chunk) if p <= length):
                # a piece on a fresh scratch and on one that came out of a jitted step
                # (a resized prefix, an earlier piece): the two kinds of input a prefill meets
                for fresh in (True, False):
                    jobs.append(PrecompileJob(length, functools.partial(self._precompile_piece, length, t,
                                                                        fresh, head)))
            # an empty scratch into row 0 (left empty: valid all False)
            jobs.append(PrecompileJob(length, functools.partial(self._precompile_insert, length)))
        return jobs

    def run_precompile_job(self, index: int, head: Head = "text") -> None:
        """Runs job `index` of `precompile_jobs(head)` (the list is built once per head).
        Only while no row is in use: the steps write junk into row 0 and empty slots."""
        if self.used.any():
            raise RuntimeError("precompile jobs run only while no row is in use")
        self.job_list(head)[index].run()

    def job_list(self, head: Head = "text") -> list[PrecompileJob]:
        """`precompile_jobs(head)`, listed once per pool."""
        if head not in self._jobs:
            self._jobs[head] = self.precompile_jobs(head)
        return self._jobs[head]

    def precompile(self, head: Head = "text") -> int:
        """Compiles every shape (`precompile_jobs`) now; returns how many ran."""
        count = len(self.job_list(head))
        for i in range(count):
            self.run_precompile_job(i, head)
        return count

    # Each job allocates its scratch when it runs (a cache made when the jobs are listed
    # would hold memory for every job at once).

    def _precompile_resize(self, source: int, target: int) -> None:
        # from a fresh scratch and from one that came out of a jitted step (a kept prefix)
        self._resize(self._new_cache(1, source), 0, target)
        self._resize(self._resize(self._new_cache(1, source), 0, source), 0, target)

    def _precompile_insert(self, length: int) -> None:
        self._insert_row(self._new_cache(1, length), 0)

    def _precompile_decode(self, rows: int, head: Head) -> None:
        # A real step with every token invalid: it writes only empty slots, and `insert`
        # resets a row's index before the row is used.
        self.precompile_logits[rows] = self._decode_rows(np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                                                         np.zeros(rows, bool), head)

    def _precompile_piece(self, length: int, t: int, fresh: bool, head: Head) -> None:
        cache = self._new_cache(1, length)
        if not fresh:
            cache = self._resize(self._new_cache(1, self.prefill_lengths()[0]), 0, length)
        zeros = np.zeros((1, t), np.int32)
        self._prefill_into(cache, zeros, zeros.astype(bool), np.ones((1, t), bool), zeros, 0, head)

    def room(self, row: int) -> int:
        """Tokens row `row` can still take."""
        return int(self.max_length - self.index[row])
