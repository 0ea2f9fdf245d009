"""Planned media -> VQGAN frame codes, off the event loop, cancellable, with progress.

Each planned item not already a cache hit goes through `tokenizers.media_ingest.
encode_media` (decode -> preprocess -> VQGAN a VQGAN batch at a time, then the
code cache, under the key the plan computed) on ONE dedicated "lwm-ingest"
thread, not on the model worker: a long video being encoded never holds up other
requests' generation, and one ingestion at a time bounds the memory of decoded
frames. Its progress callback becomes IngestEvents (frames decoded / encoded,
frames/s) and is the cancellation hook: a client that leaves stops the work at the
next frame (`_Cancelled` unwinds `encode_media`; nothing is stored). An item that was
ingested ends with an "ingested" event giving the seconds of each stage, measured by
the pipeline itself, and feeds the observer's frame counter and ingest histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal, Protocol, Sequence

import numpy as np

from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.media_plan import PlannedMedia, media_error, spec_text
from lwm_serve.tokenizers.errors import MediaError
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.media_ingest import Stage, encode_media
from lwm_serve.tokenizers.vision_cache import VisionCache

_EMIT_EVERY_S = 0.25  # progress events at most this often per stage (plus the last one)


class IngestObserver(Protocol):
    """Told of every media item ingested (not of cache hits): `server.metrics.ServerMetrics`."""

    def media_ingested(self, frames: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class EncodedMedia:
    codes: np.ndarray  # [N, 16, 16] int32
    timestamps: np.ndarray  # [N] float64 seconds
    spec: SamplingSpec
    cached: bool
    is_image: bool


@dataclass(frozen=True)
class IngestEvent:
    """Progress of one media item: `done` of `total` frames through `stage`; the last
    event of an ingested item ("ingested") carries `seconds` per stage (decode,
    preprocess, vqgan, total)."""

    stage: Stage | Literal["ingested"]
    item: int
    done: int
    total: int
    frames_per_s: float | None = None
    seconds: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.frames_per_s is not None:
            out["frames_per_s"] = round(self.frames_per_s, 2)
        if self.seconds is None:
            del out["seconds"]
        else:
            out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return out

    def describe(self) -> str:
        rate = f" frames_per_s={self.frames_per_s:.2f}" if self.frames_per_s is not None else ""
        times = "".join(f" {k}_s={v:.3f}" for k, v in (self.seconds or {}).items())
        return f"progress stage={self.stage} item={self.item} done={self.done} total={self.total}{rate}{times}"


@dataclass
class IngestStats:
    """Counters for introspection (tests, metrics)."""

    cache_hits: int = 0
    cache_misses: int = 0
    frames_decoded: int = 0
    frames_encoded: int = 0


class _Cancelled(Exception):
    """The client left: stop ingesting at the next frame."""


class MediaIngester:
    """Runs `encode_media` for planned items on the ingest thread (module docstring).

    Args:
        vqgan: the runtime's VQGAN wrapper.
        cache: the on-disk code cache.
        max_video_seconds: longer videos are refused (None: no limit).
        max_pixels: images / video frames of more pixels are refused before decoding.
        observer: told of each item ingested (frames, seconds): the server's metrics.
    """

    def __init__(self, vqgan: Any, cache: VisionCache, *, max_video_seconds: float | None = None,
                 max_pixels: int | None = None, observer: IngestObserver | None = None) -> None:
        self.vqgan, self.cache, self.observer = vqgan, cache, observer
        self.max_video_seconds, self.max_pixels = max_video_seconds, max_pixels
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lwm-ingest")
        # held while an item is decoded and encoded: the engine's idle-time compiles wait
        # meanwhile (they would take the cores the VQGAN runs on)
        self.busy: Callable[[], AbstractContextManager] = contextlib.nullcontext

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, plans: Sequence[PlannedMedia],
                     on_event: Callable[[IngestEvent], None] | None = None) -> list[EncodedMedia]:
        """Frame codes of every planned item (the plan's cache hit, else `encode_media` on the ingest thread).

        Args:
            plans: from `plan`.
            on_event: called on the event loop with each IngestEvent.
        """
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def emit(event: IngestEvent | None) -> None:  # on the ingest thread; None: only check for a cancel
            if cancel.is_set():
                raise _Cancelled()
            if event is not None and on_event is not None:
                loop.call_soon_threadsafe(on_event, event)

        out: list[EncodedMedia] = []
        try:
            for i, plan in enumerate(plans):
                hit = plan.hit  # looked up while planning; a later hit is found by encode_media
                if hit is not None:
                    with self._lock:
                        self.stats.cache_hits += 1
                    if on_event is not None:
                        on_event(IngestEvent("cached", i, len(hit[0]), len(hit[0])))
                    out.append(EncodedMedia(hit[0], hit[1], plan.spec, True, plan.is_image))
                    continue
                try:
                    out.append(await loop.run_in_executor(self._executor, self._ingest_busy, i, plan, emit))
                except MediaError as exc:
                    raise media_error(exc, plan.request) from exc
        except asyncio.CancelledError:
            cancel.set()
            raise
        return out

    async def encode_events(self, plans: Sequence[PlannedMedia]
                            ) -> AsyncIterator[IngestEvent | list[EncodedMedia]]:
        """`encode` as a stream: IngestEvents as they happen, then the result list last."""
        queue: asyncio.Queue[IngestEvent] = asyncio.Queue()
        task = asyncio.ensure_future(self.encode(plans, queue.put_nowait))
        getter: asyncio.Future[IngestEvent] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                yield task.result()
                return
        finally:
            # A cut stream closes us mid-wait: nothing we started may outlive us
            # (a pending Queue.get would be "destroyed but pending" at shutdown).
            for pending in (getter, task):
                if pending is not None and not pending.done():
                    pending.cancel()

    def _ingest_busy(self, index: int, plan: PlannedMedia, emit: Callable[[IngestEvent | None], None]) -> EncodedMedia:
        with self.busy():
            return self._ingest(index, plan, emit)

    def _ingest(self, index: int, plan: PlannedMedia, emit: Callable[[IngestEvent | None], None]) -> EncodedMedia:
        """`media_ingest.encode_media` with progress events (on the ingest thread).

        The file store's sha256 is reused (no re-hash); `emit` raises `_Cancelled`
        when the client has left, which stops decoding at the next frame.
        """
        src = plan.request.source
        t0 = time.monotonic()
        last = 0.0
        cached = False

        def on_progress(stage: Stage, done: int, total: int) -> None:
            nonlocal last, cached
            now = time.monotonic()
            if stage == "cached":  # filled by another request since planning
                cached = True
                emit(IngestEvent("cached", index, done, total))
                return
            if stage == "decode" and done != total and now - last < _EMIT_EVERY_S:
                emit(None)  # no event this often, but a client that left still stops us at this frame
                return
            last = now
            rate = None if plan.is_image else done / max(now - t0, 1e-9)
            emit(IngestEvent(stage, index, done, total, rate))

        timings: dict[str, float] = {}
        codes, timestamps = encode_media(src.data, plan.spec, self.vqgan, self.cache,
                                         max_duration_s=self.max_video_seconds, progress=on_progress,
                                         content_sha256=src.sha256, label=src.label, max_pixels=self.max_pixels,
                                         key=plan.key, timings=timings)
        if not len(codes):
            raise InvalidRequestError(f"{src.label}: the sampling {spec_text(plan.spec)} picks no frame",
                                      param=plan.request.param, code="no_frames")
        n = len(codes)
        with self._lock:
            if cached:
                self.stats.cache_hits += 1
            else:
                self.stats.cache_misses += 1
                self.stats.frames_decoded += n
                self.stats.frames_encoded += n
        if not cached:
            total_s = time.monotonic() - t0
            if self.observer is not None:
                self.observer.media_ingested(n, total_s)
            emit(IngestEvent("ingested", index, n, n, n / max(total_s, 1e-9), {**timings, "total": total_s}))
        return EncodedMedia(codes, timestamps, plan.spec, cached, plan.is_image)
