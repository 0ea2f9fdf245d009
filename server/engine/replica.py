"""Multi-host serving: process 0's slot-pool calls, replayed by every other process.

JAX multi-controller: each process runs its own Python program over the devices
of every host (one global mesh), and a jitted program on that mesh only runs
once *every* process has called it, in the same order, with the same inputs
(each process feeds its own devices' shards). Only process 0 takes requests,
so its engine worker decides every step (admission, prefill chunk, decode rows,
all host-side, see engine.py) and the other processes must replay exactly the
device calls those decisions make.

Where to cut: the engine's device work all goes through `SlotPool`
(model/runner.py) and the sampler. We replicate at the slot-pool methods, not
at the jitted functions: `start_prefill` consults the prefix cache and may
resize a kept cache, `insert`/`decode` update host mirrors of the pool, and
the prefix cache's decisions (lookup, store, eviction) are deterministic given
the same sequence of calls. So a follower holds its own SlotPool and
PrefixCache and replays the same method calls with the same arguments; its
state mirrors the leader's without ever sending a cache or a decision.
Sampling is not replicated at all: the model's logits leave every step fully
replicated, the leader takes its own devices' copy and samples on one local
device (a process-local program), so keys, penalties and stop tokens never
need to travel.

Transport: before each call the leader broadcasts a compact op record (a
fixed int32 header, then, when needed, an int32 payload padded to a power of
two so the broadcast compiles a few shapes only) with JAX's own
`multihost_utils.broadcast_one_to_all`; no hand-made RPC.

Failure: a broadcast to a dead process raises (gloo: "connection closed by
peer"); a hung collective (a dead TPU host) is caught by a watchdog reading
the distributed runtime's live nodes (its heartbeats). Either way the leader
turns `lost`: the engine stops and fails its requests, `/ready` says 503. The
idle leader broadcasts a no-op every `heartbeat_s`, so a dead follower is
noticed without traffic and a follower never waits long in one collective.
"""

from __future__ import annotations

import collections
import enum
import functools
import itertools
import logging
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lwm_serve.model.generation import Generator
from lwm_serve.model.prefix_cache import PrefixCache, PrefixEntry
from lwm_serve.model.runner import Head, PrefillTask, SlotPool
from lwm_serve.server.engine.scheduler import SchedulerClosedError

logger = logging.getLogger(__name__)

HEADS: tuple[Head, ...] = ("text", "vision")
_HEADER = 8          # op, sequence number, payload length, 5 fields
_FIELDS = _HEADER - 3
_MIN_PAYLOAD = 64


class Op(enum.IntEnum):
    NOOP = 1      # heartbeat
    PREFIX = 2    # fields: min_reuse; payload: budget bytes (lo, hi words)
    POOL = 3      # fields: num_slots, max_length, prefill_chunk, uses the prefix cache
    START = 4     # fields: task, head, reuse, n; payload: ids[n], vision_mask[n]
    STEP = 5      # fields: task
    KEEP = 6      # fields: task
    INSERT = 7    # fields: task, row
    DECODE = 8    # fields: head, k; payload: rows[k], tokens[k]
    PIN = 9       # fields: entry key, owner
    UNPIN = 10    # fields: owner
    DROP = 11     # payload: task ids
    STOP = 12
    PRECOMPILE = 13  # fields: head, job index (SlotPool.precompile_jobs)
    DECODE_MIXED = 14  # fields: k; payload: rows[k], tokens[k], is_vision[k]


class ReplicaLostError(SchedulerClosedError):
    """A process of the multi-host run is gone: the global mesh cannot run any more
    (the engine is closed for good: HTTP 503 wherever it surfaces)."""


def _split64(value: int) -> list[int]:
    """An int64 as two int32 words (JAX broadcasts 32-bit integers unless x64 is on)."""
    lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    return [int(np.uint32(lo).view(np.int32)), int(np.uint32(hi).view(np.int32))]


def _join64(words: np.ndarray) -> int:
    lo, hi = (int(np.int32(w).view(np.uint32)) for w in words[:2])
    return lo | (hi << 32)


