"""/v1/completions semantics: raw prompt(s) -> rows -> response or chunks.

A string prompt is encoded as the reference tokenizer does (BOS prepended); a
token-id prompt is used as given. Several prompts and `n` run as one batch of
`len(prompts) * n` rows; choice `i * n + j` is prompt i's j-th sample.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import AsyncIterator, Sequence

from lwm_serve.model.generation import ContextLengthError, PromptRow
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import GenerationRequest, RequestRecord
from lwm_serve.server.errors import InvalidRequestError, UnsupportedFeatureError, to_api_error
from lwm_serve.server.handlers import common
from lwm_serve.server.handlers.choices import choice_events
from lwm_serve.server.handlers.logprobs import TokenTexts, completion_logprobs
from lwm_serve.server.handlers.text_output import ChoiceDecoder
from lwm_serve.server.schemas.common import UsageInfo, dump
from lwm_serve.server.schemas.completions import CompletionChoice, CompletionRequest, CompletionResponse
from lwm_serve.tokenizers.text import TextTokenizer

logger = logging.getLogger(__name__)


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's prompts: each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    out = list(prompt)
    if any(isinstance(p, list) and not p for p in out):
        raise InvalidRequestError("a token-id prompt must not be empty", param="prompt")
    return out  # type: ignore[return-value]


class CompletionHandler:
    """Built once at startup; `create()` serves one request."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, model_name: str, model_vocab_size: int,
                 limits: common.HandlerLimits = common.HandlerLimits()) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.vocab_size, self.limits = model_vocab_size, limits
        self.texts = TokenTexts(tokenizer)

    def _encode(self, prompts: Sequence[str | list[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(self.tokenizer.encode(p))
                continue
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the model's vocabulary "
                                          f"[0, {self.vocab_size})", param="prompt")
            out.append(list(p))
        return out

    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[dict]:
        """Validates and submits the request (see ChatHandler.create)."""
        common.check_model(req.model, self.model_name)
        common.reject_unsupported(req.unsupported())
        common.check_stream_options(req.stream, req.stream_options)
        if req.echo and req.logprobs is not None:
            raise UnsupportedFeatureError("echo with logprobs (prompt logprobs) is not supported", param="echo")
        stops = common.stop_strings(req.stop)
        prompts = prompt_list(req.prompt)
        common.check_rows(len(prompts) * req.n, self.limits.max_batch)
        ids = await asyncio.to_thread(self._encode, prompts)
        longest = max(len(p) for p in ids)
        try:
            max_tokens = common.resolve_max_tokens(req.max_tokens, longest, self.engine.context_limit,
                                                   self.limits.default_max_tokens)
        except ContextLengthError as exc:
            raise to_api_error(exc, param="prompt") from exc
        sampling = common.sampling_params(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                          presence_penalty=req.presence_penalty,
                                          frequency_penalty=req.frequency_penalty)
        stop_ids = () if req.ignore_eos else (self.tokenizer.eos_id,)
        top_n = req.logprobs or 0
        rows = [PromptRow(p) for p in ids for _ in range(req.n)]
        request_id = self.engine.new_request_id()
        gen_request = GenerationRequest(request_id, rows, [sampling] * len(rows), max_tokens, seed=req.seed,
                                        stop_token_ids=stop_ids, top_logprobs=top_n,
                                        logprobs=req.logprobs is not None)
        try:
            handle = self.engine.submit(gen_request)
        except ContextLengthError as exc:
            raise to_api_error(exc, param="prompt") from exc
        logger.info("[%s] completion: %d prompts (longest %d tokens), n %d, max_tokens %d, stream %s",
                    request_id, len(ids), longest, req.n, max_tokens, req.stream)
        decoders = [ChoiceDecoder(self.tokenizer, stops, stop_ids, keep_logprobs=req.logprobs is not None)
                    for _ in rows]
        echoes = ([p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts for _ in range(req.n)]
                  if req.echo else [""] * len(rows))
        prompt_tokens = sum(len(p) for p in ids)
        events = choice_events(handle, decoders, top_n)
        response_id = f"cmpl-{request_id}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(response_id, req, events, decoders, echoes, prompt_tokens, include_usage,
                                handle.record)
        return await self._collect(response_id, req, events, decoders, echoes, prompt_tokens, handle.record)

    @staticmethod
    def _usage(prompt_tokens: int, decoders: Sequence[ChoiceDecoder], record: RequestRecord) -> UsageInfo:
        completion = sum(d.completion_tokens for d in decoders)
        return UsageInfo.of(prompt_tokens, completion, record.cached_tokens)

    async def _collect(self, response_id: str, req: CompletionRequest, events: AsyncIterator,
                       decoders: Sequence[ChoiceDecoder], echoes: list[str],
                       prompt_tokens: int, record: RequestRecord) -> CompletionResponse:
        n = len(decoders)
        texts = list(echoes)
        records: list[list] = [[] for _ in range(n)]
        async with aclosing(events):  # leaving early aborts the engine request now
            async for step_events in events:
                for ev in step_events:
                    texts[ev.index] += ev.text
                    records[ev.index] += ev.records
        choices = [
            CompletionChoice(index=i, text=texts[i], finish_reason=decoders[i].finish_reason or "length",
                             logprobs=(completion_logprobs(records[i], self.texts, len(echoes[i]))
                                       if req.logprobs is not None else None))
            for i in range(n)]
        return CompletionResponse(id=response_id, created=common.now(), model=self.model_name,
                                  choices=choices, usage=self._usage(prompt_tokens, decoders, record))

    async def _stream(self, response_id: str, req: CompletionRequest, events: AsyncIterator,
                      decoders: Sequence[ChoiceDecoder], echoes: list[str], prompt_tokens: int,
                      include_usage: bool, record: RequestRecord) -> AsyncIterator[dict]:
        created = common.now()

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> dict:
            return dump(CompletionResponse(id=response_id, created=created, model=self.model_name,
                                           choices=choices, usage=usage))

        for i, echo in enumerate(echoes):
            if echo:
                yield chunk([CompletionChoice(index=i, text=echo)])
        async with aclosing(events):  # leaving early aborts the engine request now
            async for step_events in events:
                for ev in step_events:
                    logprobs = (completion_logprobs(ev.records, self.texts, len(echoes[ev.index]))
                                if req.logprobs is not None else None)
                    yield chunk([CompletionChoice(index=ev.index, text=ev.text, logprobs=logprobs,
                                                  finish_reason=ev.finish_reason)])
        if include_usage:
            yield chunk([], self._usage(prompt_tokens, decoders, record))

