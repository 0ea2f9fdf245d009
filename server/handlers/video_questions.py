"""POST /v1/video/questions semantics: one video (or image) + one question -> one answer.

The prompt is the reference's single-turn chat (`chat_prompt`: question, then
the vision segment, then ` ASSISTANT:`) in the server's frame layout. The
answer is JSON (`VideoAnswer`), or SSE (`stream=true`): `event: progress`
events while the media is decoded / VQGAN-encoded / prefilled, then
`video.answer.chunk` data events with text deltas (the last one with
finish_reason, usage and media details), then `data: [DONE]`.

The handler owns the media source it is given: its temp file (an upload the
client did not ask to keep, a fetched URL) is removed once the frames are
encoded, or when anything fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import AsyncIterator

from lwm_serve.model.generation import PromptRow
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import GenerationRequest, PrefillProgress
from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.handlers import common
from lwm_serve.server.handlers.choices import choice_events
from lwm_serve.server.handlers.text_output import ChoiceDecoder
from lwm_serve.server.handlers.video_form import read_question
from lwm_serve.server.multipart import RequestBody
from lwm_serve.server.media_sources import MediaSource
from lwm_serve.server.schemas.common import dump
from lwm_serve.server.schemas.video import (FrameInfo, MediaDetails, SamplingUsed, VideoAnswer, VideoAnswerChunk,
                                            VideoPlan, VideoPlanRequest, VideoQuestionForm, VideoUsage)
from lwm_serve.server.streaming import SSEEvent
from lwm_serve.server.media_ingest import EncodedMedia, IngestEvent
from lwm_serve.server.media_plan import MediaRequest, PlannedMedia, suggestions
from lwm_serve.server.media_service import MediaService
from lwm_serve.tokenizers.chat_template import PromptTokens, chat_prompt
from lwm_serve.tokenizers.frame_sampling import estimate_timestamps
from lwm_serve.tokenizers.text import TextTokenizer

logger = logging.getLogger(__name__)

NO_VQGAN = "this server was started without a VQGAN (--vqgan): images and video need one"


class VideoQuestionHandler:
    """Built once at startup.

    Args:
        engine: the model engine.
        tokenizer: the text tokenizer.
        model_name: the served model id.
        vision: media -> frame codes (None: no VQGAN, every question gets a 400).
        limits: default completion length.
    """

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, model_name: str, vision: MediaService | None,
                 limits: common.HandlerLimits = common.HandlerLimits()) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.vision, self.limits = vision, limits

    def require_vision(self) -> MediaService:
        if self.vision is None:
            raise InvalidRequestError(NO_VQGAN, code="vision_unavailable")
        return self.vision

    async def read(self, body: RequestBody) -> tuple[VideoQuestionForm, MediaSource | None]:
        """The request's form and upload (`video_form.read_question`); a server without
        a VQGAN refuses before reading a possibly huge body."""
        return await read_question(body, self.require_vision().sources)

    async def answer(self, form: VideoQuestionForm,
                     upload: MediaSource | None) -> VideoAnswer | AsyncIterator[dict | SSEEvent]:
        """Plans (4xx before anything streams), then answers or returns the SSE iterator.

        The handler owns `upload`: its temp file is removed once encoded, and a kept
        (`store=true`) upload is removed again unless the answer reaches the client.
        """
        source = upload
        try:
            common.check_model(form.model, self.model_name)
            vision = self.require_vision()
            if source is None:
                ref, param = (form.file_id, "file_id") if form.file_id else (form.url, "url")
                if not ref:
                    raise InvalidRequestError("send the video as 'file' (an upload), 'file_id' or 'url'",
                                              param="file")
                source = await vision.sources.resolve(ref, param)
            text_only = await asyncio.to_thread(chat_prompt, self.tokenizer, form.question)
            request = MediaRequest(source, form.spec(), form.auto_fps, "file")
            plans, _ = await vision.plan([request], text_tokens=len(text_only.ids), max_tokens=form.max_tokens)
        except BaseException:
            if source is not None:
                source.close()
                source.discard_unless_answered()
            raise
        if form.stream:
            return self._stream(form, source, plans)
        try:
            return await self._collect(form, source, plans)
        except BaseException:  # a failure, or the client left (cancelled): keep nothing
            source.discard_unless_answered()
            raise
        finally:
            source.close()

    async def _collect(self, form: VideoQuestionForm, source: MediaSource, plans: list[PlannedMedia]) -> VideoAnswer:
        try:
            encoded = await self.require_vision().encode(plans)
        finally:
            source.close()
        prompt = await self._prompt(form.question, encoded[0])
        events, decoder, rid = self._submit(form, prompt)
        text, reason = "", None
        async with aclosing(events):
            async for step_events in events:
                for ev in step_events:
                    text += ev.text
                    reason = ev.finish_reason or reason
        answer = VideoAnswer(id=f"vq-{rid}", created=common.now(), model=self.model_name, answer=text,
                             finish_reason=reason or "length", usage=_usage(prompt, decoder, encoded[0]),
                             media=_details(source, plans[0], encoded[0]))
        source.answered()  # the JSON is built; only a client gone before it is sent loses the id
        return answer

    async def plan(self, body: VideoPlanRequest) -> VideoPlan:
        """The frame budget of a question about a stored file / URL, without decoding it."""
        vision = self.require_vision()
        ref, param = (body.file_id, "file_id") if body.file_id else (body.url, "url")
        if not ref:
            raise InvalidRequestError("name the media with 'file_id' or 'url'", param="file_id")
        source = await vision.sources.resolve(ref, param)
        try:
            text_only = await asyncio.to_thread(chat_prompt, self.tokenizer, body.question)
            request = MediaRequest(source, body.spec(), False, param)
            plans, budget = await vision.estimate([request], text_tokens=len(text_only.ids),
                                                  max_tokens=body.max_tokens)
        finally:
            source.close()
        plan = plans[0]
        frames, fps = (None, None) if budget.fits else suggestions(plans, budget).get(0, (None, None))
        return VideoPlan(kind="image" if plan.is_image else "video",
                         duration_s=plan.info.duration_s if plan.info is not None else None,
                         frames=plan.n_frames, vision_tokens=budget.vision_tokens, prompt_tokens=budget.prompt_tokens,
                         max_tokens=budget.new_tokens, context=budget.context, fits=budget.fits,
                         cached=plan.hit is not None, suggested_max_frames=frames, suggested_fps=fps,
                         frame_timestamps=_planned_timestamps(plan))

    async def _prompt(self, question: str, media: EncodedMedia) -> PromptTokens:
        layout = self.require_vision().layout
        return await asyncio.to_thread(chat_prompt, self.tokenizer, question, (media.codes,), layout=layout)

    def _submit(self, form: VideoQuestionForm, prompt: PromptTokens,
                progress: bool = False) -> tuple[AsyncIterator, ChoiceDecoder, str]:
        max_tokens = common.resolve_max_tokens(form.max_tokens, len(prompt.ids), self.engine.context_limit,
                                               self.limits.default_max_tokens)
        sampling = common.sampling_params(temperature=form.temperature, top_p=form.top_p, top_k=form.top_k,
                                          presence_penalty=0.0, frequency_penalty=0.0)
        stop_ids = (self.tokenizer.eos_id,)
        rid = self.engine.new_request_id()
        handle = self.engine.submit(GenerationRequest(rid, [PromptRow(prompt.ids, prompt.vision_mask)], [sampling],
                                                      max_tokens, seed=form.seed, stop_token_ids=stop_ids,
                                                      session=form.session))
        logger.info("[%s] video question: prompt %d tokens (%d vision), max_tokens %d, stream %s", rid,
                    len(prompt.ids), sum(prompt.vision_mask), max_tokens, form.stream)
        decoder = ChoiceDecoder(self.tokenizer, [], stop_ids)
        return choice_events(handle, [decoder], progress=progress), decoder, rid

    async def _stream(self, form: VideoQuestionForm, source: MediaSource,
                      plans: list[PlannedMedia]) -> AsyncIterator[dict | SSEEvent]:
        try:
            encoded: list[EncodedMedia] = []
            async for item in self.require_vision().encode_events(plans):
                if isinstance(item, IngestEvent):
                    yield SSEEvent("progress", item.as_dict())
                else:
                    encoded = item
            source.close()
            prompt = await self._prompt(form.question, encoded[0])
            n = len(prompt.ids)
            yield SSEEvent("progress", {"stage": "prefill", "item": 0, "done": 0, "total": n})
            events, decoder, rid = self._submit(form, prompt, progress=True)
            created, started = common.now(), time.monotonic()
            reason = None

            def chunk(delta: str, finish: str | None = None, **extra: object) -> dict:
                return dump(VideoAnswerChunk(id=f"vq-{rid}", created=created, model=self.model_name, delta=delta,
                                             finish_reason=finish, **extra))  # type: ignore[arg-type]

            first = True
            async with aclosing(events):
                async for step_events in events:
                    if isinstance(step_events, PrefillProgress):  # from the prefill itself, chunk by chunk
                        p = step_events
                        yield SSEEvent("progress", {
                            "stage": "prefill", "item": 0, "done": p.tokens_done, "total": p.tokens_total,
                            "chunks_done": p.chunks_done, "chunks_total": p.chunks_total,
                            "cached_tokens": p.cached_tokens, "seconds": round(time.monotonic() - started, 3)})
                        continue
                    if first:  # the first token was sampled (its text may still be empty)
                        first = False
                        yield SSEEvent("progress", {"stage": "first_token", "item": 0,
                                                    "seconds": round(time.monotonic() - started, 3)})
                    for ev in step_events:
                        reason = ev.finish_reason or reason
                        if ev.text:
                            yield chunk(ev.text)
            last = chunk("", reason or "length", usage=_usage(prompt, decoder, encoded[0]),
                         media=_details(source, plans[0], encoded[0]))
            yield last
            source.answered()  # the chunk with the file id went out
        finally:
            source.close()
            source.discard_unless_answered()


def _planned_timestamps(plan: PlannedMedia) -> list[float] | None:
    if plan.is_image:
        return None
    if plan.hit is not None:
        return [round(float(t), 6) for t in plan.hit[1]]
    info = plan.info
    if info is None or info.n_frames_estimate <= 0:
        return None
    return [round(t, 6) for t in estimate_timestamps(plan.spec, info.n_frames_estimate, info.duration_s)]


def _usage(prompt: PromptTokens, decoder: ChoiceDecoder, media: EncodedMedia) -> VideoUsage:
    completion = decoder.completion_tokens
    return VideoUsage(prompt_tokens=len(prompt.ids), completion_tokens=completion,
                      total_tokens=len(prompt.ids) + completion, vision_tokens=int(sum(prompt.vision_mask)),
                      frames=len(media.codes))


def _details(source: MediaSource, plan: PlannedMedia, media: EncodedMedia) -> MediaDetails:
    spec = media.spec
    sampling = SamplingUsed() if media.is_image else SamplingUsed(
        fps=spec.fps, max_frames=spec.max_frames, start=spec.start, end=spec.end, auto_adjusted=plan.adjusted)
    return MediaDetails(
        kind="image" if media.is_image else "video", file_id=source.file_id, sha256=source.sha256,
        frames=[FrameInfo(index=i, timestamp=float(t)) for i, t in enumerate(media.timestamps)],
        sampling=sampling, cached=media.cached)