def _padded(payload: np.ndarray) -> np.ndarray:
    n = max(_MIN_PAYLOAD, 1 << max(0, int(len(payload) - 1).bit_length()))
    out = np.zeros(n, np.int32)
    out[:len(payload)] = payload
    return out


@functools.lru_cache(maxsize=None)
def _replicate_on(mesh: jax.sharding.Mesh) -> Callable[[jax.Array], jax.Array]:
    return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))


def to_local(x: jax.Array) -> jax.Array:
    """This process's full copy of a global array (a collective when it is not replicated:
    every process must call it for the same arrays)."""
    if x.is_fully_addressable:
        return x
    if not x.is_fully_replicated:
        if not isinstance(x.sharding, NamedSharding):
            return jax.numpy.asarray(multihost_utils.process_allgather(x, tiled=True))
        x = _replicate_on(x.sharding.mesh)(x)
    return x.addressable_data(0)


def live_processes() -> Callable[[], tuple[int, int]] | None:
    """A function telling how many of the run's processes the distributed runtime sees
    alive (its heartbeats), and of how many; None when this JAX does not expose it."""
    from jax._src import distributed  # the client is not public API; used read-only

    client = distributed.global_state.client
    if client is None or not hasattr(client, "get_live_nodes"):
        return None
    ids = list(range(jax.process_count()))
    return lambda: (len(client.get_live_nodes(ids)), len(ids))


# ---------------------------------------------------------------------------- leader


