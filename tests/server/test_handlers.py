"""The handlers against a fake engine (no HTTP, no model): what they submit, what they
answer, how they stream, and that leaving a stream early aborts the engine request.

The fake keeps only the engine surface the handlers use (`submit`, `new_request_id`,
`context_limit`, `check_length`, and the handle's `steps()` / `abort()`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
import pytest

from lwm_serve.model.generation import ContextLengthError, StepOutput
from lwm_serve.server.engine.request import RequestRecord, GenerationRequest
from lwm_serve.server.errors import APIError, InvalidRequestError
from lwm_serve.server.handlers.chat import ChatHandler
from lwm_serve.server.handlers.common import HandlerLimits
from lwm_serve.server.handlers.completions import CompletionHandler
from lwm_serve.server.multipart import RequestBody
from lwm_serve.server.handlers.video_questions import VideoQuestionHandler
from lwm_serve.server.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from lwm_serve.server.schemas.completions import CompletionRequest
from lwm_serve.tokenizers.text import TextTokenizer


@dataclass
class FakeHandle:
    """Hands out one scripted token per row per step; records how the request ended."""

    script: list[list[int]]  # [row][step]
    aborted: str | None = None
    steps_taken: int = 0

    async def steps(self) -> AsyncIterator[StepOutput]:
        """As the engine's: leaving the iteration early aborts the request."""
        ended = False
        try:
            for i in range(len(self.script[0])):
                if self.aborted is not None:
                    break
                await asyncio.sleep(0)
                self.steps_taken += 1
                tokens = np.array([row[i] for row in self.script], np.int32)
                yield StepOutput(index=i, tokens=tokens, logprobs=np.full(len(tokens), -0.5, np.float32),
                                 top_logprobs=np.zeros((len(tokens), 0), np.float32),
                                 top_ids=np.zeros((len(tokens), 0), np.int32), finished=np.zeros(len(tokens), bool))
            ended = True
        finally:
            if not ended:
                self.abort("client")

    def events(self) -> AsyncIterator[StepOutput]:
        """As the engine's (this fake reports no prefill progress)."""
        return self.steps()

    @property
    def record(self) -> RequestRecord:
        return RequestRecord("fake", len(self.script), len(self.script[0]))

    def abort(self, reason: str = "client") -> None:
        if self.aborted is None:
            self.aborted = reason


@dataclass
class FakeEngine:
    script: list[int]
    context_limit: int = 256
    submitted: list[GenerationRequest] = field(default_factory=list)
    handles: list[FakeHandle] = field(default_factory=list)

    def new_request_id(self, prefix: str = "") -> str:
        return f"{prefix}req{len(self.submitted)}"

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context_limit:
            raise ContextLengthError(prompt_tokens, max_new_tokens, self.context_limit)

    def submit(self, request: GenerationRequest) -> FakeHandle:
        self.check_length(max(len(r.ids) for r in request.rows), request.max_new_tokens)
        self.submitted.append(request)
        handle = FakeHandle([list(self.script) for _ in request.rows])
        self.handles.append(handle)
        return handle


@pytest.fixture(scope="module")
def tok(reference_dir) -> TextTokenizer:
    return TextTokenizer(str(reference_dir / "tokenizer"))


def _script(tok: TextTokenizer, text: str, *, eos: bool) -> list[int]:
    return tok.encode(text, add_bos=False) + ([tok.eos_id] if eos else [])


def _chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **kw})


