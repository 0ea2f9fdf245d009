"""/v1/completions end to end (raw prompts: strings and token ids)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from lwm_serve.model.generation import PromptRow, seed_key
from lwm_serve.model.sampling import SamplingParams


@pytest.fixture(scope="module")
def client(live, auth_headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=auth_headers["Authorization"][7:],
                         max_retries=0, timeout=120)


def test_string_and_token_prompts_equal_direct_generation(live, client, fixture_runtime, validate,
                                                          auth_headers):
    tok = fixture_runtime.tokenizer
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    direct = fixture_runtime.generator.generate([PromptRow(ids)], SamplingParams(temperature=0), max_new_tokens=7,
                                                key=seed_key(0), stop_token_ids=[tok.eos_id])[0]
    expected = tok.decode(direct, skip_special_tokens=True)
    by_text = client.completions.create(model=live.model, prompt=prompt, max_tokens=7, temperature=0)
    by_ids = client.completions.create(model=live.model, prompt=ids, max_tokens=7, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == len(direct)
    r = httpx.post(f"{live.base_url}/v1/completions", headers=auth_headers, timeout=120,
                   json={"prompt": [prompt, "Another one"], "max_tokens": 4, "n": 2, "logprobs": 2,
                         "echo": False, "seed": 9, "temperature": 0.9})
    assert r.status_code == 200, r.text
    body = r.json()
    validate("CreateCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for c in body["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(len(top) <= 2 for top in lp["top_logprobs"])


def test_echo_prepends_the_prompt(live, client):
    r = client.completions.create(model=live.model, prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=live.model, prompt="Echo me", max_tokens=3, temperature=0)
    assert r.choices[0].text == "Echo me" + plain.choices[0].text


def test_stream_chunks_and_usage(live, auth_headers, validate, parse_sse, client):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "stop": ["zz"]}
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=body, headers=auth_headers,
                      timeout=120) as r:
        assert r.status_code == 200
        events = parse_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        validate("CreateCompletionStreamChunk", c)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    for c in chunks[:-1]:
        validate("CreateCompletionResponse", {**c, "choices": [
            {**ch, "finish_reason": ch["finish_reason"] or "length"} for ch in c["choices"]]})
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    full = client.completions.create(model=live.model, prompt=body["prompt"], max_tokens=6, temperature=0)
    assert text == full.choices[0].text