class Leader:
    """Process 0's side: broadcasts every op before running it locally.

    Args:
      heartbeat_s: an idle engine broadcasts a no-op this often.
      watch_s: how often the watchdog reads the live processes (0: no watchdog).
    """

    def __init__(self, heartbeat_s: float = 1.0, watch_s: float = 1.0) -> None:
        self.heartbeat_s, self.watch_s = heartbeat_s, watch_s
        self._seq = itertools.count(1)
        self._last = time.monotonic()
        # Ops noticed on other threads, with what to run locally when they go out.
        self._pending: collections.deque[tuple[Op, int, Callable[[int], None] | None]] = collections.deque()
        self._lost: str | None = None
        self._stopped = False
        self._on_lost: list[Callable[[ReplicaLostError], None]] = []
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------ health

    @property
    def healthy(self) -> bool:
        return self._lost is None

    @property
    def lost_reason(self) -> str | None:
        return self._lost

    def on_lost(self, callback: Callable[[ReplicaLostError], None]) -> None:
        """Calls `callback` (from whichever thread notices) once a process is lost."""
        self._on_lost.append(callback)

    def _mark_lost(self, reason: str) -> ReplicaLostError:
        error = ReplicaLostError(f"multi-host run broken: {reason}")
        if self._lost is None and not self._stopped:
            self._lost = reason
            logger.error("%s; this server can no longer serve (restart every process)", error)
            for callback in self._on_lost:
                callback(error)
        return error

    def start_watchdog(self) -> None:
        live = live_processes() if self.watch_s > 0 else None
        if live is None or self._watchdog is not None:
            return

        def watch() -> None:
            while self._lost is None and not self._stopped:
                try:
                    seen, expected = live()
                except Exception as exc:  # the coordination service itself is gone
                    seen, expected, why = 0, 1, f"the distributed runtime failed ({exc})"
                else:
                    why = f"{expected - seen} of {expected} processes stopped sending heartbeats"
                if seen < expected and not self._stopped:
                    self._mark_lost(why)
                    return
                time.sleep(self.watch_s)

        self._watchdog = threading.Thread(target=watch, name="lwm-replica-watchdog", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------ sending

    def send(self, op: Op, fields: Sequence[int] = (), payload: np.ndarray | None = None) -> None:
        """Broadcasts one op (first any deferred ones). Call from one thread at a time."""
        while self._pending:
            self._flush_one(*self._pending.popleft())
        self._broadcast(op, fields, payload)

    def _flush_one(self, op: Op, value: int, local: Callable[[int], None] | None) -> None:
        if op is Op.DROP:
            drops = [value]
            while self._pending and self._pending[0][0] is Op.DROP:
                drops.append(self._pending.popleft()[1])
            self._broadcast(Op.DROP, (), np.asarray(drops, np.int32))
        else:
            self._broadcast(op, (value,))
        if local is not None:
            local(value)

    def defer(self, op: Op, value: int, local: Callable[[int], None] | None = None) -> None:
        """Queues an op noticed on another thread (a dropped task, an ended session);
        it goes out with the next op, from the engine's thread, which then runs `local`."""
        self._pending.append((op, value, local))

    def _broadcast(self, op: Op, fields: Sequence[int], payload: np.ndarray | None) -> None:
        if self._lost is not None:
            raise ReplicaLostError(f"multi-host run broken: {self._lost}")
        header = np.zeros(_HEADER, np.int32)
        body = None if payload is None or len(payload) == 0 else _padded(np.asarray(payload, np.int32))
        header[:3] = (op, next(self._seq), 0 if payload is None else len(payload))
        header[3:3 + len(fields)] = fields
        try:
            multihost_utils.broadcast_one_to_all(header)
            if body is not None:
                multihost_utils.broadcast_one_to_all(body)
        except Exception as exc:
            raise self._mark_lost(f"broadcasting {op.name} failed ({type(exc).__name__}: {exc})") from exc
        self._last = time.monotonic()

    def tick(self, busy: bool) -> None:
        """Called by the engine worker every iteration: deferred ops go out, and an idle
        engine sends a heartbeat. Raises ReplicaLostError once a process is lost."""
        if self._lost is not None:
            raise ReplicaLostError(f"multi-host run broken: {self._lost}")
        if self._pending or (not busy and time.monotonic() - self._last >= self.heartbeat_s):
            self.send(Op.NOOP)

    def probe(self) -> bool:
        """Whether every process still answers (a heartbeat now, after a failed step:
        a collective with a dead process fails like any other device error)."""
        try:
            self.send(Op.NOOP)
        except ReplicaLostError:
            return False
        return True

    def close(self, wait_s: float = 30.0) -> None:
        """Tells every follower to exit (once; nothing when the run is already broken), and
        waits up to `wait_s` for them to leave: process 0 hosts the distributed runtime,
        and a follower that loses it while still exiting is killed by JAX instead."""
        if self._stopped:
            return
        stopped = False
        if self._lost is None:
            try:
                self.send(Op.STOP)
                stopped = True
            except ReplicaLostError:
                pass
        self._stopped = True
        live = live_processes() if stopped else None
        deadline = time.monotonic() + wait_s
        while live is not None and time.monotonic() < deadline:
            try:
                if live()[0] <= 1:
                    break
            except Exception:
                break
            time.sleep(0.2)

    # ------------------------------------------------------------------ factories for the engine

    def prefix_cache(self, budget_bytes: int) -> PrefixCache:
        return ReplicatedPrefixCache(self, budget_bytes)

    def slot_pool(self, params: Any, cfg: Any, **kwargs: Any) -> SlotPool:
        return ReplicatedSlotPool(self, params, cfg, **kwargs)


class ReplicatedPrefixCache(PrefixCache):
    """The leader's prefix cache: pins and unpins reach the followers' mirrors.

    Lookups, stores and evictions are not sent: they follow from the replayed
    slot-pool calls. An unpin comes from the event loop thread, so it is
    deferred to the engine's thread and applied there, on every process at the
    same point of the op sequence.
    """

    def __init__(self, leader: Leader, budget_bytes: int, min_reuse: int = 16) -> None:
        leader.send(Op.PREFIX, (min_reuse,), np.asarray(_split64(budget_bytes), np.int32))
        super().__init__(budget_bytes, min_reuse)
        self._leader = leader
        self._owners: dict[str, int] = {}
        self._owner_ids = itertools.count(1)

    def _owner_id(self, owner: str) -> int:
        if owner not in self._owners:
            self._owners[owner] = next(self._owner_ids)
        return self._owners[owner]

    def pin(self, entry: PrefixEntry, owner: str) -> None:
        self._leader.send(Op.PIN, (entry.key, self._owner_id(owner)))
        super().pin(entry, owner)

    def unpin(self, owner: str) -> None:
        oid = self._owners.get(owner)
        if oid is not None:
            self._leader.defer(Op.UNPIN, oid, self._apply_unpin)

    def _apply_unpin(self, oid: int) -> None:
        owner = next((o for o, i in self._owners.items() if i == oid), None)
        if owner is not None:
            del self._owners[owner]
            super().unpin(owner)


class ReplicatedSlotPool(SlotPool):
    """The leader's slot pool: each device-touching call is broadcast, then run.

    Logits come back as this process's local copy (see `to_local`), so the
    engine samples on one local device.
    """

    def __init__(self, leader: Leader, params: Any, cfg: Any, *, num_slots: int, max_length: int,
                 prefill_chunk: int, mesh: Any = None, prefix_cache: PrefixCache | None = None) -> None:
        leader.send(Op.POOL, (num_slots, max_length, prefill_chunk, int(prefix_cache is not None)))
        super().__init__(params, cfg, num_slots=num_slots, max_length=max_length,
                         prefill_chunk=prefill_chunk, mesh=mesh, prefix_cache=prefix_cache)
        self._leader = leader
        self._task_ids = itertools.count(1)
        self._ids: dict[int, int] = {}  # id(task) -> its number (tasks are unhashable dataclasses)

    def _tid(self, task: PrefillTask) -> int:
        return self._ids[id(task)]

    def _forget(self, key: int, tid: int) -> None:
        self._ids.pop(key, None)
        self._leader.defer(Op.DROP, tid)

    def start_prefill(self, ids: Any, vision_mask: Any, head: Head = "text", reuse: bool = True) -> PrefillTask:
        ids = np.asarray(ids, np.int32)
        mask = np.asarray(vision_mask, bool)
        tid = next(self._task_ids)
        self._leader.send(Op.START, (tid, HEADS.index(head), int(reuse), len(ids)),
                          np.concatenate([ids, mask.astype(np.int32)]))
        task = super().start_prefill(ids, mask, head, reuse)
        self._ids[id(task)] = tid
        # The follower frees its twin once the engine lets go of this task.
        weakref.finalize(task, self._forget, id(task), tid)
        return task

    def prefill_step(self, task: PrefillTask) -> bool:
        self._leader.send(Op.STEP, (self._tid(task),))
        done = super().prefill_step(task)
        if task.logits is not None:
            task.logits = to_local(task.logits)
        return done

    def keep(self, task: PrefillTask) -> PrefixEntry | None:
        self._leader.send(Op.KEEP, (self._tid(task),))
        return super().keep(task)

    def insert(self, task: PrefillTask, row: int) -> None:
        self._leader.send(Op.INSERT, (self._tid(task), row))
        super().insert(task, row)

    def run_precompile_job(self, index: int, head: Head = "text") -> None:
        self._leader.send(Op.PRECOMPILE, (HEADS.index(head), index))
        super().run_precompile_job(index, head)
        self.precompile_logits = {rows: to_local(x) for rows, x in self.precompile_logits.items()}

    def decode(self, tokens: dict[int, int], head: Head = "text") -> jax.Array:
        rows = np.asarray(list(tokens), np.int32)
        feed = np.asarray([tokens[r] for r in rows], np.int32)
        self._leader.send(Op.DECODE, (HEADS.index(head), len(rows)), np.concatenate([rows, feed]))
        return to_local(super().decode(tokens, head))

    def decode_mixed(self, tokens: dict[int, int], vision_rows: set[int]) -> dict[Head, jax.Array]:
        rows = np.asarray(list(tokens), np.int32)
        feed = np.asarray([tokens[r] for r in rows], np.int32)
        is_vision = np.asarray([r in vision_rows for r in rows.tolist()], np.int32)
        self._leader.send(Op.DECODE_MIXED, (len(rows),), np.concatenate([rows, feed, is_vision]))
        return {head: to_local(x) for head, x in super().decode_mixed(tokens, vision_rows).items()}


# ---------------------------------------------------------------------------- follower


class Follower:
    """Every other process: receives the leader's ops and replays them on its own
    slot pool and prefix cache until STOP.

    Args:
      generator: the same model the leader serves (params on the global mesh).
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.prefix: PrefixCache | None = None
        self.pool: SlotPool | None = None
        self.tasks: dict[int, PrefillTask] = {}
        self.entries: weakref.WeakValueDictionary[int, PrefixEntry] = weakref.WeakValueDictionary()
        self.ops = 0

    def receive(self) -> tuple[Op, np.ndarray, np.ndarray]:
        header = multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.int32))
        if int(header[1]) != self.ops + 1:  # every op numbered: a lost or extra one is fatal
            raise ReplicaLostError(f"op {int(header[1])} arrived after op {self.ops}: out of step")
        n = int(header[2])
        payload = np.zeros(0, np.int32)
        if n:
            payload = multihost_utils.broadcast_one_to_all(_padded(np.zeros(n, np.int32)))[:n]
        return Op(int(header[0])), header[3:], payload

    def run(self) -> None:
        """Replays ops until STOP. Raises ReplicaLostError when the leader is gone."""
        while True:
            try:
                op, fields, payload = self.receive()
            except ReplicaLostError:
                raise
            except Exception as exc:
                raise ReplicaLostError(f"receiving from process 0 failed ({type(exc).__name__}: {exc})") from exc
            self.ops += 1
            if op is Op.STOP:
                logger.info("process 0 said stop after %d ops", self.ops)
                return
            try:
                self.apply(op, fields, payload)
            except Exception:
                # The leader ran the same call on the same state: it failed there too
                # (and failed its request); the mirrors stay in step.
                logger.warning("replaying %s failed (as it did on process 0)", op.name, exc_info=True)

    def apply(self, op: Op, fields: np.ndarray, payload: np.ndarray) -> None:
        f = [int(x) for x in fields]
        gen = self.generator
        if op is Op.NOOP:
            return
        if op is Op.PREFIX:
            self.prefix = PrefixCache(_join64(payload), min_reuse=f[0])
        elif op is Op.POOL:
            self.pool = SlotPool(gen.params, gen.cfg, num_slots=f[0], max_length=f[1], prefill_chunk=f[2],
                                 mesh=gen.mesh, prefix_cache=self.prefix if f[3] else None)
            self.tasks.clear()
        elif op is Op.START:
            tid, head, reuse, n = f[:4]
            self.tasks[tid] = self.pool.start_prefill(payload[:n], payload[n:2 * n].astype(bool), HEADS[head],
                                                      bool(reuse))
        elif op is Op.STEP:
            task = self.tasks[f[0]]
            self.pool.prefill_step(task)
            if task.logits is not None:
                to_local(task.logits)
        elif op is Op.KEEP:
            kept = self.pool.keep(self.tasks[f[0]])
            if kept is not None:
                self.entries[kept.key] = kept
        elif op is Op.INSERT:
            self.pool.insert(self.tasks[f[0]], f[1])
        elif op is Op.DECODE:
            head, k = f[:2]
            to_local(self.pool.decode(dict(zip(payload[:k].tolist(), payload[k:2 * k].tolist())), HEADS[head]))
        elif op is Op.DECODE_MIXED:
            k = f[0]
            rows = payload[:k].tolist()
            out = self.pool.decode_mixed(dict(zip(rows, payload[k:2 * k].tolist())),
                                         {r for r, v in zip(rows, payload[2 * k:3 * k].tolist()) if v})
            for x in out.values():
                to_local(x)
        elif op is Op.PRECOMPILE:
            self.pool.run_precompile_job(f[1], HEADS[f[0]])
        elif op is Op.PIN:
            entry = self.entries.get(f[0])
            if entry is not None and self.prefix is not None:
                self.prefix.pin(entry, str(f[1]))
        elif op is Op.UNPIN:
            if self.prefix is not None:
                self.prefix.unpin(str(f[0]))
        elif op is Op.DROP:
            for tid in payload.tolist():
                self.tasks.pop(tid, None)
        else:
            raise ValueError(f"unknown op {op}")
