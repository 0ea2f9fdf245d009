"""The engine: worker thread, bounded queue, abort between steps, failures (no HTTP)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing
from dataclasses import dataclass, field

import numpy as np
import pytest

from lwm_serve.model.generation import PromptRow, StepOutput
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import GenerationRequest, RequestStatus
from lwm_serve.server.engine.scheduler import QueueFullError


@dataclass
class FakeGenerator:
    """Yields token 7 forever-ish; optionally waits on `gate` before each step or fails."""

    gate: threading.Event | None = None
    permits: threading.Semaphore | None = None  # one acquired per step, when given
    fail_at: int | None = None
    context_limit: int = 100
    steps_run: int = 0
    threads: set = field(default_factory=set)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        assert prompt_tokens + max_new_tokens <= self.context_limit

    def stream(self, rows, sampling, *, max_new_tokens, key, stop_token_ids, top_logprobs):
        self.threads.add(threading.current_thread().name)
        b = len(rows)
        for i in range(max_new_tokens):
            if self.gate is not None:
                assert self.gate.wait(30)
            if self.permits is not None:
                assert self.permits.acquire(timeout=30)
            if self.fail_at == i:
                raise RuntimeError("boom")
            self.steps_run += 1
            yield StepOutput(i, np.full(b, 7, np.int32), np.zeros(b, np.float32), np.zeros((b, 0)),
                             np.zeros((b, 0), np.int32), np.zeros(b, bool))


def _request(engine: Engine, max_new: int = 5, rows: int = 1) -> GenerationRequest:
    return GenerationRequest(engine.new_request_id(), [PromptRow([1, 2, 3])] * rows,
                             [SamplingParams(temperature=0)] * rows, max_new)


async def _collect(handle) -> list[StepOutput]:
    return [s async for s in handle.steps()]


def test_steps_flow_back_and_jax_work_is_on_the_worker_thread():
    gen = FakeGenerator()
    engine = Engine(gen, max_queue=4)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main():
            handles = [engine.submit(_request(engine, max_new=3, rows=2)) for _ in range(3)]
            return await asyncio.gather(*[_collect(h) for h in handles]), handles

        outs, handles = asyncio.run(main())
        assert [len(o) for o in outs] == [3, 3, 3]
        assert all(h.record.status is RequestStatus.FINISHED for h in handles)
        assert all(h.record.tokens_generated == 6 for h in handles)
        assert gen.threads == {"lwm-engine"}
    finally:
        engine.stop()


def test_queue_full_is_immediate_and_carries_retry_after():
    gate = threading.Event()
    engine = Engine(FakeGenerator(gate=gate), max_queue=1, retry_after_s=3)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main():
            running = engine.submit(_request(engine))
            for _ in range(100):  # wait until the worker has taken it
                if running.record.status is RequestStatus.RUNNING:
                    break
                await asyncio.sleep(0.01)
            waiting = engine.submit(_request(engine))
            with pytest.raises(QueueFullError) as info:
                engine.submit(_request(engine))
            assert info.value.retry_after_s == 3
            gate.set()
            return await _collect(running), await _collect(waiting)

        a, b = asyncio.run(main())
        assert len(a) == len(b) == 5
        assert engine.stats().rejected_total == 1
    finally:
        gate.set()
        engine.stop()


def test_leaving_the_iteration_aborts_between_steps():
    # The worker may run only the steps the test allows, so it cannot finish all
    # 90 before the consumer leaves; once it has left, every step is allowed and
    # only the abort can stop the worker.
    permits = threading.Semaphore(3)
    gen = FakeGenerator(permits=permits)
    engine = Engine(gen, max_queue=2)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main():
            handle = engine.submit(_request(engine, max_new=90))
            async with aclosing(handle.steps()) as steps:
                async for step in steps:
                    if step.index == 2:
                        break
            permits.release(100)
            for _ in range(500):
                if handle.record.status.done:
                    break
                await asyncio.sleep(0.01)
            return handle.record

        record = asyncio.run(main())
        assert record.status is RequestStatus.ABORTED
        assert 3 <= record.steps <= 4
        assert gen.steps_run == record.steps
        assert engine.stats().aborted_total == 1
    finally:
        engine.stop()


def test_worker_failure_reaches_the_consumer_and_the_engine_goes_on():
    gen = FakeGenerator(fail_at=2)
    engine = Engine(gen, max_queue=2)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main():
            handle = engine.submit(_request(engine))
            got = []
            with pytest.raises(RuntimeError, match="boom"):
                async for step in handle.steps():
                    got.append(step)
            gen.fail_at = None
            return got, handle.record, await _collect(engine.submit(_request(engine)))

        got, record, after = asyncio.run(main())
        assert len(got) == 2 and record.status is RequestStatus.FAILED and "boom" in record.error
        assert len(after) == 5
    finally:
        engine.stop()


def test_stop_fails_waiting_requests():
    gate = threading.Event()
    engine = Engine(FakeGenerator(gate=gate), max_queue=2)  # type: ignore[arg-type]
    engine.start()

    async def main():
        first = engine.submit(_request(engine))
        second = engine.submit(_request(engine))
        await asyncio.sleep(0.05)
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
