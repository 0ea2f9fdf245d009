"""HTTP serving overhead: TTFT and tokens/s through the OpenAI API vs the direct Generator.

Starts the real app (uvicorn, 127.0.0.1, free port, in-process thread) on the demo
model (or --model/--tokenizer), then:

* direct: `Generator.stream` on the same prompt ids, same length, no HTTP
  (time to first token, decode tokens/s), the figure `bench/generate.py` measures;
* served: 1, 4, 16 concurrent streaming chat clients (httpx async), each asking for
  the same number of tokens (ignore_eos), measuring per-client TTFT (first token
  chunk) and the aggregate tokens/s over the wall time.

`overhead` = direct single-stream tok/s / served aggregate tok/s: at one client it
is the cost of HTTP and the engine's bookkeeping (1.0 = none); with more clients the
engine batches them, so it falls below 1 (`bench/load.py` measures that scaling).
Prints a table and one JSON line (device, git sha, config, figures).

    .venv/bin/python bench/serve.py [--max-tokens 64] [--concurrency 1,4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import threading
import time
from typing import Any

import httpx
import jax
import uvicorn

from lwm_serve.model.generation import PromptRow, seed_key
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.app import build_app, load_runtime_for
from lwm_serve.server.config import ServerSettings
from lwm_serve.server.local import start_in_thread
from lwm_serve.tokenizers.chat_template import chat_prompt
from roofline import git_sha  # bench/ is the script's folder

QUESTION = "Describe what happens in the video, step by step, in plain words."


def start(settings: ServerSettings, runtime: Any = None,
          ready_timeout_s: float = 600) -> tuple[str, uvicorn.Server, threading.Thread]:
    """The real app in this process (`server.local.start_in_thread`); returns once /ready says so
    (runtime None: the app loads the model of `settings` itself; the warm-up compiles every shape first)."""
    local = start_in_thread(build_app(settings, runtime), ready_timeout_s=ready_timeout_s)
    return local.base_url, local.server, local.thread


def direct(runtime: Any, max_tokens: int, repeats: int) -> dict[str, float]:
    """Single-stream generation with no HTTP: TTFT and decode tok/s (medians)."""
    ids = chat_prompt(runtime.tokenizer, QUESTION).ids
    ttfts, rates, totals = [], [], []
    for r in range(repeats + 1):  # the first run compiles
        t0 = time.perf_counter()
        first = None
        n = 0
        for step in runtime.generator.stream([PromptRow(ids)], SamplingParams(temperature=0),
                                             max_new_tokens=max_tokens, key=seed_key(0)):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if r:
            ttfts.append(first - t0)
            rates.append((n - 1) / (end - first) if n > 1 else 0.0)
            totals.append(n / (end - t0))
    return {"ttft_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates),
            "tok_s": statistics.median(totals), "prompt_tokens": len(ids)}


async def one_client(client: httpx.AsyncClient, base: str, model: str, max_tokens: int) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and "role" not in chunk["choices"][0]["delta"]:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "total_s": end - t0, "tokens": tokens}


async def served(base: str, model: str, concurrency: int, max_tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_client(client, base, model, max_tokens) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft_s"] for r in results)
    return {"clients": concurrency, "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": ttfts[-1],
            "agg_tok_s": tokens / wall, "per_client_tok_s": statistics.median(r["tokens"] / r["total_s"]
                                                                            for r in results),
            "tokens": tokens, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = ServerSettings(model=args.model, model_config_path=args.model_config, tokenizer=args.tokenizer,
                              max_queue=max(levels) + 4, log_level="warning")
    runtime = load_runtime_for(settings, progress=False)
    d = direct(runtime, args.max_tokens, args.repeats)
    base, server, thread = start(settings, runtime)
    try:
        asyncio.run(served(base, runtime.model_name, 1, args.max_tokens))  # warm the HTTP path
        rows = [asyncio.run(served(base, runtime.model_name, c, args.max_tokens)) for c in levels]
    finally:
        server.should_exit = True
        thread.join(30)

    device = jax.devices()[0]
    print(f"\nmodel {runtime.model_name}: {runtime.cfg.num_hidden_layers} layers, hidden {runtime.cfg.hidden_size}, "
          f"prompt {d['prompt_tokens']} tokens, {args.max_tokens} new tokens, device {device.platform} "
          f"({device.device_kind}), git {git_sha()}")
    print(f"direct (no HTTP): TTFT {d['ttft_s'] * 1e3:.1f} ms, decode {d['decode_tok_s']:.1f} tok/s, "
          f"end-to-end {d['tok_s']:.1f} tok/s")
    print(f"{'clients':>7} {'TTFT p50 ms':>12} {'TTFT max ms':>12} {'agg tok/s':>10} {'per-client tok/s':>17} "
          f"{'overhead':>9}")
    for row in rows:
        row["overhead_vs_direct"] = d["tok_s"] / row["agg_tok_s"] if row["agg_tok_s"] else float("inf")
        print(f"{row['clients']:>7} {row['ttft_p50_s'] * 1e3:>12.1f} {row['ttft_max_s'] * 1e3:>12.1f} "
              f"{row['agg_tok_s']:>10.1f} {row['per_client_tok_s']:>17.1f} {row['overhead_vs_direct']:>9.2f}")
    print("overhead = direct end-to-end tok/s / served aggregate tok/s (clients are batched by the engine)")
    print(json.dumps({"bench": "serve", "device": f"{device.platform}:{device.device_kind}",
                      "devices": jax.device_count(), "git": git_sha(), "model": runtime.model_name,
                      "config": {"layers": runtime.cfg.num_hidden_layers, "hidden": runtime.cfg.hidden_size,
                                 "max_tokens": args.max_tokens, "prompt_tokens": d["prompt_tokens"]},
                      "direct": d, "served": rows}))


if __name__ == "__main__":
    main()
