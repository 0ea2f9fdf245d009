"""/v1/chat/completions semantics: messages -> prompt row(s) -> response or chunks.

The prompt is the reference chat format built by `tokenizers.chat_template.build_chat`
(`<s>{system} USER: ...\n ASSISTANT:`; role `developer` counts as `system`). Text
is sampled from the text head with the tokenizer's EOS as the stop token (unless
`ignore_eos`). `n` choices run as n rows of one batch; with a `seed` all rows are
sampled from one key, so the same seed and n give the same choices.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import AsyncIterator, Sequence

from lwm_serve.model.generation import PromptRow
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import GenerationRequest
from lwm_serve.server.errors import InvalidRequestError, UnsupportedFeatureError, to_api_error
from lwm_serve.server.handlers import common
from lwm_serve.server.handlers.choices import choice_events
from lwm_serve.server.handlers.logprobs import TokenTexts, chat_logprobs
from lwm_serve.server.handlers.text_output import ChoiceDecoder
from lwm_serve.server.schemas.chat import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                           ChatCompletionResponse, ChatMessage, ChatStreamChoice,
                                           ChoiceLogprobs, DeltaMessage, ResponseMessage)
from lwm_serve.server.schemas.common import UsageInfo, dump
from lwm_serve.tokenizers.chat_template import Message, TemplateError, build_chat
from lwm_serve.tokenizers.text import TextTokenizer

logger = logging.getLogger(__name__)


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a message's content (string, or text parts joined by newlines).

    Raises:
        UnsupportedFeatureError: a non-text part (image_url, video_url, input_audio...).
        InvalidRequestError: a text part without text, or a user message without content.
    """
    content = message.content
    if content is None:
        if message.role == "user":
            raise InvalidRequestError("a user message needs content", param=f"messages[{index}].content")
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise UnsupportedFeatureError(f"content part type {part.type!r} is not supported yet",
                                          param=f"messages[{index}].content[{j}].type")
        if part.text is None:
            raise InvalidRequestError("a text content part needs 'text'",
                                      param=f"messages[{index}].content[{j}].text")
        texts.append(part.text)
    return "\n".join(texts)


def template_messages(messages: Sequence[ChatMessage]) -> list[Message]:
    """Wire messages -> chat-template messages (rejecting tool turns)."""
    out = []
    for i, m in enumerate(messages):
        if m.role in ("tool", "function"):
            raise UnsupportedFeatureError(
                f"messages with role {m.role!r} are not supported (tools are not supported)",
                param=f"messages[{i}].role")
        if m.tool_calls:
            raise UnsupportedFeatureError("assistant tool_calls are not supported (tools are not supported)",
                                          param=f"messages[{i}].tool_calls")
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role, message_text(m, i)))
    return out


class ChatHandler:
    """Built once at startup; `create()` serves one request.

    Args:
        engine: the model engine.
        tokenizer: the text tokenizer (EOS, encode, incremental decode).
        model_name: the served model id.
        limits: default completion length, most rows per request.
    """

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, model_name: str,
                 limits: common.HandlerLimits = common.HandlerLimits()) -> None:
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits
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
        messages = template_messages(req.messages)
        try:
            prompt = await asyncio.to_thread(build_chat, self.tokenizer, messages)
        except TemplateError as exc:
            raise to_api_error(exc, param="messages") from exc
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
                                        seed=req.seed, stop_token_ids=stop_ids, top_logprobs=top_n)
        handle = self.engine.submit(gen_request)  # ContextLengthError / QueueFullError raise here
        logger.info("[%s] chat: prompt %d tokens, n %d, max_tokens %d, stream %s", request_id,
                    len(prompt.ids), req.n, max_tokens, req.stream)
        decoders = [ChoiceDecoder(self.tokenizer, stops, stop_ids, keep_logprobs=req.logprobs)
                    for _ in range(req.n)]
        usage = _Usage(len(prompt.ids), decoders)
        events = choice_events(handle, decoders, top_n)
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

        for i in range(req.n):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""),
                                          logprobs=ChoiceLogprobs(content=[]) if req.logprobs else None)])
        async with aclosing(events):  # leaving early aborts the engine request now
            async for step_events in events:
                for ev in step_events:
                    logprobs = chat_logprobs(ev.records, self.texts) if req.logprobs else None
                    yield chunk([ChatStreamChoice(index=ev.index, delta=DeltaMessage(content=ev.text),
                                                  logprobs=logprobs, finish_reason=ev.finish_reason)])
        if include_usage:
            yield dump(ChatCompletionChunk(id=response_id, created=created, model=self.model_name,
                                           choices=[], usage=usage.info()))


class _Usage:
    def __init__(self, prompt_tokens: int, decoders: Sequence[ChoiceDecoder]) -> None:
        self.prompt_tokens, self.decoders = prompt_tokens, decoders

    def info(self) -> UsageInfo:
        completion = sum(d.completion_tokens for d in self.decoders)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)
