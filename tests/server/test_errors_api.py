"""The bad-input battery: every failure is a clear 4xx in OpenAI's error shape; the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
# Fragments that would mean pydantic's raw output leaked into a message.
LEAKS = ("pydantic", "errors.pydantic.dev", "type=", "input_value", "[{", "loc")


def _send(live, headers, path: str, body: Any = None, *, raw: bytes | None = None,
          method: str = "POST") -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": {**headers, "Content-Type": "application/json"}, "timeout": 120}
    if raw is not None:
        kwargs["content"] = raw
    elif body is not None:
        kwargs["json"] = body
    return httpx.request(method, f"{live.base_url}{path}", **kwargs)


def _check_error(r: httpx.Response, validate, status: int, *, param: str | None = None,
                 says: tuple[str, ...] = (), code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    validate("ErrorResponse", body)
    err = body["error"]
    assert err["message"] and not any(leak in err["message"] for leak in LEAKS), err["message"]
    if param is not None:
        assert err["param"] == param, err
    for fragment in says:
        assert fragment in err["message"], err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# (name, path, body or raw bytes, status, param, message fragments)
BATTERY: list[tuple[str, str, Any, int, str | None, tuple[str, ...]]] = [
    ("malformed json", CHAT, b'{"messages": [', 400, None, ("not valid JSON",)),
    ("body not an object", CHAT, b"[1, 2]", 400, None, ()),
    ("messages wrong type", CHAT, {"messages": "hello"}, 400, "messages", ()),
    ("messages missing", CHAT, {"model": "x"}, 400, "messages", ("required",)),
    ("empty messages", CHAT, {"messages": []}, 400, "messages", ("at least 1",)),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", ()),
    ("max_tokens wrong type", CHAT, {"messages": USER, "max_tokens": "ten"}, 400, "max_tokens", ()),
    ("max_tokens zero", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", ()),
    ("negative temperature", CHAT, {"messages": USER, "temperature": -0.5}, 400, "temperature", ()),
    ("top_p zero", CHAT, {"messages": USER, "top_p": 0}, 400, "top_p", ()),
    ("n zero", CHAT, {"messages": USER, "n": 0}, 400, "n", ()),
    ("n above the batch limit", CHAT, {"messages": USER, "n": 64}, 400, "n", ("at most",)),
    ("content part image", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
        400, "messages[0].content[1]", ("without a VQGAN (--vqgan)",)),
    ("content part video", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://x/y.mp4"}}]}]},
        400, "messages[0].content[0]", ("without a VQGAN (--vqgan)",)),
    ("content part audio", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
        400, "messages[0].content[0].type", ("'input_audio'",)),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400, "tools", ("not supported",)),
    ("tool_choice", CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice", ()),
    ("functions", CHAT, {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions", ()),
    ("json schema", CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {}}},
        400, "response_format", ("json_schema",)),
    ("json object", CHAT, {"messages": USER, "response_format": {"type": "json_object"}},
        400, "response_format", ()),
    ("logit_bias", CHAT, {"messages": USER, "logit_bias": {"5": 10}}, 400, "logit_bias", ()),
    ("tool role", CHAT, {"messages": USER + [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        400, "messages[1].role", ("'tool'",)),
    ("last message from assistant", CHAT, {"messages": USER + [{"role": "assistant", "content": "x"}]},
        400, None, ("last message",)),
    ("system not first", CHAT, {"messages": USER + [{"role": "system", "content": "x"}, *USER]},
        400, None, ("system",)),
    ("stream_options without stream", CHAT, {"messages": USER, "stream_options": {"include_usage": True}},
        400, "stream_options", ()),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", ()),
    ("top_logprobs too many", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50},
        400, "top_logprobs", ()),
    ("empty stop string", CHAT, {"messages": USER, "stop": [""]}, 400, "stop", ()),
    ("stop wrong type", CHAT, {"messages": USER, "stop": 5}, 400, "stop", ()),
    ("completion prompt missing", COMPLETIONS, {"max_tokens": 3}, 400, "prompt", ("required",)),
    ("completion empty prompt list", COMPLETIONS, {"prompt": []}, 400, "prompt", ()),
    ("completion token out of range", COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt", ("99999",)),
    ("completion suffix", COMPLETIONS, {"prompt": "a", "suffix": "b"}, 400, "suffix", ()),
    ("completion logprobs too many", COMPLETIONS, {"prompt": "a", "logprobs": 9}, 400, "logprobs", ()),
]


@pytest.mark.parametrize("name,path,body,status,param,says", BATTERY, ids=[b[0] for b in BATTERY])
def test_bad_input_is_a_clear_openai_error(live, auth_headers, validate, name, path, body, status, param, says):
    raw = body if isinstance(body, bytes) else None
    r = _send(live, auth_headers, path, None if raw else body, raw=raw)
    _check_error(r, validate, status, param=param, says=says)


def test_huge_max_tokens_names_both_numbers(live, auth_headers, validate):
    limit = live.engine.context_limit
    r = _send(live, auth_headers, CHAT, {"messages": USER, "max_tokens": 10**9})
    err = _check_error(r, validate, 400, code="context_length_exceeded")
    assert str(limit) in err["message"] and str(10**9) in err["message"]


def test_too_long_prompt_names_both_numbers(live, auth_headers, validate, fixture_runtime):
    limit = live.engine.context_limit
    text = "word " * limit
    n_prompt = len(fixture_runtime.tokenizer.encode(text))
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
                       (COMPLETIONS, {"prompt": text, "max_tokens": 1}),
                       (COMPLETIONS, {"prompt": text})):
        err = _check_error(_send(live, auth_headers, path, body), validate, 400, code="context_length_exceeded")
        assert str(limit) in err["message"], err
        if path == COMPLETIONS:
            assert str(n_prompt) in err["message"] and err["param"] == "prompt"
        else:
            assert err["param"] == "messages"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
                         ids=["missing", "wrong", "not-bearer"])
def test_auth_required_on_api_routes(live, validate, headers):
    for method, path, body in (("POST", CHAT, {"messages": USER}), ("GET", "/v1/models", None)):
        r = _send(live, headers, path, body, method=method)
        _check_error(r, validate, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{live.base_url}/health").status_code == 200  # health needs no key


def test_unknown_model_is_404(live, auth_headers, validate):
    for path, body in ((CHAT, {"model": "gpt-4o", "messages": USER}), (COMPLETIONS, {"model": "gpt-4o", "prompt": "a"})):
        _check_error(_send(live, auth_headers, path, body), validate, 404, param="model", code="model_not_found",
                     says=("gpt-4o",))
    r = httpx.get(f"{live.base_url}/v1/models/gpt-4o", headers=auth_headers)
    _check_error(r, validate, 404, code="model_not_found")


def test_unknown_route_and_method_use_the_error_shape(live, auth_headers, validate):
    _check_error(httpx.get(f"{live.base_url}/v1/nothing-here", headers=auth_headers), validate, 404)
    _check_error(httpx.get(f"{live.base_url}{CHAT}", headers=auth_headers), validate, 405)


def test_sdk_raises_typed_errors_then_the_server_still_serves(live, auth_headers):
    key = auth_headers["Authorization"][7:]
    good = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=key, max_retries=0, timeout=120)
    bad = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="nope", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="not-this", messages=USER)
    with pytest.raises(openai.BadRequestError) as info:
        good.chat.completions.create(model=live.model, messages=USER, temperature=-1)
    assert info.value.body["param"] == "temperature"
    ok = good.chat.completions.create(model=live.model, messages=USER, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
