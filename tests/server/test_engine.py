"""The engine: continuous batching on the real fixture model, prefix reuse, aborts,
timeouts, failures, shutdown (no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing

import numpy as np
import pytest

from lwm_serve.model.generation import Generator, PromptRow, StepOutput, seed_key
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import (GenerationRequest, PrefillProgress, RequestStatus,
                                             RequestTimeoutError)
from lwm_serve.server.engine.scheduler import QueueFullError


def _prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def _request(engine: Engine, ids: list[int], max_new: int = 5, n: int = 1, seed: int | None = 0,
             sampling: SamplingParams | None = None, stop: tuple[int, ...] = (), **kw) -> GenerationRequest:
    sampling = sampling or SamplingParams(temperature=0)
    return GenerationRequest(engine.new_request_id(), [PromptRow(ids)] * n, [sampling] * n, max_new,
                             seed=seed, stop_token_ids=stop, **kw)


async def _collect(handle) -> list[StepOutput]:
    return [s async for s in handle.steps()]


def _tokens(steps: list[StepOutput]) -> np.ndarray:
    return np.stack([s.tokens for s in steps], axis=1)  # [n, steps]


def _alone(generator, req: GenerationRequest) -> np.ndarray:
    """What the one-request Generator gives for the same rows, settings and seed."""
    out = generator.generate(list(req.rows), list(req.sampling), max_new_tokens=req.max_new_tokens,
                             key=seed_key(req.seed), stop_token_ids=req.stop_token_ids)
    return out


@pytest.fixture
def engine(fixture_runtime):
    eng = Engine(fixture_runtime.generator, max_queue=32, max_num_seqs=8, prefix_cache_bytes=64 << 20)
    eng.start()
    yield eng
    eng.stop()


def _assert_clean(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.slots_used == 0 and stats.running == 0 and stats.waiting == 0
    assert stats.prefix_in_use == 0


def test_mixed_batch_gives_each_request_its_tokens_alone(engine, fixture_runtime):
    tok = fixture_runtime.tokenizer
    long_text = " ".join(f"word{i}" for i in range(120))
    requests = [
        _request(engine, _prompt(tok, "Hello there"), max_new=9),
        _request(engine, _prompt(tok, long_text), max_new=6, seed=3,
                 sampling=SamplingParams(temperature=0.9, top_k=20)),
        _request(engine, _prompt(tok, "A second question, sampled"), max_new=7, n=3, seed=11,
                 sampling=SamplingParams(temperature=1.0, top_p=0.8)),
        _request(engine, _prompt(tok, "Penalised " * 5), max_new=8, seed=5,
                 sampling=SamplingParams(temperature=0.7, presence_penalty=1.5, frequency_penalty=0.5)),
        _request(engine, _prompt(tok, "Greedy with a stop"), max_new=12, stop=(tok.eos_id, 300, 301, 302)),
    ]

    async def main():
        handles = [engine.submit(r) for r in requests]
        return await asyncio.gather(*[_collect(h) for h in handles]), handles

    outs, handles = asyncio.run(main())
    for req, steps, handle in zip(requests, outs, handles):
        got = _tokens(steps)
        alone = _alone(fixture_runtime.generator, req)
        for r in range(len(req.rows)):
            row = got[r].tolist()
            if steps[-1].finished[r] or any(s.finished[r] for s in steps):
                end = next(i for i, s in enumerate(steps) if s.finished[r]) + 1
                row = row[:end]
            assert row == alone[r], f"request {req.request_id} row {r}"
        assert handle.record.status is RequestStatus.FINISHED
    # n=3 choices from one seed differ (own key chains), yet each equals its run alone.
    assert len({tuple(r) for r in _tokens(outs[2]).tolist()}) > 1
    _assert_clean(engine)


def test_follow_up_reuses_the_prefix_and_gives_the_cold_tokens(engine, fixture_runtime):
    tok = fixture_runtime.tokenizer
    context = _prompt(tok, " ".join(f"fact{i} is {i * 7}" for i in range(55)))
    first = context + _prompt(tok, "What is fact3?")[1:]
    follow = first + _prompt(tok, " And fact9?")[1:]

    async def main():
        one = engine.submit(_request(engine, first, max_new=4))
        await _collect(one)
        two = engine.submit(_request(engine, follow, max_new=6))
        events = [e async for e in two.events()]
        cold = engine.submit(_request(engine, follow, max_new=6, reuse_prefix=False))
        return one, two, events, await _collect(cold), cold

    one, two, events, cold_steps, cold = asyncio.run(main())
    steps = [e for e in events if isinstance(e, StepOutput)]
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert one.record.cached_tokens == 0
    assert two.record.cached_tokens >= 0.9 * len(follow)
    assert cold.record.cached_tokens == 0
    assert _tokens(steps).tolist() == _tokens(cold_steps).tolist()
    # progress comes from the prefill itself, before the first token, counting real chunks
    assert progress and events.index(progress[-1]) < events.index(steps[0])
    assert progress[-1].chunks_done == progress[-1].chunks_total
    assert progress[-1].cached_tokens == two.record.cached_tokens
    stats = engine.stats()
    assert stats.prefix_hit_tokens >= two.record.cached_tokens
    _assert_clean(engine)


def test_prompt_of_chunk_plus_one_is_not_two_full_chunks(fixture_runtime):
    pool_chunk = fixture_runtime.generator.prefill_chunk
    from lwm_serve.model.runner import SlotPool

    gen = fixture_runtime.generator
    pool = SlotPool(gen.params, gen.cfg, num_slots=1, max_length=4 * pool_chunk, prefill_chunk=pool_chunk)
    task = pool.start_prefill(np.arange(3, 3 + pool_chunk + 1) % 700, np.zeros(pool_chunk + 1, bool))
    assert [t for _, t in task.chunks] == [pool_chunk, 32]
    assert sum(t for _, t in task.chunks) < 2 * pool_chunk


def test_aborts_free_their_slots_at_once(engine, fixture_runtime):
    ids = _prompt(fixture_runtime.tokenizer, "Tell me a long story")

    async def main():
        handle = engine.submit(_request(engine, ids, max_new=400, n=2))
        async with aclosing(handle.steps()) as steps:
            async for step in steps:
                if step.index == 2:
                    break
        for _ in range(500):
            if handle.record.status.done:
                break
            await asyncio.sleep(0.01)
        return handle.record

    record = asyncio.run(main())
    assert record.status is RequestStatus.ABORTED and record.steps < 400
    assert engine.stats().aborted_total == 1
    _assert_clean(engine)


def test_timeout_fails_the_request_and_frees_it(fixture_runtime):
    gate = threading.Event()
    engine = Engine(fixture_runtime.generator, max_queue=4, max_num_seqs=2, request_timeout_s=0.2,
                    step_hook=lambda: gate.wait(0.05))
    engine.start()
    try:
        async def main():
            handle = engine.submit(_request(engine, [1, 5, 6], max_new=1000))
            with pytest.raises(RequestTimeoutError):
                await _collect(handle)
            return handle.record

        record = asyncio.run(main())
        assert record.status is RequestStatus.FAILED and "did not finish" in record.error
        _assert_clean(engine)
    finally:
        engine.stop()


def test_queue_full_and_fifo_admission(fixture_runtime):
    gate = threading.Event()
    engine = Engine(fixture_runtime.generator, max_queue=1, retry_after_s=3, max_num_seqs=1,
                    step_hook=lambda: gate.wait(30))
    engine.start()
    try:
        async def main():
            running = engine.submit(_request(engine, [1, 5, 6], max_new=3))
            for _ in range(500):
                if running.record.status is RequestStatus.RUNNING:
                    break
                await asyncio.sleep(0.01)
            waiting = engine.submit(_request(engine, [1, 7, 8], max_new=3))
            with pytest.raises(QueueFullError) as info:
                engine.submit(_request(engine, [1, 9], max_new=3))
            assert info.value.retry_after_s == 3
            gate.set()
            return await _collect(running), await _collect(waiting), waiting.record, running.record

        a, b, wrec, rrec = asyncio.run(main())
        assert len(a) == len(b) == 3
        assert wrec.started >= rrec.ended - 1e-3  # one slot: the second ran after the first left it
        assert engine.stats().rejected_total == 1
    finally:
        gate.set()
        engine.stop()


def test_a_failing_step_reaches_the_consumer_and_the_engine_goes_on(fixture_runtime):
    calls = {"n": 0}

    def hook():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    engine = Engine(fixture_runtime.generator, max_queue=2, max_num_seqs=2, step_hook=hook)
    engine.start()
    try:
        async def main():
            handle = engine.submit(_request(engine, [1, 5, 6], max_new=5))
            with pytest.raises(RuntimeError, match="boom"):
                await _collect(handle)
            return handle.record, await _collect(engine.submit(_request(engine, [1, 5, 6], max_new=5)))

        record, after = asyncio.run(main())
        assert record.status is RequestStatus.FAILED and "boom" in record.error
        assert len(after) == 5
        _assert_clean(engine)
    finally:
        engine.stop()


def test_drain_refuses_new_and_stop_fails_waiting(fixture_runtime):
    gate = threading.Event()
    engine = Engine(fixture_runtime.generator, max_queue=2, max_num_seqs=1, step_hook=lambda: gate.wait(30))
    engine.start()

    async def main():
        first = engine.submit(_request(engine, [1, 5, 6], max_new=3))
        for _ in range(3000):  # the worker has taken it (and waits at the gate)
            if first.record.status is RequestStatus.RUNNING:
                break
            await asyncio.sleep(0.01)
        second = engine.submit(_request(engine, [1, 5, 7], max_new=3))
        engine.drain()
        with pytest.raises(Exception, match="shutting down"):
            engine.submit(_request(engine, [1, 5, 8], max_new=3))
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        await asyncio.sleep(0.05)
        gate.set()
        with pytest.raises(Exception, match="shutting down"):
            await _collect(second)
        await _collect(first)
        stopper.join(30)

    asyncio.run(main())
    assert not engine.alive


class _CompileCounter:
    """Counts XLA backend compiles (jax.monitoring's compile-duration event) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.compiled: list[str] = []

    # a program loaded from the persistent compilation cache was not precompiled in this process
    CACHE_HIT = "/jax/compilation_cache/cache_retrieval_time_sec"

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in (self.EVENT, self.CACHE_HIT):
            self.compiled.append(str(kwargs.get("fun_name", event)))

    def __enter__(self) -> "_CompileCounter":
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_after_precompile_prompts_and_follow_ups_compile_nothing(fixture_runtime):
    """Start-up compiles every prefill piece, scratch length, resize, insert and decode
    shape: afterwards a fresh prompt, follow-ups on its kept prefix (new tails, a longer
    scratch) and their decoding beside each other run on compiled programs only."""
    engine = Engine(fixture_runtime.generator, max_queue=8, max_num_seqs=4, prefix_cache_bytes=256 << 20)
    engine.start(precompile=True)
    tok = fixture_runtime.tokenizer
    rng = np.random.default_rng(0)
    context = [tok.bos_id] + rng.integers(3, 500, 300).tolist()
    follow_ups = [context + rng.integers(3, 500, extra).tolist() for extra in (20, 45, 100, 260, 530)]
    try:
        async def ask(ids: list[int], max_new: int = 3) -> GenerationRequest:
            handle = engine.submit(_request(engine, ids, max_new=max_new, logprobs=False))  # as over HTTP
            await _collect(handle)
            return handle

        async def main():
            await ask([tok.bos_id, 5, 6])  # waits for the precompile; eager host-side ops compile here
            assert engine.warmed.wait(600)  # and for the idle-time part
            with _CompileCounter() as fresh:
                await ask(context)
            handles = []
            with _CompileCounter() as follow:
                for ids in follow_ups:
                    handles.append(await ask(ids))
                # two at once: one decodes while the other prefills from the kept prefix
                both = [engine.submit(_request(engine, ids, max_new=8, logprobs=False)) for ids in follow_ups[:2]]
                await asyncio.gather(*[_collect(h) for h in both])
                # short fresh prompts arriving together (one 32-token piece, or 32 and a tail)
                trio = [engine.submit(_request(engine, [tok.bos_id] + rng.integers(3, 500, k).tolist(), max_new=3,
                                               logprobs=False)) for k in (4, 11, 40)]
                await asyncio.gather(*[_collect(h) for h in trio])
            return fresh, follow, handles

        fresh, follow, handles = asyncio.run(main())
        assert all(h.record.status is RequestStatus.FINISHED for h in handles)
        assert all(h.record.cached_tokens >= len(context) - 32 for h in handles)
        assert fresh.compiled == [], fresh.compiled
        assert follow.compiled == [], follow.compiled
    finally:
        engine.stop()


def test_long_prompt_shapes_compile_in_idle_time_after_the_engine_serves(fixture_runtime):
    """Start-up compiles only what prompts of up to EAGER_PREFILL_CHUNKS chunks need; a
    request is served while the longer scratch lengths are still to compile, and once the
    engine has been idle long enough a long prompt compiles nothing."""
    from lwm_serve.server.engine.engine import EAGER_PREFILL_CHUNKS

    gen = fixture_runtime.generator
    # chunks of 64 over the 1024-token context: scratch lengths beyond 4 chunks exist
    small_chunks = Generator(gen.params, gen.cfg, prefill_chunk=64, max_context=gen.context_limit)
    engine = Engine(small_chunks, max_queue=8, max_num_seqs=2, prefix_cache_bytes=0)
    engine.start(precompile=True)
    tok = fixture_runtime.tokenizer
    chunk = engine.pool.prefill_chunk
    long_prompt = [tok.bos_id] + np.random.default_rng(1).integers(3, 500, EAGER_PREFILL_CHUNKS * chunk + 40).tolist()
    assert engine.pool.scratch_length(len(long_prompt)) > EAGER_PREFILL_CHUNKS * chunk  # not an eager shape
    try:
        async def main():
            short = engine.submit(_request(engine, [tok.bos_id, 5, 6], max_new=2, logprobs=False))
            await _collect(short)
            assert short.record.status is RequestStatus.FINISHED
            assert engine.warmed.wait(600)
            with _CompileCounter() as counter:
                handle = engine.submit(_request(engine, long_prompt, max_new=2, logprobs=False))
                await _collect(handle)
            return short, counter

        short, counter = asyncio.run(main())
        assert engine._warm_shapes > 0  # noqa: SLF001 - some shapes were left to idle time
        assert counter.compiled == [], counter.compiled
    finally:
        engine.stop()


def test_idle_time_warm_up_waits_while_media_is_encoded(fixture_runtime):
    """`defer_idle_work` (held by the media ingest while the VQGAN encodes) stops the idle-time
    compiles: none runs while it is held, and they all run once it is let go."""
    gen = fixture_runtime.generator
    engine = Engine(Generator(gen.params, gen.cfg, prefill_chunk=64, max_context=gen.context_limit),
                    max_queue=8, max_num_seqs=2, prefix_cache_bytes=0)
    hold = engine.defer_idle_work()
    hold.__enter__()
    try:
        engine.start(precompile=True)
        for _ in range(600):  # the start-up part is done when the later jobs are listed
            if engine._later_jobs:  # noqa: SLF001
                break
            time.sleep(0.1)
        left = len(engine._later_jobs)  # noqa: SLF001
        assert left > 0
        time.sleep(1.5)
        assert len(engine._later_jobs) == left and not engine.warmed.is_set()  # noqa: SLF001
    finally:
        hold.__exit__(None, None, None)
    try:
        assert engine.warmed.wait(600)
    finally:
        engine.stop()
