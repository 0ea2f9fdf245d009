"""The serving engine: continuous batching over one slot pool, on one worker thread.

Event loop side: `submit()` admits a request into the bounded scheduler
(QueueFullError at once when full) and returns a `RequestHandle`, whose
`steps()` async-iterates the request's StepOutputs (`events()` also yields
PrefillProgress). Worker side, one iteration ("engine step"):

1. requests aborted by their client (or past their deadline) leave: their pool
   rows are free at once;
2. the oldest waiting request is admitted when the pool has rows for its n
   outputs: its prompt is looked up in the prefix cache and a prefill starts;
3. at most ONE prefill chunk runs (so a decoding stream waits at most one chunk
   per token); a finished prefill is kept in the prefix cache, copied into its
   rows, and its first token sampled;
4. one decode step runs for every decoding row of every request, each row
   sampling from its own key chain with its own settings.

Steps are handed to each request's asyncio.Queue with
`loop.call_soon_threadsafe` (JAX never runs on the event loop). Everything the
worker decides per step (admissions, prefill chunks, the rows decoded) is
host-side state of this thread: a multi-host follower can replay it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import jax.numpy as jnp
from lwm_serve.model.generation import ContextLengthError, Generator, PromptRow, StepOutput
from lwm_serve.model.prefix_cache import PrefixCache
from lwm_serve.model.runner import SlotPool, max_prompt_offset
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.engine import live as live_lib
from lwm_serve.server.engine.handle import END, Entry, Failure, RequestHandle
from lwm_serve.server.engine.live import LiveRequest
from lwm_serve.server.engine.replica import Leader, ReplicaLostError
from lwm_serve.server.engine.request import (GenerationRequest, PrefillProgress, RequestRecord,
                                             RequestStatus, RequestTimeoutError, SessionLimitError)
from lwm_serve.server.engine.scheduler import Scheduler, SchedulerClosedError

logger = logging.getLogger(__name__)

# Scratch lengths (in prefill chunks) whose shapes compile before the engine serves: the
# prompts of chats and short videos. Longer ones compile in idle time after (`_warm_one`).
EAGER_PREFILL_CHUNKS = 4
# Idle-time compiles start only after the engine has had nothing to run for this long:
# a client sending requests back to back (a chat turn after turn, a benchmark) is not
# made to wait behind a compile between two of them.
IDLE_BEFORE_WARM_S = 2.0


class EngineObserver(Protocol):
    """What the engine reports as it works (server/metrics.py implements it)."""

    def request_started(self, queue_s: float, prompt_tokens: int, cached_tokens: int) -> None: ...
    def first_token(self, ttft_s: float) -> None: ...
    def tokens(self, count: int, gap_s: float | None) -> None: ...
    def request_ended(self, status: str, e2e_s: float) -> None: ...


@dataclass
class EngineStats:
    waiting: int
    running: int
    admitted_total: int
    rejected_total: int
    finished_total: int
    aborted_total: int
    failed_total: int
    generated_tokens_total: int
    prompt_tokens_total: int = 0
    slots_total: int = 0
    slots_used: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_entries: int = 0
    prefix_bytes: int = 0
    prefix_in_use: int = 0
    draining: bool = False


class Engine:
    """Continuous batching of generation requests over a slot pool.

    Args:
        generator: the model (weights, config, mesh, prefill chunk, context limit).
        max_queue: requests allowed to wait; more get QueueFullError (HTTP 503).
        retry_after_s: advice sent with QueueFullError.
        history: finished requests whose records are kept for introspection.
        max_num_seqs: most output rows decoding at once (pool rows).
        kv_cache_bytes: bound on the pool's bytes: fewer rows when they would not fit.
        prefix_cache_bytes: bytes of finished prefills kept for reuse (0: none).
        request_timeout_s: default per-request limit (None: none).
        max_sessions: most session names pinning prefills at once (a new one beyond
            raises SessionLimitError; `release_session` frees a name).
        observer: receives metrics events.
        step_hook: called by the worker before each engine step (tests use it to
            pace or gate the worker).
        replica: on process 0 of a multi-host run, the link to the other processes
            (server/engine/replica.py): the pool and prefix cache replay there, and
            losing a process stops this engine.
    """

    def __init__(self, generator: Generator, *, max_queue: int = 64, retry_after_s: int = 1,
                 history: int = 1024, max_num_seqs: int = 16, kv_cache_bytes: int | None = None,
                 prefix_cache_bytes: int = 1 << 30, request_timeout_s: float | None = None,
                 max_sessions: int = 16,
                 observer: EngineObserver | None = None,
                 step_hook: Callable[[], None] | None = None, replica: Leader | None = None) -> None:
        self.generator = generator
        self._scheduler: Scheduler[Entry] = Scheduler(max_queue, retry_after_s)
        self._records: collections.OrderedDict[str, RequestRecord] = collections.OrderedDict()
        self._history = history
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._finished = self._aborted = self._failed = self._tokens = self._prompt_tokens = 0
        self._max_num_seqs = max_num_seqs
        self._kv_cache_bytes = kv_cache_bytes
        self.replica = replica
        self._lost: ReplicaLostError | None = None
        self.prefix_cache = (PrefixCache(prefix_cache_bytes) if replica is None
                             else replica.prefix_cache(prefix_cache_bytes))
        self.request_timeout_s = request_timeout_s
        self.max_sessions = max_sessions
        self._sessions: set[str] = set()
        self.observer = observer
        self.step_hook = step_hook
        self.pool: SlotPool | None = None
        self._prefilling: LiveRequest | None = None
        self._decoding: list[LiveRequest] = []
        self._draining = False
        self._precompile_first = False
        self._later_jobs: collections.deque[int] = collections.deque()
        self._warm_t0, self._warm_shapes = 0.0, 0
        # set once every shape is compiled (at once without precompile: nothing is to come)
        self.warmed = threading.Event()
        self._deferrals = 0  # holders of `defer_idle_work` (media being encoded)
        self._last_busy = 0.0  # when a request last ran (idle-time work waits IDLE_BEFORE_WARM_S after)

    # ------------------------------------------------------------------ lifecycle

    def _build_pool(self) -> SlotPool:
        gen = self.generator
        chunk = gen.prefill_chunk
        # Room for the longest request plus the left padding of a short prompt.
        length = gen.context_limit + max_prompt_offset(chunk)
        new_pool = SlotPool if self.replica is None else self.replica.slot_pool
        probe = new_pool(gen.params, gen.cfg, num_slots=1, max_length=length, prefill_chunk=chunk, mesh=gen.mesh)
        rows = self._max_num_seqs
        if self._kv_cache_bytes is not None:
            rows = max(1, min(rows, self._kv_cache_bytes // (probe.bytes_per_slot * probe.max_length)))
        del probe
        pool = new_pool(gen.params, gen.cfg, num_slots=rows, max_length=length, prefill_chunk=chunk,
                        mesh=gen.mesh, prefix_cache=self.prefix_cache)
        logger.info("KV pool: %d rows x %d slots (%.1f MiB), prefix cache budget %.1f MiB", rows,
                    pool.max_length, rows * pool.max_length * pool.bytes_per_slot / 2**20,
                    self.prefix_cache.budget / 2**20)
        return pool

    def _precompile(self) -> None:
        """Compiles the decode steps, the sampling steps and every prefill and copy shape of
        scratch lengths up to EAGER_PREFILL_CHUNKS chunks (on the worker, before its first
        request, so the server's /ready waits for them). Longer scratch lengths are left to
        `_warm_one`, in idle time: a newcomer waits for what short prompts need, not for
        every shape a million-token context could take."""
        t0 = time.monotonic()
        jobs = self.pool.job_list()
        eager = {i for i, job in enumerate(jobs) if job.length <= EAGER_PREFILL_CHUNKS * self.pool.prefill_chunk}
        for i in sorted(eager):
            self.pool.run_precompile_job(i)
        self._later_jobs = collections.deque(i for i in range(len(jobs)) if i not in eager)
        widths = sorted(self.pool.precompile_logits)
        for width in widths:
            logits = self.pool.precompile_logits[width]
            for temperature in (0.0, 1.0):
                req = GenerationRequest("precompile", [PromptRow([0])], [SamplingParams(temperature=temperature)], 1,
                                        logprobs=False)
                # one request padded to the width (a gather of its row), and `width` requests (none)
                for group in ([LiveRequest(None, req, logits.shape[1])],
                              [LiveRequest(None, req, logits.shape[1]) for _ in range(width)]):
                    live_lib.sample(group, logits, [[r] for r in range(len(group))], pad_to=width)
        self._warm_t0, self._warm_shapes = time.monotonic(), len(self._later_jobs)
        logger.info("precompiled %d prefill, copy and decode shapes and %d sampling widths in %.1f s; "
                    "%d shapes of longer prompts compile in idle time", len(eager), len(widths),
                    time.monotonic() - t0, len(self._later_jobs))
        if not self._later_jobs:
            self.warmed.set()

    @contextlib.contextmanager
    def defer_idle_work(self) -> Iterator[None]:
        """While held (from any thread), the idle-time warm-up waits: work outside the engine
        (a video's VQGAN encode) then has the cores to itself."""
        with self._lock:
            self._deferrals += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferrals -= 1

    def _warm_one(self) -> None:
        """Compiles the next shape left by `_precompile` (called only once nothing has run or
        waited for IDLE_BEFORE_WARM_S, and no media is being encoded: a request that comes
        meanwhile waits for one compile at most, and compiles on first use whatever is not
        warm yet)."""
        self.pool.run_precompile_job(self._later_jobs.popleft())
        if not self._later_jobs:
            logger.info("idle-time warm-up done: %d shapes in %.1f s", self._warm_shapes,
                        time.monotonic() - self._warm_t0)
            self.warmed.set()

    def start(self, precompile: bool = False) -> None:
        """Starts the worker (with `precompile`, it first compiles the decode steps and the shapes of
        short prompts, and the rest in idle time after: see `_precompile`; requests submitted
        meanwhile wait in the queue)."""
        if self._thread is not None:
            return
        if self.pool is None:
            self.pool = self._build_pool()
        if self.replica is not None:
            self.replica.on_lost(self._lose)
            self.replica.start_watchdog()
        self._precompile_first = precompile
        self._thread = threading.Thread(target=self._work, name="lwm-engine", daemon=True)
        self._thread.start()
        logger.info("engine worker started (max_queue %d)", self._scheduler.max_queue)

    def drain(self) -> None:
        """Refuses new requests from now on; running ones go on (see `stop`)."""
        self._draining = True
        logger.info("draining: new requests are refused, %d running", self.stats().running)

    @property
    def draining(self) -> bool:
        return self._draining

    def idle(self) -> bool:
        """Nothing waiting, prefilling or decoding."""
        return (self._prefilling is None and not self._decoding
                and self._scheduler.stats().waiting == 0)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops admissions, fails waiting requests, aborts running ones, joins."""
        for entry in self._scheduler.close():
            entry.record.status = RequestStatus.FAILED
            self._deliver(entry, Failure(SchedulerClosedError("the server is shutting down")))
            self._deliver(entry, END)
        for live in list(self._decoding) + ([self._prefilling] if self._prefilling else []):
            live.entry.record.request_abort("client")
        self._scheduler.wake()
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout)
            stuck = self._thread.is_alive()
            if stuck:
                logger.warning("engine worker did not stop within %.0f s", timeout)
            self._thread = None
        if self.replica is not None and not stuck:  # (one thread broadcasts at a time)
            self.replica.close()  # the followers exit too

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._lost is None

    # ------------------------------------------------------------------ requests

    @property
    def context_limit(self) -> int:
        return self.generator.context_limit

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises ContextLengthError when the prompt + new tokens do not fit."""
        self.generator.check_length(prompt_tokens, max_new_tokens)

    def new_request_id(self, prefix: str = "") -> str:
        return f"{prefix}{time.time_ns():x}{next(self._ids):04x}"

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Admits a request (call on the event loop). Raises QueueFullError when full."""
        if self._lost is not None:
            raise SchedulerClosedError(f"the engine is not running: {self._lost}")
        if not self.alive or self._draining:
            raise SchedulerClosedError("the server is shutting down" if self._draining
                                       else "the engine is not running")
        self.check_length(request.prompt_tokens, request.max_new_tokens)
        if request.session is not None:
            self._open_session(request.session)
        rows = len(request.prompt_rows)
        if self.pool is not None and rows > self.pool.num_slots:
            what = (f"{len(request.rows)} outputs with guidance ({rows} rows)" if request.use_cfg
                    else f"{rows} choices")
            raise ValueError(f"{what} do not fit the engine's {self.pool.num_slots} "
                             f"decode slots (--max-num-seqs)")
        record = RequestRecord(request.request_id, len(request.rows), request.max_new_tokens,
                               prompt_tokens=request.prompt_tokens)
        entry = Entry(request, record, asyncio.get_running_loop(), asyncio.Queue())
        self._scheduler.add(entry)  # may raise QueueFullError
        with self._lock:
            self._records[request.request_id] = record
            while len(self._records) > self._history:
                self._records.popitem(last=False)
        logger.debug("[%s] queued: %d rows, prompt %d, max_new %d", request.request_id,
                     len(request.rows), request.prompt_tokens, request.max_new_tokens)
        return RequestHandle(entry, self._scheduler.wake)

    def record(self, request_id: str) -> RequestRecord | None:
        """The record of a recent request (None when unknown or forgotten)."""
        with self._lock:
            return self._records.get(request_id)

    def _open_session(self, session: str) -> None:
        # Pins never leave on their own: their number is bounded, not their lifetime.
        with self._lock:
            if session not in self._sessions and len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(self.max_sessions)
            self._sessions.add(session)

    def release_session(self, session: str) -> bool:
        """Lets a session's pinned prefills be evicted again; False for an unknown name."""
        with self._lock:
            known = session in self._sessions
            self._sessions.discard(session)
        if known:
            self.prefix_cache.unpin(session)
        return known

    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def stats(self) -> EngineStats:
        s = self._scheduler.stats()
        p = self.prefix_cache.stats()
        pool = self.pool
        decoding = list(self._decoding)
        running = len(decoding) + int(self._prefilling is not None)
        used = int(pool.used.sum()) if pool is not None else 0
        kv = 0.0
        if pool is not None and used:
            kv = float(sum(min(pool.index[r], pool.max_length) for live in decoding for r in live.rows)
                       / (pool.num_slots * pool.max_length))
        return EngineStats(s.waiting, running, s.admitted_total, s.rejected_total,
                           self._finished, self._aborted, self._failed, self._tokens, self._prompt_tokens,
                           pool.num_slots if pool is not None else 0, used, kv,
                           p.queries, p.query_tokens, p.hit_tokens, p.entries, p.bytes,
                           self.prefix_cache.in_use(), self._draining)

    # ------------------------------------------------------------------ worker

    def _deliver(self, entry: Entry, item: object) -> None:
        try:
            entry.loop.call_soon_threadsafe(entry.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            entry.record.request_abort("client")

    def _work(self) -> None:
        if self._precompile_first:
            try:
                self._precompile()
            except Exception:  # serving still works; shapes then compile on first use
                logger.exception("precompile failed")
                self._later_jobs.clear()
        if not self._later_jobs:
            self.warmed.set()
        while True:
            busy = self._prefilling is not None or bool(self._decoding)
            if busy:
                self._last_busy = time.monotonic()
            warm = (bool(self._later_jobs) and not self._deferrals
                    and time.monotonic() - self._last_busy >= IDLE_BEFORE_WARM_S)
            head = self._scheduler.peek(0.0 if busy or warm else (0.1 if self._later_jobs else 0.5))
            if head is None and not busy and warm and not self._scheduler.closed:
                try:
                    self._warm_one()
                except ReplicaLostError as exc:
                    self._lose(exc)
                    return
                except Exception:  # serving still works; shapes then compile on first use
                    logger.exception("idle-time warm-up failed")
                    self._later_jobs.clear()
                    self.warmed.set()
                continue
            if self._scheduler.closed and not busy and head is None:
                self._end_all()
                return
            try:
                if self.replica is not None:
                    self.replica.tick(busy)
                self._drop_stopped()
                self._admit()
                if self.step_hook is not None and (self._prefilling is not None or self._decoding):
                    self.step_hook()
                    self._drop_stopped()
                if self._prefilling is not None:
                    live = self._prefilling
                    try:
                        self._prefill_chunk()
                    except Exception as exc:  # this request's prompt or settings: it alone fails
                        logger.exception("[%s] prefill failed", live.request.request_id)
                        self._finish(live, exc)
                if self._decoding:
                    self._decode()
            except ReplicaLostError as exc:
                self._lose(exc)
                return
            except Exception as exc:  # a bug or a device failure: fail what runs, keep serving
                if self.replica is not None and not self.replica.probe():  # ...or a lost process
                    self._lose(self._lost or ReplicaLostError(self.replica.lost_reason))
                    return
                logger.exception("engine step failed")
                for live in list(self._decoding) + ([self._prefilling] if self._prefilling else []):
                    self._finish(live, exc)

    def _lose(self, error: ReplicaLostError) -> None:
        """A process of the multi-host run is gone: nothing can run on the mesh any more.
        Fails every request now (from the worker, or from the replica's watchdog while
        the worker hangs in a collective), so no client waits forever."""
        with self._lock:
            if self._lost is not None and threading.current_thread() is not self._thread:
                return
            self._lost = error
        for entry in self._scheduler.close():
            entry.record.status = RequestStatus.FAILED
            self._deliver(entry, Failure(error))
            self._deliver(entry, END)
        for live in list(self._decoding) + ([self._prefilling] if self._prefilling else []):
            if threading.current_thread() is self._thread:
                self._finish(live, error)
            else:  # the worker is stuck: hand the failure out directly
                self._deliver(live.entry, Failure(error))
                self._deliver(live.entry, END)

    def _end_all(self) -> None:
        for live in list(self._decoding) + ([self._prefilling] if self._prefilling else []):
            self._finish(live, None)

    def _drop_stopped(self) -> None:
        for entry in self._scheduler.remove_if(lambda e: e.record.abort_event.is_set()):
            self._end(entry, None)
        now = time.monotonic()
        for live in list(self._decoding) + ([self._prefilling] if self._prefilling else []):
            rec = live.entry.record
            if live.deadline is not None and now > live.deadline and not rec.abort_event.is_set():
                rec.request_abort("timeout")
            if rec.abort_event.is_set():
                error = RequestTimeoutError(live.request.timeout_s or 0) if rec.abort_reason == "timeout" else None
                self._finish(live, error)

    def _admit(self) -> None:
        if self._prefilling is not None:
            return
        entry = self._scheduler.peek(0.0)
        if entry is None:
            return
        pool = self.pool
        req = entry.request
        rows = pool.allocate(len(req.prompt_rows))
        if rows is None:
            return  # wait for rows to free up (FIFO: nobody overtakes the head)
        self._scheduler.pop(entry)
        rec = entry.record
        rec.status, rec.started = RequestStatus.RUNNING, time.monotonic()
        if req.timeout_s is None and self.request_timeout_s is not None:
            req = _with_timeout(req, self.request_timeout_s)
        cfg = self.generator.cfg
        vocab = cfg.vocab_size if req.head == "text" else cfg.vision_vocab_size
        live = LiveRequest(entry, req, vocab, rows=rows)
        try:
            distinct: dict[tuple, int] = {}
            for row in req.prompt_rows:
                key = (tuple(row.ids), tuple(row.mask()))
                if key not in distinct:
                    distinct[key] = len(live.tasks)
                    live.tasks.append(pool.start_prefill(row.ids, row.mask(), req.head, reuse=req.reuse_prefix))
                live.task_of_row.append(distinct[key])
        except Exception as exc:
            self._finish(live, exc)
            return
        for task in live.tasks:
            room = pool.max_length - (task.offset + task.length)
            if room < req.max_new_tokens:
                self._finish(live, ContextLengthError(task.length, req.max_new_tokens, self.context_limit))
                return
        rec.cached_tokens = min(t.reused for t in live.tasks)
        self._prompt_tokens += req.prompt_tokens
        if self.observer is not None:
            self.observer.request_started(rec.started - rec.created, req.prompt_tokens, rec.cached_tokens)
        logger.debug("[%s] admitted to rows %s (waited %.3f s, %d/%d prompt tokens cached)", req.request_id,
                     rows, rec.started - rec.created, rec.cached_tokens, req.prompt_tokens)
        self._prefilling = live

    def _prefill_chunk(self) -> None:
        live = self._prefilling
        pool = self.pool
        task = next(t for t in live.tasks if not t.complete)
        pool.prefill_step(task)
        done = sum(t.chunks_done for t in live.tasks)
        total = sum(t.chunks_total for t in live.tasks)
        self._deliver(live.entry, PrefillProgress(done, total, sum(t.done for t in live.tasks),
                                                  sum(t.length for t in live.tasks),
                                                  live.entry.record.cached_tokens))
        if not live.prefilled:
            return
        if live.request.reuse_prefix:
            for task in live.tasks:
                kept = pool.keep(task)
                if kept is not None and live.request.session is not None:
                    self.prefix_cache.pin(kept, live.request.session)
        for r, row in enumerate(live.rows):
            pool.insert(live.tasks[live.task_of_row[r]], row)
        logits = jnp.concatenate([t.logits for t in live.tasks], axis=0)
        live.tasks = []  # their caches live on in the prefix cache only
        self._prefilling = None
        outputs = live_lib.sample([live], logits, [live.task_of_row], use_cfg=live.request.use_cfg)
        self._decoding.append(live)
        self._hand_out([live], outputs)

    def _decode(self) -> None:
        """One model step over every decoding row, then one sampling call per kind of
        request (text, vision, vision with guidance).

        Rows of both heads share ONE model call (`SlotPool.decode` with per-row heads):
        a call per head would advance every pool row's cache index once per call,
        so chat rows running beside a generation job would use two slots per token.
        """
        pool = self.pool
        feed, vision_rows = {}, set()
        for live in self._decoding:
            for r, row in enumerate(live.rows):
                feed[row] = int(live.last[r % live.n])  # a guided output feeds its cond and uncond rows
                if live.request.head == "vision":
                    vision_rows.add(row)
        if not vision_rows:
            logits = {"text": pool.decode(feed, "text")}
        elif len(vision_rows) == len(feed):
            logits = {"vision": pool.decode(feed, "vision")}
        else:
            logits = pool.decode_mixed(feed, vision_rows)
        outputs: dict[int, StepOutput] = {}
        for group in live_lib.sampling_groups(self._decoding):
            head_logits = logits[group[0].request.head]
            sampled = live_lib.sample(group, head_logits, [live.rows for live in group],
                                      pad_to=head_logits.shape[0] // (2 if group[0].request.use_cfg else 1),
                                      use_cfg=group[0].request.use_cfg)
            outputs.update({id(live): out for live, out in zip(group, sampled)})
        lives = list(self._decoding)
        self._hand_out(lives, [outputs[id(live)] for live in lives])

    def _hand_out(self, lives: list[LiveRequest], outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for live, out in zip(lives, outputs):
            rec = live.entry.record
            rec.steps += 1
            self._tokens += live.n
            gap = None
            if rec.first_token is None:
                rec.first_token = now
                if self.observer is not None:
                    self.observer.first_token(now - rec.created)
            else:
                gap = now - live.last_time
            live.last_time = now
            if self.observer is not None:
                self.observer.tokens(live.n, gap)
            self._deliver(live.entry, out)
            if live.done:
                self._finish(live, None)

    def _finish(self, live: LiveRequest, error: BaseException | None) -> None:
        if live in self._decoding:
            self._decoding.remove(live)
        if self._prefilling is live:
            self._prefilling = None
        if live.rows:
            self.pool.release(live.rows)
            live.rows = []
        live.tasks = []
        self._end(live.entry, error)

    def _end(self, entry: Entry, error: BaseException | None) -> None:
        rec = entry.record
        rec.ended = time.monotonic()
        if error is not None:
            rec.status, rec.error = RequestStatus.FAILED, f"{type(error).__name__}: {error}"
            self._failed += 1
            log = logger.info if isinstance(error, (RequestTimeoutError, ContextLengthError)) else logger.warning
            log("[%s] failed after %d steps: %s", rec.request_id, rec.steps, rec.error)
            self._deliver(entry, Failure(error))
        elif rec.abort_reason == "client":
            rec.status = RequestStatus.ABORTED
            self._aborted += 1
            logger.info("[%s] aborted by the client after %d steps", rec.request_id, rec.steps)
        else:
            rec.status = RequestStatus.FINISHED
            self._finished += 1
            logger.debug("[%s] finished: %d steps", rec.request_id, rec.steps)
        if self.observer is not None:
            self.observer.request_ended(rec.status.value, rec.ended - rec.created)
        self._deliver(entry, END)


def _with_timeout(req: GenerationRequest, seconds: float) -> GenerationRequest:
    return dataclasses.replace(req, timeout_s=seconds)
