"""A request's images and videos -> VQGAN frame codes: plan the budget, then ingest.

Two steps, both off the event loop:

1. `plan`: for each media item, find its frame count without decoding pixels
   (a cache hit gives the exact count; a still image is one frame; a video is
   probed and its sampling estimated on the container's duration/frame count),
   then check prompt + new tokens against the context (`media_plan`, pure). Too
   long: 400 naming the numbers and a sampling that fits, or, with auto_fps,
   that sampling is used (frames shared between the videos in proportion to
   what they asked for). The code cache key is computed here, once.
2. `encode` / `encode_events`: the plan's cache hits as they are, the rest
   through `media_ingest.MediaIngester` (decode -> preprocess -> VQGAN on the
   ingest thread, bounded memory, cancellable, progress events).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable, Sequence

from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.media_ingest import EncodedMedia, IngestEvent, IngestObserver, IngestStats, MediaIngester
from lwm_serve.server.media_plan import (IMAGE_SPEC, Budget, MediaRequest, PlannedMedia, budget_of, estimate_frames,
                                         fit_spec, media_error, share_frames, spec_text, too_long_error)
from lwm_serve.server.media_sources import SourceResolver
from lwm_serve.tokenizers import media_decode, vqgan_batch
from lwm_serve.tokenizers.errors import MediaError
from lwm_serve.tokenizers.vision_cache import VisionCache, cache_key
from lwm_serve.tokenizers.vision_layout import FrameLayout, wrapper_length

logger = logging.getLogger(__name__)


class MediaService:
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
                 auto_fps: bool = False, max_pixels: int | None = None, observer: IngestObserver | None = None,
                 vqgan_batch: int | None = None) -> None:
        self.vqgan, self.cache, self.sources = vqgan, cache, sources
        self.layout, self.context_limit = layout, context_limit
        self.max_video_seconds, self.auto_fps, self.max_pixels = max_video_seconds, auto_fps, max_pixels
        self.wrapper_tokens = wrapper_length(tokenizer)
        self.vqgan_batch = vqgan_batch
        self._compiled: list[int] | None = None  # encode sizes `prepare` compiled
        self.ingester = MediaIngester(vqgan, cache, max_video_seconds=max_video_seconds, max_pixels=max_pixels,
                                      observer=observer)

    def prepare(self) -> None:
        """The warm-up's untimed half, which may run beside the model's own compiles: hash the
        VQGAN's parameters (every cache key holds that hash; seconds for the real VQGAN) and
        compile and run once the encode sizes every device uses (fixed: the batch and its
        power-of-two tails; measured: the first two candidates, which every measurement times)."""
        self.vqgan.identity  # noqa: B018  (a cached property)
        vqgan_batch.compile_encode(self.vqgan, self._first_sizes())
        self._compiled = self._first_sizes()

    def _first_sizes(self) -> list[int]:
        if self.vqgan_batch is None:
            return list(vqgan_batch.CANDIDATES[:2])
        return sorted({min(1 << k, self.vqgan_batch) for k in range(self.vqgan_batch.bit_length() + 1)})

    def warm_up(self) -> dict[int, float]:
        """Before the server says it is ready, with the model idle: `prepare` (unless done),
        then, unless --vqgan-batch fixed the batch, measure the encode sizes and keep the
        fastest (`tokenizers.vqgan_batch`). Returns the measured seconds of one call per
        size ({} when fixed)."""
        if self._compiled is None:
            self.prepare()
        if self.vqgan_batch is not None:
            self.vqgan.batch_size = self.vqgan_batch
            return {}
        return dict(self.vqgan.tune_encode(compiled=self._compiled or ()).seconds)

    @property
    def stats(self) -> IngestStats:
        return self.ingester.stats

    def close(self) -> None:
        self.ingester.close()

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
        shares = share_frames(plans, budget, adjustable)
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
        raise too_long_error(plans, budget)

    async def estimate(self, requests: Sequence[MediaRequest], *, text_tokens: int,
                       max_tokens: int | None) -> tuple[list[PlannedMedia], Budget]:
        """Frame counts and the token budget of the sampling as requested (nothing
        decoded, nothing fitted; only bad media raise)."""
        plans = [await asyncio.to_thread(self._plan_one, r) for r in requests]
        return plans, self._budget(plans, text_tokens, max_tokens)

    def _plan_one(self, req: MediaRequest) -> PlannedMedia:
        src = req.source
        try:
            if media_decode.is_image(src.data, self.max_pixels):
                key = cache_key(src.sha256, IMAGE_SPEC, self.vqgan.identity)
                return PlannedMedia(req, True, IMAGE_SPEC, 1, key, hit=self.cache.get_entry(key))
            key = cache_key(src.sha256, req.spec, self.vqgan.identity)
            hit = self.cache.get_entry(key)
            if hit is not None:
                return PlannedMedia(req, False, req.spec, len(hit[0]), key, hit=hit)
            info = media_decode.probe_video(src.data, self.max_video_seconds, max_pixels=self.max_pixels)
        except MediaError as exc:
            raise media_error(exc, req) from exc
        n = estimate_frames(req.spec, info)
        if n < 1:
            raise InvalidRequestError(
                f"{src.label}: the sampling {spec_text(req.spec)} picks no frame of this "
                f"{info.duration_s:.1f} s video", param=req.param, code="no_frames")
        return PlannedMedia(req, False, req.spec, n, key, info=info)

    def _refit(self, plan: PlannedMedia, frames: int) -> PlannedMedia:
        req = plan.request
        info = plan.info
        if info is None:  # planned from a cache hit: probe now
            try:
                info = media_decode.probe_video(req.source.data, self.max_video_seconds,
                                                max_pixels=self.max_pixels)
            except MediaError as exc:
                raise media_error(exc, req) from exc
        spec = fit_spec(req.spec, info, frames)
        key = cache_key(req.source.sha256, spec, self.vqgan.identity)
        hit = self.cache.get_entry(key)
        n = len(hit[0]) if hit is not None else min(estimate_frames(spec, info), frames)
        return PlannedMedia(req, False, spec, n, key, hit=hit, info=info, adjusted=True)

    def _budget(self, plans: Sequence[PlannedMedia], text_tokens: int, max_tokens: int | None) -> Budget:
        return budget_of(plans, context=self.context_limit, text_tokens=text_tokens,
                         wrapper_tokens=self.wrapper_tokens, max_tokens=max_tokens)

    # ------------------------------------------------------------------ encode

    async def encode(self, plans: Sequence[PlannedMedia],
                     on_event: Callable[[IngestEvent], None] | None = None) -> list[EncodedMedia]:
        """Frame codes of every planned item (`MediaIngester.encode`)."""
        return await self.ingester.encode(plans, on_event)

    def encode_events(self, plans: Sequence[PlannedMedia]) -> AsyncIterator[IngestEvent | list[EncodedMedia]]:
        """`encode` as a stream: IngestEvents as they happen, then the result list last."""
        return self.ingester.encode_events(plans)
