"""/v1/chat/completions end to end: real uvicorn server, official openai client, OpenAI schemas."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from lwm_serve.model.generation import PromptRow, seed_key
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.tokenizers.chat_template import Message, build_chat

QUESTION = "What is happening in this video?"


@pytest.fixture(scope="module")
def client(live, auth_headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=auth_headers["Authorization"][7:],
                         max_retries=0, timeout=120)


def _raw(live, auth_headers, body: dict) -> httpx.Response:
    return httpx.post(f"{live.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=120)


def _direct(runtime, messages: list[Message], sampling: SamplingParams, max_new: int, seed: int) -> list[int]:
    prompt = build_chat(runtime.tokenizer, messages)
    return runtime.generator.generate([PromptRow(prompt.ids, prompt.vision_mask)], sampling,
                                      max_new_tokens=max_new, key=seed_key(seed),
                                      stop_token_ids=[runtime.tokenizer.eos_id])[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_tokens_equal_direct_generation(live, client, fixture_runtime, temperature):
    seed, max_new = 11, 12
    direct = _direct(fixture_runtime, [Message("user", QUESTION)], SamplingParams(temperature=temperature),
                     max_new, seed)
    resp = client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=temperature, max_tokens=max_new, seed=seed, logprobs=True)
    tok = fixture_runtime.tokenizer
    assert resp.choices[0].message.content == tok.decode(direct, skip_special_tokens=True)
    assert resp.usage.completion_tokens == len(direct)
    content_ids = [t for t in direct if t != tok.eos_id]
    entries = resp.choices[0].logprobs.content
    assert len(entries) == len(content_ids)
    for t, entry in zip(content_ids, entries):
        if tok.is_byte(t):
            assert len(entry.bytes) == 1
        else:
            assert entry.token == tok.id_to_piece(t).replace("\u2581", " ")
            assert bytes(entry.bytes).decode() == entry.token
    expected_reason = "stop" if direct[-1] == tok.eos_id else "length"
    assert resp.choices[0].finish_reason == expected_reason


def test_multi_turn_prompt_uses_the_chat_template(live, client, fixture_runtime):
    msgs = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
            Message("user", "And now?")]
    direct = _direct(fixture_runtime, msgs, SamplingParams(temperature=0), 8, 0)
    wire = [{"role": "developer" if m.role == "system" else m.role, "content": m.content} for m in msgs]
    wire[1]["content"] = [{"type": "text", "text": "Hi"}]
    resp = client.chat.completions.create(model=live.model, messages=wire, temperature=0, max_tokens=8)
    assert resp.choices[0].message.content == fixture_runtime.tokenizer.decode(direct, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(build_chat(fixture_runtime.tokenizer, msgs).ids)


def test_non_stream_body_matches_openai_schema(live, auth_headers, validate):
    r = _raw(live, auth_headers, {"model": live.model, "messages": [{"role": "user", "content": "Hi"}],
                                  "max_completion_tokens": 5, "n": 2, "logprobs": True, "top_logprobs": 3,
                                  "temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.5,
                                  "frequency_penalty": 0.5, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    validate("CreateChatCompletionResponse", body)
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        for item in choice["logprobs"]["content"]:
            assert len(item["top_logprobs"]) == 3
            assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][-1]["logprob"]
            assert item["logprob"] <= item["top_logprobs"][0]["logprob"] + 1e-5
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 2 * 5


def test_stream_matches_non_stream_and_schema(live, client, auth_headers, validate, parse_sse):
    body = {"model": live.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 10,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, headers=auth_headers,
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    tokens = [t["token"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["content"]]
    full = client.chat.completions.create(model=live.model, messages=body["messages"], max_tokens=10,
                                          temperature=0, logprobs=True)
    assert text == full.choices[0].message.content
    assert tokens == [t.token for t in full.choices[0].logprobs.content]
    assert usage_chunk["usage"] == full.usage.model_dump(exclude_none=True)


def test_stream_without_usage_has_no_usage_field(live, auth_headers, validate, parse_sse):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, headers=auth_headers,
                      timeout=120) as r:
        events = parse_sse(r.iter_lines())
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all("usage" not in c and c["choices"] for c in chunks)
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)


def test_seed_reproducible_and_n_choices_differ(live, client):
    kwargs = dict(model=live.model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8,
                  temperature=1.0, n=3, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=1234, **kwargs)
    b = client.chat.completions.create(seed=1234, **kwargs)
    c = client.chat.completions.create(seed=4321, **kwargs)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # rows of one request are sampled with different noise
    assert all(ch.finish_reason == "length" for ch in a.choices)
    assert a.usage.completion_tokens == 3 * 8


def test_top_k_extra_body_one_is_greedy(live, client):
    msgs = [{"role": "user", "content": "Hello"}]
    greedy = client.chat.completions.create(model=live.model, messages=msgs, max_tokens=6, temperature=0)
    top1 = client.chat.completions.create(model=live.model, messages=msgs, max_tokens=6, temperature=1.5,
                                          seed=5, extra_body={"top_k": 1, "unknown_knob": 3})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


def test_stop_strings_removed_and_finish_stop(live, client, fixture_runtime):
    msgs = [{"role": "user", "content": QUESTION}]
    free = client.chat.completions.create(model=live.model, messages=msgs, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    text = free.choices[0].message.content
    assert len(text) >= 6
    stop = text[3:5]  # most likely spread over token boundaries or inside one token
    cut = client.chat.completions.create(model=live.model, messages=msgs, max_tokens=16, temperature=0,
                                         stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=live.model, messages=msgs, max_tokens=16, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True})
    parts, reasons = [], []
    for chunk in streamed:
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            reasons.append(ch.finish_reason)
    assert "".join(parts) == text[:text.index(stop)]
    assert [r for r in reasons if r] == ["stop"]


def test_async_client_concurrent_streams_all_complete(live, auth_headers):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await aclient.chat.completions.create(
            model=live.model, messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=6,
            temperature=0, stream=True, stream_options={"include_usage": True})
        text, reason, usage = "", None, None
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                reason = ch.finish_reason or reason
            usage = chunk.usage or usage
        full = await aclient.chat.completions.create(
            model=live.model, messages=[{"role": "user", "content": f"Question {i}"}], max_tokens=6, temperature=0)
        assert full.choices[0].message.content == text
        # The same prompt again (its prefill may be reused: cached_tokens may differ).
        assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens,
                                                                  full.usage.completion_tokens)
        return text, reason

    async def main():
        # The client lives inside the loop that uses it (its connections close with it).
        async with openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key=auth_headers["Authorization"][7:],
                                      max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*[one(aclient, i) for i in range(4)])

    results = asyncio.run(main())
    assert all(reason in ("stop", "length") for _, reason in results)


def test_default_max_tokens_applies_when_unset(live, client):
    r = client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == live.app.state.settings.default_max_tokens
    assert r.choices[0].finish_reason == "length"


def test_response_format_text_is_accepted(live, client):
    r = client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2, response_format={"type": "text"})
    assert r.choices[0].message.role == "assistant"


def test_top_p_changes_the_output(live, client):
    """A nucleus so small it holds one token is greedy; the full one samples (same seed)."""
    msgs = [{"role": "user", "content": "Tell me a story"}]
    kwargs = dict(model=live.model, messages=msgs, max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    narrow = client.chat.completions.create(temperature=1.5, top_p=1e-6, **kwargs).choices[0].message.content
    full = client.chat.completions.create(temperature=1.5, top_p=1.0, **kwargs).choices[0].message.content
    assert narrow == greedy
    assert full != greedy


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_change_the_output(live, client, fixture_runtime, penalty):
    """Greedy text from the fixture model repeats itself; a penalty on seen tokens breaks the loop."""
    kwargs = dict(model=live.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0,
                  logprobs=True, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kwargs).choices[0]
    penalised = client.chat.completions.create(**{penalty: 2.0}, **kwargs).choices[0]
    tokens = lambda choice: [t.token for t in choice.logprobs.content]  # noqa: E731
    assert len(set(tokens(plain))) < len(tokens(plain))  # the loop the penalty must break
    assert tokens(penalised) != tokens(plain)
    assert len(set(tokens(penalised))) > len(set(tokens(plain)))
