"""A request's images and videos -> VQGAN frame codes: plan the budget, ingest, report progress.

Two steps, both off the event loop:

1. `plan`: for each media item, find its frame count without decoding pixels
   (a cache hit gives the exact count; a still image is one frame; a video is
   probed and `estimate_n_frames` applied to its duration/frame count), then
   check prompt + new tokens against the context. Too long: 400 naming the
   numbers and a sampling that fits, or, with auto_fps, that sampling is used
   (frames shared between the videos in proportion to what they asked for).
2. `encode`: per item, `tokenizers.vision_cache.encode_media`, the one
   ingestion pipeline: the VQGAN code cache first (key: the file store's
   content sha256 + sampling + VQGAN identity); on a miss, decode
   (PyAV/Pillow), preprocess and VQGAN-encode a VQGAN batch at a time, keeping
   only the int codes (memory O(batch) frames, even for an hour of video),
   then store. Its progress callback becomes IngestEvents (frames decoded /
   encoded, frames/s) and is the cancellation hook.

Threads: decode + VQGAN run on ONE dedicated "lwm-ingest" thread, not on the
model worker: a long video being encoded never holds up other requests'
generation, and one ingestion at a time bounds the memory of decoded frames.
JAX is thread-safe; the VQGAN and the model share the device(s). A client that
leaves mid-ingestion stops it at the next frame: the progress callback raises
`_Cancelled`, which unwinds `encode_media` (nothing is stored).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np

from lwm_serve.server.errors import APIError, InvalidRequestError, to_api_error
from lwm_serve.server.media_sources import MediaSource, SourceResolver
from lwm_serve.tokenizers import media_decode
from lwm_serve.tokenizers.errors import MediaError
from lwm_serve.tokenizers.frame_sampling import DEFAULT_MAX_FRAMES, SamplingSpec, estimate_n_frames
from lwm_serve.tokenizers.vision_cache import Stage, VisionCache, cache_key, encode_media
from lwm_serve.tokenizers.vision_layout import TOKENS_PER_FRAME, FrameLayout, wrapper_length

logger = logging.getLogger(__name__)

_EMIT_EVERY_S = 0.25  # progress events at most this often per stage (plus the last one)
_IMAGE_SPEC = SamplingSpec()  # a still image is one frame whatever the part asked


@dataclass
class MediaRequest:
    """One image/video of a request, its bytes resolved."""

    source: MediaSource
    spec: SamplingSpec
    auto_fps: bool | None
    param: str


@dataclass
class PlannedMedia:
    request: MediaRequest
    is_image: bool
    spec: SamplingSpec  # the sampling to use (auto_fps may have lowered it)
    n_frames: int  # exact on a cache hit, else the estimate
    key: str
    hit: tuple[np.ndarray, np.ndarray] | None = None
    info: media_decode.VideoInfo | None = None
    adjusted: bool = False


@dataclass(frozen=True)
class Budget:
    """Token arithmetic of a request with media."""

    context: int
    text_tokens: int
    vision_tokens: int  # TOKENS_PER_FRAME per frame
    wrapper_tokens: int  # vision_layout.wrapper_length per media item
    new_tokens: int  # max_tokens, or 1 when the server chooses it

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.vision_tokens + self.wrapper_tokens

    @property
    def fits(self) -> bool:
        return self.prompt_tokens + self.new_tokens <= self.context

    @property
    def free_frames(self) -> int:
        """Frames that fit next to the text, wrappers and new tokens."""
        return max(self.context - self.text_tokens - self.wrapper_tokens - self.new_tokens, 0) // TOKENS_PER_FRAME


@dataclass(frozen=True)
class EncodedMedia:
    codes: np.ndarray  # [N, 16, 16] int32
    timestamps: np.ndarray  # [N] float64 seconds
    spec: SamplingSpec
    cached: bool
    is_image: bool


@dataclass(frozen=True)
class IngestEvent:
    """Progress of one media item: `done` of `total` frames through `stage`."""

    stage: Stage
    item: int
    done: int
    total: int
    frames_per_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.frames_per_s is not None:
            out["frames_per_s"] = round(self.frames_per_s, 2)
        return out

    def describe(self) -> str:
        rate = f" frames_per_s={self.frames_per_s:.2f}" if self.frames_per_s is not None else ""
        return f"progress stage={self.stage} item={self.item} done={self.done} total={self.total}{rate}"


@dataclass
class IngestStats:
    """Counters for introspection (tests, metrics)."""

    cache_hits: int = 0
    cache_misses: int = 0
    frames_decoded: int = 0
    frames_encoded: int = 0


class _Cancelled(Exception):
    """The client left: stop ingesting at the next frame."""


def fit_spec(spec: SamplingSpec, info: media_decode.VideoInfo | None, frames: int) -> SamplingSpec:
    """The largest sampling of `spec`'s range taking at most `frames` frames.

    Without fps the frames are uniform (max_frames); with fps it is lowered to
    frames / range seconds, and max_frames caps the count exactly.
    """
    if spec.fps is None:
        return dataclasses.replace(spec, max_frames=frames)
    span = _span_s(spec, info)
    fps = spec.fps if span <= 0 else min(spec.fps, _round_down(frames / span))
    return dataclasses.replace(spec, fps=fps, max_frames=frames)


def _span_s(spec: SamplingSpec, info: media_decode.VideoInfo | None) -> float:
    duration = info.duration_s if info is not None else 0.0
    end = duration if spec.end is None else min(spec.end, duration or spec.end)
    return max(end - (spec.start or 0.0), 0.0)


def _round_down(x: float, digits: int = 3) -> float:
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.floor(x * scale) / scale


class VisionService:
    """Media of requests -> frame codes (module docstring).

    Args:
        vqgan: the runtime's VQGAN wrapper.
        tokenizer: the text tokenizer (wrapper token counts).
        cache: the on-disk code cache.
        sources: resolves part URLs / file ids to bytes.
        layout: frame delimiter layout of prompts.
        context_limit: the model's context (prompt + new tokens).
        max_video_seconds: longer videos are refused (None: no limit).
        auto_fps: server default for fitting videos to the context.
        max_pixels: images / video frames of more pixels are refused before decoding (None: no limit).
    """

    def __init__(self, vqgan: Any, tokenizer: Any, cache: VisionCache, sources: SourceResolver, *,
                 layout: FrameLayout, context_limit: int, max_video_seconds: float | None = None,
                 auto_fps: bool = False, max_pixels: int | None = None) -> None:
        self.vqgan, self.cache, self.sources = vqgan, cache, sources
        self.layout, self.context_limit = layout, context_limit
        self.max_video_seconds, self.auto_fps, self.max_pixels = max_video_seconds, auto_fps, max_pixels
        self.wrapper_tokens = wrapper_length(tokenizer)
        self.stats = IngestStats()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lwm-ingest")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plan

    async def plan(self, requests: Sequence[MediaRequest], *, text_tokens: int, max_tokens: int | None,
                   auto_fps: bool | None = None) -> tuple[list[PlannedMedia], Budget]:
        """Frame counts and the token budget; fits the context or raises.

        Args:
            requests: the request's media, in prompt order.
            text_tokens: the prompt's tokens without any media.
            max_tokens: the request's explicit completion budget (None: the server picks).
            auto_fps: the request's choice (None: the server's setting); a part's own
                `auto_fps` wins for that part.

        Raises:
            APIError: bad media (400/415), or too long for the context (400 with the
                numbers and a sampling that fits).
        """
        plans, budget = await self.estimate(requests, text_tokens=text_tokens, max_tokens=max_tokens)
        if budget.fits:
            return plans, budget
        default_auto = self.auto_fps if auto_fps is None else auto_fps
        adjustable = [i for i, p in enumerate(plans) if not p.is_image
                      and (p.request.auto_fps if p.request.auto_fps is not None else default_auto)]
        shares = self._shares(plans, budget, adjustable)
        if adjustable and shares is not None:
            for i in adjustable:
                if shares[i] < plans[i].n_frames:
                    plans[i] = await asyncio.to_thread(self._refit, plans[i], shares[i])
            budget = self._budget(plans, text_tokens, max_tokens)
            if budget.fits:
                for p in plans:
                    if p.adjusted:
                        logger.info("auto_fps: %s sampled as %s (%d frames) to fit the context",
                                    p.request.source.label, p.spec.key(), p.n_frames)
                return plans, budget
        raise self._too_long(plans, budget)

    async def estimate(self, requests: Sequence[MediaRequest], *, text_tokens: int,
                       max_tokens: int | None) -> tuple[list[PlannedMedia], Budget]:
        """Frame counts and the token budget of the sampling as requested (nothing
        decoded, nothing fitted; only bad media raise)."""
        plans = [await asyncio.to_thread(self._plan_one, r) for r in requests]
        return plans, self._budget(plans, text_tokens, max_tokens)

    def suggestions(self, plans: Sequence[PlannedMedia], budget: Budget) -> dict[int, tuple[int, float | None]]:
        """Per video (index): the frames it may take so that everything fits, and the
        fps giving about as many over its range (None: unknown). Empty: nothing fits."""
        videos = [i for i, p in enumerate(plans) if not p.is_image]
        shares = self._shares(plans, budget, videos) or {}
        out = {}
        for i, frames in shares.items():
            span = _span_s(plans[i].request.spec, plans[i].info)
            out[i] = (frames, _round_down(frames / span) if span > 0 else None)
        return out

    def _plan_one(self, req: MediaRequest) -> PlannedMedia:
        src = req.source
        try:
            if media_decode.is_image(src.data, self.max_pixels):
                key = cache_key(src.sha256, _IMAGE_SPEC, self.vqgan.identity)
                return PlannedMedia(req, True, _IMAGE_SPEC, 1, key, hit=self.cache.get_entry(key))
            key = cache_key(src.sha256, req.spec, self.vqgan.identity)
            hit = self.cache.get_entry(key)
            if hit is not None:
                return PlannedMedia(req, False, req.spec, len(hit[0]), key, hit=hit)
            info = media_decode.probe_video(src.data, self.max_video_seconds, max_pixels=self.max_pixels)
        except MediaError as exc:
            raise self._media_error(exc, req) from exc
        n = self._estimate(req.spec, info)
        if n < 1:
            raise InvalidRequestError(
                f"{src.label}: the sampling {_spec_text(req.spec)} picks no frame of this "
                f"{info.duration_s:.1f} s video", param=req.param, code="no_frames")
        return PlannedMedia(req, False, req.spec, n, key, info=info)

    @staticmethod
    def _estimate(spec: SamplingSpec, info: media_decode.VideoInfo) -> int:
        if info.n_frames_estimate <= 0:  # no duration or frame count in the container: assume the cap
            return spec.max_frames or DEFAULT_MAX_FRAMES
        return estimate_n_frames(spec, info.n_frames_estimate, info.duration_s)

    def _refit(self, plan: PlannedMedia, frames: int) -> PlannedMedia:
        req = plan.request
        info = plan.info
        if info is None:  # planned from a cache hit: probe now
            try:
                info = media_decode.probe_video(req.source.data, self.max_video_seconds,
                                                max_pixels=self.max_pixels)
            except MediaError as exc:
                raise self._media_error(exc, req) from exc
        spec = fit_spec(req.spec, info, frames)
        key = cache_key(req.source.sha256, spec, self.vqgan.identity)
        hit = self.cache.get_entry(key)
        n = len(hit[0]) if hit is not None else min(self._estimate(spec, info), frames)
        return PlannedMedia(req, False, spec, n, key, hit=hit, info=info, adjusted=True)

    def _budget(self, plans: Sequence[PlannedMedia], text_tokens: int, max_tokens: int | None) -> Budget:
        frames = sum(p.n_frames for p in plans)
        return Budget(self.context_limit, text_tokens, frames * TOKENS_PER_FRAME,
                      self.wrapper_tokens * len(plans), max_tokens or 1)

    @staticmethod
    def _shares(plans: Sequence[PlannedMedia], budget: Budget, videos: Sequence[int]) -> dict[int, int] | None:
        """Frames per video once fixed items (images, others) are counted; None: nothing fits."""
        fixed = sum(p.n_frames for i, p in enumerate(plans) if i not in videos)
        free = budget.free_frames - fixed
        wanted = sum(plans[i].n_frames for i in videos)
        if not videos or free < len(videos):
            return None
        shares = {i: max(1, plans[i].n_frames * free // wanted) for i in videos}
        return shares if sum(shares.values()) <= free else None

    def _too_long(self, plans: Sequence[PlannedMedia], budget: Budget) -> InvalidRequestError:
        frames = sum(p.n_frames for p in plans)
        videos = [i for i, p in enumerate(plans) if not p.is_image]
        head = (f"this request needs about {budget.prompt_tokens} prompt tokens ({frames} frames x "
                f"{TOKENS_PER_FRAME} = {budget.vision_tokens} vision tokens + {budget.text_tokens + budget.wrapper_tokens}"
                f" text tokens) plus {budget.new_tokens} new tokens, but the context is {budget.context} tokens")
        hints = self.suggestions(plans, budget)
        if not hints:
            return InvalidRequestError(head + "; even one frame per video does not fit: shorten the text or "
                                       "max_tokens, or send fewer images/videos", param="messages",
                                       code="context_length_exceeded")
        hint_texts = []
        for i, (frames, fps) in hints.items():
            hint = f"max_frames={frames}" + (f" (or fps={fps:.3g})" if fps is not None else "")
            hint_texts.append(f"{plans[i].request.param}: {hint}")
        param = plans[videos[0]].request.param if len(videos) == 1 else "messages"
        return InvalidRequestError(f"{head}; sample fewer frames, e.g. {'; '.join(hint_texts)}, or send "
                                   "\"auto_fps\": true to let the server choose", param=param,
                                   code="context_length_exceeded")

    # ------------------------------------------------------------------ encode

    async def encode(self, plans: Sequence[PlannedMedia],
                     on_event: Callable[[IngestEvent], None] | None = None) -> list[EncodedMedia]:
        """Frame codes of every planned item (the plan's cache hit, else `encode_media` on the ingest thread).

        Args:
            plans: from `plan`.
            on_event: called on the event loop with each IngestEvent.
        """
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def emit(event: IngestEvent) -> None:  # on the ingest thread
            if cancel.is_set():
                raise _Cancelled()
            if on_event is not None:
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
                    out.append(await loop.run_in_executor(self._executor, self._ingest, i, plan, emit))
                except MediaError as exc:
                    raise self._media_error(exc, plan.request) from exc
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

    def _ingest(self, index: int, plan: PlannedMedia, emit: Callable[[IngestEvent], None]) -> EncodedMedia:
        """`vision_cache.encode_media` with progress events (on the ingest thread).

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
                return
            last = now
            rate = None if plan.is_image else done / max(now - t0, 1e-9)
            emit(IngestEvent(stage, index, done, total, rate))

        codes, timestamps = encode_media(src.data, plan.spec, self.vqgan, self.cache,
                                         max_duration_s=self.max_video_seconds, progress=on_progress,
                                         content_sha256=src.sha256, label=src.label, max_pixels=self.max_pixels)
        if not len(codes):
            raise InvalidRequestError(f"{src.label}: the sampling {_spec_text(plan.spec)} picks no frame",
                                      param=plan.request.param, code="no_frames")
        n = len(codes)
        with self._lock:
            if cached:
                self.stats.cache_hits += 1
            else:
                self.stats.cache_misses += 1
                self.stats.frames_decoded += n
                self.stats.frames_encoded += n
        return EncodedMedia(codes, timestamps, plan.spec, cached, plan.is_image)

    @staticmethod
    def _media_error(exc: MediaError, req: MediaRequest) -> APIError:
        err = to_api_error(exc, param=req.param)
        err.message = req.source.clean_message(err.message)
        err.args = (err.message,)
        return err


def _spec_text(spec: SamplingSpec) -> str:
    parts = [f"{k}={v}" for k, v in (("fps", spec.fps), ("max_frames", spec.max_frames), ("start", spec.start),
                                     ("end", spec.end)) if v is not None]
    return "(" + ", ".join(parts) + ")" if parts else "(default)"
