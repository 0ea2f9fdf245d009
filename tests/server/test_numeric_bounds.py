"""Every numeric field of every request model, at the edges (0, -1, 2^31, 2^63, 10^400,
1e308, NaN), over HTTP: a value outside the field's declared bounds is a 400 naming the
field; one inside them is served or refused with a 4xx; nothing is ever a 5xx.

The fields are read from the models themselves (their annotations and pydantic
bounds), so a numeric field added later is walked too.
"""

from __future__ import annotations

import json
import math
import typing
from typing import Any

import annotated_types
import httpx
import pytest
from pydantic import BaseModel

from lwm_serve.server.schemas.chat import ChatCompletionRequest
from lwm_serve.server.schemas.completions import CompletionRequest
from lwm_serve.server.schemas.media import MediaSampling
from lwm_serve.server.schemas.video import VideoPlanRequest, VideoQuestionForm

EDGES: list[Any] = [0, -1, 2**31, 2**63, 10**400, 1e308, math.nan]


def numeric_fields(model: type[BaseModel]) -> dict[str, Any]:
    """name -> FieldInfo of every int/float field (bool excluded)."""
    out = {}
    for name, info in model.model_fields.items():
        kinds = set(typing.get_args(info.annotation)) | {info.annotation}
        if kinds & {int, float}:
            out[name] = info
    return out


def in_bounds(info: Any, value: Any) -> bool:
    """Would the field accept `value` (its type and declared bounds)?"""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    kinds = set(typing.get_args(info.annotation)) | {info.annotation}
    if float not in kinds and isinstance(value, float) and not value.is_integer():
        return False
    for m in info.metadata:
        if (isinstance(m, annotated_types.Gt) and not value > m.gt) or \
                (isinstance(m, annotated_types.Ge) and not value >= m.ge) or \
                (isinstance(m, annotated_types.Lt) and not value < m.lt) or \
                (isinstance(m, annotated_types.Le) and not value <= m.le):
            return False
    return True


def test_every_request_model_bounds_every_number():
    """The walk below covers real fields, and none of them is unbounded."""
    for model in (ChatCompletionRequest, CompletionRequest, VideoPlanRequest, VideoQuestionForm, MediaSampling):
        fields = numeric_fields(model)
        assert fields, model
        for name, info in fields.items():
            kinds = {type(m) for m in info.metadata}
            assert kinds & {annotated_types.Le, annotated_types.Lt}, f"{model.__name__}.{name} has no upper bound"
            assert kinds & {annotated_types.Ge, annotated_types.Gt}, f"{model.__name__}.{name} has no lower bound"


def _raw_json(body: dict[str, Any]) -> bytes:
    # json.dumps writes NaN and 400-digit integers as a hostile client would.
    return json.dumps(body).encode()


def _check(r: httpx.Response, field: str, value: Any, valid: bool) -> None:
    shown = repr(value)[:30]
    assert r.status_code < 500, f"{field}={shown}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if not valid:
        assert r.status_code == 400, f"{field}={shown} is out of bounds but got {r.status_code}: {r.text[:300]}"
        assert field in (r.json()["error"]["param"] or "") or field in r.json()["error"]["message"], r.text


@pytest.fixture(scope="module")
def server(launch, vision_runtime):
    srv = launch(vision_runtime)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clip_id(server, server_media):
    r = httpx.post(f"{server.base_url}/v1/files", headers={"Authorization": "Bearer test-key-123"},
                   files={"file": ("c.mp4", (server_media / "h264.mp4").read_bytes())}, data={"purpose": "user_data"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _cases(model: type[BaseModel]) -> list[tuple[str, Any]]:
    return [(name, v) for name in numeric_fields(model) for v in EDGES]


def _id(case: Any) -> str:
    return repr(case)[:12]


@pytest.mark.parametrize("field, value", _cases(ChatCompletionRequest), ids=_id)
def test_chat_numbers(server, auth_headers, field, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=_raw_json(body), timeout=120,
                   headers={**auth_headers, "Content-Type": "application/json"})
    _check(r, field, value, in_bounds(ChatCompletionRequest.model_fields[field], value))


@pytest.mark.parametrize("field, value", _cases(CompletionRequest), ids=_id)
def test_completion_numbers(server, auth_headers, field, value):
    body = {"prompt": "Hi", "max_tokens": 1, field: value}
    r = httpx.post(f"{server.base_url}/v1/completions", content=_raw_json(body), timeout=120,
                   headers={**auth_headers, "Content-Type": "application/json"})
    _check(r, field, value, in_bounds(CompletionRequest.model_fields[field], value))


@pytest.mark.parametrize("field, value", _cases(VideoPlanRequest), ids=_id)
def test_plan_numbers(server, auth_headers, clip_id, field, value):
    body = {"file_id": clip_id, "question": "q", field: value}
    r = httpx.post(f"{server.base_url}/v1/video/plan", content=_raw_json(body), timeout=120,
                   headers={**auth_headers, "Content-Type": "application/json"})
    _check(r, field, value, in_bounds(VideoPlanRequest.model_fields[field], value))


def _form_text(value: Any) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else str(value)


@pytest.mark.parametrize("field, value", _cases(VideoQuestionForm), ids=_id)
def test_video_question_form_numbers(server, auth_headers, clip_id, field, value):
    fields = {"question": "q", "file_id": clip_id, "max_tokens": "1", "max_frames": "1", field: _form_text(value)}
    r = httpx.post(f"{server.base_url}/v1/video/questions", data=fields, headers=auth_headers, timeout=120)
    _check(r, field, value, in_bounds(VideoQuestionForm.model_fields[field], value))


@pytest.mark.parametrize("field, value", _cases(MediaSampling), ids=_id)
@pytest.mark.parametrize("where", ["inner", "part"])
def test_chat_video_part_numbers(server, auth_headers, clip_id, field, value, where):
    video_url: dict[str, Any] = {"url": clip_id, "max_frames": 1}
    part: dict[str, Any] = {"type": "video_url", "video_url": video_url}
    (video_url if where == "inner" else part)[field] = value
    if where == "part":
        video_url.pop(field, None)
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, part]}]}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=_raw_json(body), timeout=120,
                   headers={**auth_headers, "Content-Type": "application/json"})
    _check(r, field, value, in_bounds(MediaSampling.model_fields[field], value))
