"""A bounded soak over loopback: concurrent mixed requests, random mid-stream
disconnects and bad inputs against the real app on the fixture model.

Asserts what a long-running server must keep true: no 5xx, every stream not cut
by its client ends with [DONE], and afterwards no decode slot, prefix-cache entry
in use or temp file is left (read from the engine's own state and /metrics).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import time

import httpx

REQUESTS = 160
CONCURRENCY = 16


async def _one(client: httpx.AsyncClient, base: str, headers: dict, rng: random.Random, i: int) -> dict:
    kind = rng.random()
    url = f"{base}/v1/chat/completions"
    words = " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(1, 200)))
    body = {"messages": [{"role": "user", "content": f"{i}: {words}"}], "max_tokens": rng.randrange(1, 24),
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(1000), "n": rng.choice([1, 1, 2]),
            "stream": kind < 0.6}
    if kind < 0.15:  # bad input of some kind
        bad = rng.choice([
            b"{not json", json.dumps({"messages": []}).encode(), json.dumps({**body, "temperature": -1}).encode(),
            json.dumps({**body, "max_tokens": 10**9}).encode()])
        r = await client.post(url, content=bad, headers={**headers, "Content-Type": "application/json"})
        return {"status": r.status_code, "kind": "bad"}
    if kind < 0.2:  # a number at the edge: refused or clipped, never a 5xx
        r = await client.post(url, json={**body, "stream": False, "top_k": 2**40}, headers=headers)
        return {"status": r.status_code, "kind": "edge"}
    if body["stream"]:
        cut = rng.random() < 0.3
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "kind": "stream"}
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    last = line
                    if cut and rng.random() < 0.5:
                        return {"status": 200, "kind": "cut"}
            return {"status": 200, "kind": "stream", "done": last == "data: [DONE]"}
    r = await client.post(url, json=body, headers=headers)
    return {"status": r.status_code, "kind": "json"}


def test_soak_mixed_requests_disconnects_and_bad_inputs(fixture_runtime, make_server, auth_headers, read_metrics):
    live = make_server(fixture_runtime, max_queue=REQUESTS, max_num_seqs=8, max_batch=4)
    rng = random.Random(1234)
    rss = []

    async def main() -> list[dict]:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(timeout=300) as client:
            async def bounded(i: int) -> dict:
                async with sem:
                    out = await _one(client, live.base_url, auth_headers, random.Random(rng.random()), i)
                    if i % 20 == 0:
                        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                    return out
            return await asyncio.gather(*[bounded(i) for i in range(REQUESTS)])

    results = asyncio.run(main())
    assert not [r for r in results if r["status"] >= 500]
    assert all(r["status"] == 200 for r in results if r["kind"] in ("stream", "json", "cut"))
    assert all(r["status"] in (400, 422) for r in results if r["kind"] == "bad")
    assert all(r["status"] in (200, 400, 422) for r in results if r["kind"] == "edge")
    streams = [r for r in results if r["kind"] == "stream"]
    assert streams and all(r["done"] for r in streams)
    assert sum(r["kind"] == "cut" for r in results) > 10
    # settle: cut streams are aborted by the worker between steps
    deadline = time.monotonic() + 60
    while (live.engine.stats().running or live.engine.stats().waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = live.engine.stats()
    assert stats.running == stats.waiting == stats.slots_used == stats.prefix_in_use == 0
    assert stats.prefix_bytes <= live.engine.prefix_cache.budget
    samples = read_metrics(live.base_url)
    assert samples[("lwm:kv_slots_used", ())] == 0
    # (/ready answers 503 by design while the server warms up)
    assert not [k for k, v in samples.items() if k[0] == "lwm:http_responses_total"
                and dict(k[1])["status"].startswith("5") and dict(k[1])["route"] != "/ready" and v]
    assert not list((live.data_dir / "tmp").glob("*")) if (live.data_dir / "tmp").exists() else True
    # peak RSS grows by less than a quarter over the second half of the run
    assert rss[-1] <= rss[len(rss) // 2] * 1.25


def test_sse_keepalive_while_the_first_token_is_slow(hooked_runtime, make_server, auth_headers, monkeypatch):
    from lwm_serve.server import streaming

    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.05)
    live = make_server(hooked_runtime(lambda: time.sleep(0.3)))
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, headers=auth_headers,
                      timeout=120) as r:
        lines = list(r.iter_lines())
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: {"))
    assert any(line == ": keep-alive" for line in lines[:first_data + 3])
    assert lines[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in lines[-3:]
