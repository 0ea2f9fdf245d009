"""The replication layer in one process: a follower replaying process 0's ops ends with
the same pool, KV cache and prefix cache as the engine that made them.

The broadcast is JAX's `multihost_utils.broadcast_one_to_all`; here it records what
process 0 sends and plays it back to the follower (the two-process run over one mesh:
tests/server/test_multihost.py). The requests are served over HTTP by the real app,
including follow-up turns that reuse a kept prefill (the prefix cache's decisions are
what a follower must reproduce without being told).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time

import httpx
import numpy as np

from lwm_serve.server.engine import replica

LONG = ("A world model predicts what happens next in a scene from what it has seen so far, "
        "frame after frame, and answers questions about it.")


def test_follower_replay_ends_with_the_leaders_pool_and_prefix_cache(fixture_runtime, make_server, auth_headers,
                                                                     monkeypatch):
    sent, server = _recorded_leader(fixture_runtime, make_server, monkeypatch)
    url = f"{server.base_url}/v1/chat/completions"
    turns = [{"role": "user", "content": LONG}]
    cached = []
    for follow_up in ("What does it predict?", "And after that?"):
        body = {"model": "lwm-fixture", "messages": turns, "max_tokens": 5, "temperature": 0}
        r = httpx.post(url, json=body, headers=auth_headers, timeout=120)
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0))
        turns += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                  {"role": "user", "content": follow_up}]
    r = httpx.post(url, json={"model": "lwm-fixture", "messages": turns[:1], "max_tokens": 4, "temperature": 0.8,
                              "seed": 3, "n": 2}, headers=auth_headers, timeout=120)
    assert r.status_code == 200, r.text
    engine = server.app.state.services.engine
    server.stop()  # the engine stops and broadcasts STOP
    assert cached[1] > 16  # the follow-up reused the first turn's prefill

    ops = [replica.Op(int(h[0])) for h in sent if len(h) == 8]
    assert ops[-1] is replica.Op.STOP and {replica.Op.START, replica.Op.DECODE, replica.Op.KEEP} <= set(ops)
    follower = _replay(sent, fixture_runtime, monkeypatch)
    _assert_same_pool(engine, follower)
    lead_stats, follow_stats = engine.prefix_cache.stats(), follower.prefix.stats()
    assert lead_stats == follow_stats and lead_stats.hit_tokens > 0
    assert [e.ids.tolist() for e in engine.prefix_cache._entries.values()] == \
        [e.ids.tolist() for e in follower.prefix._entries.values()]
    # Tasks the leader let go of were dropped by the follower too.
    assert not follower.tasks


def test_chat_rows_decoding_beside_a_drawing_replay_on_the_follower(vision_runtime, make_server, auth_headers,
                                                                     monkeypatch):
    """A step over text and vision rows at once (`decode_mixed`) is an op of its own."""
    sent, server = _recorded_leader(vision_runtime, make_server, monkeypatch)
    drawing = None
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", headers=auth_headers, timeout=300,
                      json={"model": "lwm-fixture", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                            "stream": True, "messages": [{"role": "user", "content": LONG}]}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if drawing is None and line.startswith("data: ") and '"content"' in line:
                # the chat has hundreds of tokens left: the drawing decodes beside it
                drawing = httpx.post(f"{server.base_url}/v1/images/generations", headers=auth_headers,
                                     timeout=300, json={"prompt": "a red square", "seed": 5})
    assert drawing is not None and drawing.status_code == 200, drawing and drawing.text
    engine = server.app.state.services.engine
    server.stop()
    ops = [replica.Op(int(h[0])) for h in sent if len(h) == 8]
    assert replica.Op.DECODE_MIXED in ops
    _assert_same_pool(engine, _replay(sent, vision_runtime, monkeypatch))


def _recorded_leader(runtime, make_server, monkeypatch):
    """A server whose engine leads a multi-host run; what it broadcasts is recorded, in order."""
    sent: collections.deque[np.ndarray] = collections.deque()
    monkeypatch.setattr(replica.multihost_utils, "broadcast_one_to_all",
                        lambda x: sent.append(np.array(x, copy=True)) or np.asarray(x))
    leader = replica.Leader(heartbeat_s=0.2, watch_s=0)
    return sent, make_server(dataclasses.replace(runtime, replica=leader), warmup=False)


def _replay(sent: collections.deque, runtime, monkeypatch) -> replica.Follower:
    """A follower that replays everything the leader sent; checks it consumed all of it, in order."""
    monkeypatch.setattr(replica.multihost_utils, "broadcast_one_to_all", lambda x: sent.popleft())
    follower = replica.Follower(runtime.generator)
    follower.run()
    assert not sent
    return follower


def _assert_same_pool(engine, follower: replica.Follower) -> None:
    mine, theirs = engine.pool, follower.pool
    assert (mine.num_slots, mine.max_length) == (theirs.num_slots, theirs.max_length)
    np.testing.assert_array_equal(mine.index, theirs.index)
    np.testing.assert_array_equal(mine.position, theirs.position)
    valid = np.asarray(mine.pool.valid)
    np.testing.assert_array_equal(valid, np.asarray(theirs.pool.valid))
    # Every slot attention can read is equal. Empty slots are never read: the decode step
    # writes them for rows nobody occupies, and what it leaves there carries no meaning.
    for a, b in zip((*mine.pool.k, *mine.pool.v), (*theirs.pool.k, *theirs.pool.v)):
        a, b = np.moveaxis(np.asarray(a), 2, 1), np.moveaxis(np.asarray(b), 2, 1)  # [B, S, K, D]
        np.testing.assert_array_equal(a[valid], b[valid])


def test_a_collective_that_never_returns_is_cut_short_by_the_watchdog(fixture_runtime, make_server,
                                                                      auth_headers, monkeypatch):
    """A dead TPU host hangs its peers' collectives instead of failing them: the watchdog
    (the distributed runtime's live processes) must fail the requests and turn /ready 503
    while the engine's worker is still stuck in the broadcast."""
    hang, release = threading.Event(), threading.Event()
    alive = [2]

    def broadcast(x):
        if hang.is_set():
            release.wait(120)  # the collective with a dead process: no answer
        return np.asarray(x)

    monkeypatch.setattr(replica.multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(replica, "live_processes", lambda: (lambda: (alive[0], 2)))
    server = make_server(dataclasses.replace(fixture_runtime, replica=replica.Leader(heartbeat_s=0.2, watch_s=0.1)),
                         warmup=False)
    url = f"{server.base_url}/v1/chat/completions"
    body = {"model": "lwm-fixture", "messages": [{"role": "user", "content": LONG}], "max_tokens": 600,
            "temperature": 0, "stream": True}
    events = []
    try:
        with httpx.stream("POST", url, json=body, headers=auth_headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                if len(events) == 3:
                    hang.set()   # the worker's next broadcast never returns...
                    alive[0] = 1  # ...and the runtime stops hearing from process 1
                    break
            deadline = time.monotonic() + 30
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                assert time.monotonic() < deadline, "the stream hangs with its collective"
        assert events[-1] == "[DONE]"
        assert "1 of 2 processes stopped sending heartbeats" in json.loads(events[-2])["error"]["message"]
        assert httpx.get(f"{server.base_url}/ready").status_code == 503
        again = httpx.post(url, json={**body, "stream": False}, headers=auth_headers, timeout=30)
        assert again.status_code == 503 and "multi-host run broken" in again.json()["error"]["message"]
    finally:
        release.set()  # let the stuck worker go so the server can stop