def test_chat_submits_the_request_it_was_given_and_answers_the_text(tok):
    engine = FakeEngine(_script(tok, "Hello world", eos=True))
    handler = ChatHandler(engine, tok, "m", HandlerLimits(default_max_tokens=32))
    reply = asyncio.run(handler.create(_chat(n=2, temperature=0.5, top_p=0.9, top_k=-1, seed=3, max_tokens=20)))
    assert isinstance(reply, ChatCompletionResponse)
    (sent,) = engine.submitted
    assert len(sent.rows) == 2 and sent.seed == 3 and sent.max_new_tokens == 20
    assert sent.stop_token_ids == (tok.eos_id,)
    assert {(p.temperature, p.top_p, p.top_k) for p in sent.sampling} == {(0.5, 0.9, 0)}  # -1 means off
    assert sent.rows[0].ids[0] == tok.bos_id
    assert [c.message.content for c in reply.choices] == ["Hello world"] * 2
    assert [c.finish_reason for c in reply.choices] == ["stop"] * 2
    assert reply.usage.completion_tokens == 2 * len(engine.script)
    assert engine.handles[0].aborted == "done"  # every choice stopped: the engine is told at once


def test_chat_without_max_tokens_takes_the_default_capped_by_the_free_context(tok):
    engine = FakeEngine(_script(tok, "Hi", eos=False), context_limit=40)
    handler = ChatHandler(engine, tok, "m", HandlerLimits(default_max_tokens=1000))
    reply = asyncio.run(handler.create(_chat()))
    (sent,) = engine.submitted
    assert sent.max_new_tokens == 40 - len(sent.rows[0].ids)
    assert reply.choices[0].finish_reason == "length"


def test_chat_stream_chunks_and_leaving_early_aborts(tok):
    engine = FakeEngine(_script(tok, "one two three four five six", eos=True))
    handler = ChatHandler(engine, tok, "m")

    async def run() -> list[dict]:
        stream = await handler.create(_chat(stream=True, max_tokens=30))
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:  # role chunk + two content chunks, then the client leaves
                break
        await stream.aclose()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert engine.handles[0].aborted == "client"
    assert engine.handles[0].steps_taken < len(engine.script)


def test_chat_refusals_happen_before_anything_is_submitted(tok):
    engine = FakeEngine([tok.eos_id], context_limit=64)
    handler = ChatHandler(engine, tok, "m", HandlerLimits(max_batch=4))
    cases = [(_chat(model="other"), "model"), (_chat(n=5), "n"), (_chat(tools=[{"type": "function"}]), "tools"),
             (_chat(top_logprobs=2), "top_logprobs"),
             (ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
                 {"type": "video_url", "video_url": {"url": "file-abc"}}]}]}), "messages[0].content[0]")]
    for request, param in cases:
        with pytest.raises(APIError) as err:
            asyncio.run(handler.create(request))
        assert err.value.status in (400, 404) and err.value.param == param, (param, err.value.message)
    with pytest.raises(ContextLengthError):  # the route maps it to a 400 naming both numbers
        asyncio.run(handler.create(_chat(max_tokens=60)))
    assert engine.submitted == []


def test_completions_rows_echo_and_token_id_checks(tok):
    engine = FakeEngine(_script(tok, "ok", eos=True))
    handler = CompletionHandler(engine, tok, "m", model_vocab_size=tok.vocab_size, limits=HandlerLimits(max_batch=4))
    reply = asyncio.run(handler.create(CompletionRequest(prompt=["a", "b"], n=2, echo=True, max_tokens=5)))
    (sent,) = engine.submitted
    assert len(sent.rows) == 4 and sent.max_new_tokens == 5
    assert [c.text for c in reply.choices] == ["aok", "aok", "bok", "bok"]
    for prompt, param in (([tok.vocab_size], "prompt"), (["a"] * 3, "n")):
        with pytest.raises(InvalidRequestError) as err:
            asyncio.run(handler.create(CompletionRequest(prompt=prompt, n=2)))
        assert err.value.param == param
    assert len(engine.submitted) == 1


def test_video_questions_without_a_vqgan_refuse_before_reading_the_body(tok):
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield b"x" * 10

    handler = VideoQuestionHandler(FakeEngine([tok.eos_id]), tok, "m", None)
    with pytest.raises(InvalidRequestError) as err:
        asyncio.run(handler.read(RequestBody("multipart/form-data; boundary=b", "10", body())))
    assert err.value.code == "vision_unavailable" and read == []
