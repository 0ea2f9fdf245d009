"""`session` pins a prompt's prefill in the prefix cache: it survives LRU pressure that
evicts an unpinned one, the number of session names is bounded, DELETE releases one."""

from __future__ import annotations

import httpx

from lwm_serve.model import steps

WORDS = ["river", "mountain", "window", "garden", "yellow", "engine", "silver", "planet"]


def _prompt(tokenizer, lead: str, tokens: int) -> str:
    """A user message of about `tokens` tokens that no other prompt of the test starts with."""
    text, i = lead, 0
    while len(tokenizer.encode(text)) < tokens:
        text += f" {WORDS[i % len(WORDS)]} {lead.lower()}{i}"
        i += 1
    return text


def _ask(client: httpx.Client, content: str, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0, **extra})


def _cached(response: httpx.Response) -> tuple[int, int]:
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


def test_a_pinned_prefill_survives_eviction_and_sessions_are_bounded(fixture_runtime, make_server, auth_headers):
    cfg = fixture_runtime.generator.cfg
    bytes_per_slot = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_dim * 4  # fp32 keys + values
    # Prompts of ~440 tokens keep 448-512 slots each: the budget holds two of them, not three.
    slots = steps.bucket_length(512)
    budget = int(2.5 * slots * bytes_per_slot)
    server = make_server(fixture_runtime, prefix_cache_bytes=budget, max_sessions=1)
    tok = fixture_runtime.tokenizer
    pinned, unpinned, *pressure = [_prompt(tok, lead, 440) for lead in ("Alpha", "Bravo", "Charlie", "Delta")]
    with httpx.Client(base_url=server.base_url, headers=auth_headers, timeout=300) as client:
        assert _cached(_ask(client, pinned, session="clip"))[0] == 0
        assert client.get("/v1/sessions").json()["data"] == ["clip"]
        assert _cached(_ask(client, unpinned))[0] == 0
        for text in pressure:  # each kept prefill pushes the oldest evictable one out
            _cached(_ask(client, text))
        assert server.engine.prefix_cache.stats().evictions >= 2

        cached, total = _cached(_ask(client, pinned))
        assert cached >= 0.9 * total  # still kept: only the last few tokens were prefilled again
        assert _cached(_ask(client, unpinned))[0] == 0  # evicted

        # one session name at most (--max-sessions 1): a second one is refused, clearly
        refused = _ask(client, unpinned, session="another")
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["code"], error["param"], error["type"]) == ("too_many_sessions", "session",
                                                                  "invalid_request_error")
        assert "DELETE /v1/sessions/" in error["message"]
        assert _cached(_ask(client, pinned, session="clip"))[0] > 0  # the same name goes on

        assert client.delete("/v1/sessions/clip").json() == {"id": "clip", "object": "session", "deleted": True}
        missing = client.delete("/v1/sessions/clip")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
        _cached(_ask(client, unpinned, session="another"))  # the freed name's place is taken
        assert client.get("/v1/sessions").json() == {"object": "list", "data": ["another"], "max_sessions": 1}
        # bad names are a 400 like any bad field
        assert _ask(client, pinned, session="").status_code == 400
