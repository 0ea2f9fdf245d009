"""/v1/chat/completions semantics: messages -> prompt row(s) -> response or chunks.

The prompt is the reference chat format built by `tokenizers.chat_template.build_chat`
(`<s>{system} USER: ...\n ASSISTANT:`; role `developer` counts as `system`). Text
is sampled from the text head with the tokenizer's EOS as the stop token (unless
`ignore_eos`). `n` choices run as n rows of one batch; with a `seed` all rows are
sampled from one key, so the same seed and n give the same choices.

Images and video (image_url / video_url / file parts, `handlers.media_parts`)
are resolved and budgeted before anything streams (bad media and too-long
requests get their 4xx status), then VQGAN-encoded by the `MediaService`
(cache first) and spliced into the user message that carried them, after its
text, in the configured frame layout. A streaming request reports ingestion as
SSE comment lines (`: progress stage=decode ...`) before the first chunk.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from lwm_serve.model.generation import PromptRow
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import GenerationRequest, PrefillProgress, RequestRecord
from lwm_serve.server.errors import InvalidRequestError, to_api_error
from lwm_serve.server.handlers import common
from lwm_serve.server.handlers.choices import choice_events
from lwm_serve.server.handlers.logprobs import TokenTexts, chat_logprobs
from lwm_serve.server.handlers.media_parts import MediaPart, ParsedMessage, parse_messages
from lwm_serve.server.handlers.text_output import ChoiceDecoder
from lwm_serve.server.schemas.chat import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                           ChatCompletionResponse, ChatStreamChoice,
                                           ChoiceLogprobs, DeltaMessage, ResponseMessage)
from lwm_serve.server.media_sources import MediaSource
from lwm_serve.server.schemas.common import UsageInfo, dump
from lwm_serve.server.streaming import SSEComment
from lwm_serve.server.media_ingest import EncodedMedia, IngestEvent
from lwm_serve.server.media_plan import MediaRequest, PlannedMedia
from lwm_serve.server.media_service import MediaService
from lwm_serve.tokenizers.chat_template import Message, PromptTokens, TemplateError, build_chat
from lwm_serve.tokenizers.text import TextTokenizer

logger = logging.getLogger(__name__)


def template_messages(parsed: Sequence[ParsedMessage], media: Sequence[EncodedMedia] = ()) -> list[Message]:
    """Parsed messages -> chat-template messages, each user message getting its media's
    frame codes in part order (`media` lists every message's media, in message order)."""
    out, k = [], 0
    for m in parsed:
        codes = tuple(media[k + j].codes for j in range(len(m.media))) if media else ()
        k += len(m.media)
        out.append(Message(m.role, m.text, codes))
    return out


@dataclass
class _MediaPlan:
    """A request's resolved media and their plan; `close()` removes temp files."""

    sources: list[MediaSource]
    plans: list[PlannedMedia]

    def close(self) -> None:
        for src in self.sources:
            src.close()


class ChatHandler:
    """Built once at startup; `create()` serves one request.

    Args:
        engine: the model engine.
        tokenizer: the text tokenizer (EOS, encode, incremental decode).
        model_name: the served model id.
        limits: default completion length, most rows per request.
        vision: images/video -> frame codes (None: the server has no VQGAN; media parts get a 400).
    """

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, model_name: str,
                 limits: common.HandlerLimits = common.HandlerLimits(), vision: MediaService | None = None) -> None:
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
        self.vision = vision
        self.texts = TokenTexts(tokenizer)

    async def create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[dict]:
        """Validates and submits the request.

        Returns:
            The response, or (stream=True) an async iterator of chunk dicts to frame as SSE.
        Raises:
            APIError subclasses (bad request, unknown model, queue full) before anything streams.
        """
        common.check_model(req.model, self.model_name)
        common.reject_unsupported(req.unsupported())
        common.check_stream_options(req.stream, req.stream_options)
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        common.check_rows(req.n, self.limits.max_batch)
        stops = common.stop_strings(req.stop)
        parsed = parse_messages(req.messages)
        parts = [p for m in parsed for p in m.media]
        if not parts:
            return await self._start(req, await self._prompt(parsed), stops)
        media = await self._plan_media(req, parsed, parts)
        if req.stream:
            return self._stream_media(req, parsed, media, stops)
        try:
            encoded = await self.vision.encode(media.plans)  # type: ignore[union-attr]
        finally:
            media.close()
        return await self._start(req, await self._prompt(parsed, encoded), stops)

    async def _prompt(self, parsed: Sequence[ParsedMessage], media: Sequence[EncodedMedia] = ()) -> PromptTokens:
        layout = self.vision.layout if self.vision is not None else "standard"
        try:
            return await asyncio.to_thread(build_chat, self.tokenizer, template_messages(parsed, media),
                                           layout=layout)
        except TemplateError as exc:
            raise to_api_error(exc, param="messages") from exc

    async def _plan_media(self, req: ChatCompletionRequest, parsed: Sequence[ParsedMessage],
                          parts: Sequence[MediaPart]) -> _MediaPlan:
        """Resolves every media part and checks the frame budget (4xx before anything streams)."""
        if self.vision is None:
            raise InvalidRequestError("this server was started without a VQGAN (--vqgan): image and video "
                                      "parts need one", param=parts[0].param, code="vision_unavailable")
        text_only = await self._prompt(parsed)
        media = _MediaPlan([], [])
        try:
            requests = []
            for part in parts:
                src = await self.vision.sources.resolve(part.url, part.param)
                media.sources.append(src)
                requests.append(MediaRequest(src, part.options.spec(), part.options.auto_fps, part.param))
            explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            media.plans, _ = await self.vision.plan(requests, text_tokens=len(text_only.ids), max_tokens=explicit,
                                                    auto_fps=req.auto_fps)
        except BaseException:
            media.close()
            raise
        return media

    async def _stream_media(self, req: ChatCompletionRequest, parsed: Sequence[ParsedMessage], media: _MediaPlan,
                            stops: list[str]) -> AsyncIterator[dict | SSEComment]:
        """Ingestion progress as SSE comments (OpenAI clients skip them), then the usual chunks."""
        try:
            encoded: list[EncodedMedia] = []
            async for item in self.vision.encode_events(media.plans):  # type: ignore[union-attr]
                if isinstance(item, IngestEvent):
                    yield SSEComment(item.describe())
                else:
                    encoded = item
            media.close()
            prompt = await self._prompt(parsed, encoded)
            yield SSEComment(f"progress stage=prefill prompt_tokens={len(prompt.ids)}")
            stream = await self._start(req, prompt, stops)
            async with aclosing(stream):  # type: ignore[type-var]
                async for chunk in stream:  # type: ignore[union-attr]
                    yield chunk
        finally:
            media.close()

    async def _start(self, req: ChatCompletionRequest, prompt: PromptTokens,
                     stops: list[str]) -> ChatCompletionResponse | AsyncIterator[dict]:
        """Submits the prompt; the response, or (stream) the chunk iterator."""
        max_tokens = common.resolve_max_tokens(
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
            len(prompt.ids), self.engine.context_limit, self.limits.default_max_tokens)
        sampling = common.sampling_params(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                          presence_penalty=req.presence_penalty,
                                          frequency_penalty=req.frequency_penalty)
        stop_ids = () if req.ignore_eos else (self.tokenizer.eos_id,)
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        row = PromptRow(prompt.ids, prompt.vision_mask)
        request_id = self.engine.new_request_id()
        gen_request = GenerationRequest(request_id, [row] * req.n, [sampling] * req.n, max_tokens,
                                        seed=req.seed, stop_token_ids=stop_ids, top_logprobs=top_n,
                                        logprobs=bool(req.logprobs), session=req.session)
        handle = self.engine.submit(gen_request)  # ContextLengthError / QueueFullError raise here
        logger.info("[%s] chat: prompt %d tokens (%d vision), n %d, max_tokens %d, stream %s", request_id,
                    len(prompt.ids), sum(prompt.vision_mask), req.n, max_tokens, req.stream)
        decoders = [ChoiceDecoder(self.tokenizer, stops, stop_ids, keep_logprobs=req.logprobs)
                    for _ in range(req.n)]
        usage = _Usage(len(prompt.ids), decoders, handle.record)
        events = choice_events(handle, decoders, top_n, progress=req.stream)
        response_id = f"chatcmpl-{request_id}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(response_id, req, events, usage, include_usage)
        return await self._collect(response_id, req, events, usage)

    async def _collect(self, response_id: str, req: ChatCompletionRequest, events: AsyncIterator,
                       usage: "_Usage") -> ChatCompletionResponse:
        texts = [""] * req.n
        records: list[list] = [[] for _ in range(req.n)]
        reasons: list = [None] * req.n
        async with aclosing(events):  # leaving early aborts the engine request now
            async for step_events in events:
                for ev in step_events:
                    texts[ev.index] += ev.text
                    records[ev.index] += ev.records
                    reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        choices = [
            ChatChoice(index=i, message=ResponseMessage(content=texts[i]),
                       logprobs=chat_logprobs(records[i], self.texts) if req.logprobs else None,
                       finish_reason=reasons[i] or "length")
            for i in range(req.n)]
        return ChatCompletionResponse(id=response_id, created=common.now(), model=self.model_name,
                                      choices=choices, usage=usage.info())

    async def _stream(self, response_id: str, req: ChatCompletionRequest, events: AsyncIterator,
                      usage: "_Usage", include_usage: bool) -> AsyncIterator[dict]:
        created = common.now()
        drop = () if include_usage else ("usage",)

        def chunk(choices: list[ChatStreamChoice]) -> dict:
            return dump(ChatCompletionChunk(id=response_id, created=created, model=self.model_name,
                                            choices=choices), drop=drop)

        roles_sent = False
        async with aclosing(events):  # leaving early aborts the engine request now
            async for step_events in events:
                if isinstance(step_events, PrefillProgress):  # a comment: OpenAI clients skip it
                    p = step_events
                    yield SSEComment(f"progress stage=prefill done={p.tokens_done} total={p.tokens_total} "
                                     f"chunks={p.chunks_done}/{p.chunks_total} cached={p.cached_tokens}")
                    continue
                if not roles_sent:  # with the first sampled token, as OpenAI's streams
                    roles_sent = True
                    for i in range(req.n):
                        yield chunk([ChatStreamChoice(
                            index=i, delta=DeltaMessage(role="assistant", content=""),
                            logprobs=ChoiceLogprobs(content=[]) if req.logprobs else None)])
                for ev in step_events:
                    logprobs = chat_logprobs(ev.records, self.texts) if req.logprobs else None
                    yield chunk([ChatStreamChoice(index=ev.index, delta=DeltaMessage(content=ev.text),
                                                  logprobs=logprobs, finish_reason=ev.finish_reason)])
        if include_usage:
            yield dump(ChatCompletionChunk(id=response_id, created=created, model=self.model_name,
                                           choices=[], usage=usage.info()))


class _Usage:
    def __init__(self, prompt_tokens: int, decoders: Sequence[ChoiceDecoder], record: RequestRecord) -> None:
        self.prompt_tokens, self.decoders, self.record = prompt_tokens, decoders, record

    def info(self) -> UsageInfo:
        completion = sum(d.completion_tokens for d in self.decoders)
        return UsageInfo.of(self.prompt_tokens, completion, self.record.cached_tokens)
