"""`--load-format dummy`: random weights of any config, served with the demo tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from lwm_serve.model import config as model_config
from lwm_serve.server.runtime import UNKNOWN_ID_TEXT, Runtime, load_runtime

from .conftest import LiveServer


@pytest.fixture(scope="module")
def dummy_runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """The demo's shape with twice the tokenizer's vocabulary: half the ids a random head
    samples are ones the tokenizer does not know (as with bench-150m's 32K)."""
    cfg = model_config.from_preset("demo", vocab_size=1024, num_hidden_layers=1)
    path = tmp_path_factory.mktemp("dummy") / "config.json"
    path.write_text(json.dumps(model_config.to_reference_dict(cfg)))
    return load_runtime(load_format="dummy", model_config_spec=str(path), max_model_len=512, progress=False)


def _chat(server: LiveServer, headers: dict[str, str], messages: list[dict[str, Any]]) -> dict[str, Any]:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, timeout=120, json={
        "messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_conversation_sends_unknown_ids_back_as_one_token_each(
        dummy_runtime: Runtime, make_server: Callable[..., LiveServer], auth_headers: dict[str, str]) -> None:
    server = make_server(dummy_runtime)
    ask = [{"role": "user", "content": "Tell me about the world."}]
    first = _chat(server, auth_headers, ask)
    reply = first["choices"][0]["message"]["content"]
    assert UNKNOWN_ID_TEXT.strip().split("{")[0] in reply  # "<id:" as documented
    follow = _chat(server, auth_headers, ask + [{"role": "assistant", "content": reply},
                                                {"role": "user", "content": "Why?"}])
    u0, u1 = first["usage"], follow["usage"]
    # the reply costs what it cost to generate, not ~8 tokens per placeholder; the rest
    # is the template's few tokens around the assistant's and the new user's turn
    added = u1["prompt_tokens"] - u0["prompt_tokens"] - u0["completion_tokens"]
    assert 0 < added <= 24, (u0, u1, reply)
    assert u1["prompt_tokens_details"]["cached_tokens"] >= u0["prompt_tokens"] - 32
