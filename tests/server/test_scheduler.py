"""The bounded admission queue (no JAX)."""

from __future__ import annotations

import threading

import pytest

from lwm_serve.server.engine.scheduler import QueueFullError, Scheduler, SchedulerClosedError


def test_fifo_and_bounded():
    s: Scheduler[int] = Scheduler(max_queue=2, retry_after_s=7)
    s.add(1)
    s.add(2)
    with pytest.raises(QueueFullError) as info:
        s.add(3)
    assert info.value.retry_after_s == 7 and "2 requests" in str(info.value)
    assert s.next_batch() == [1]
    s.add(3)
    assert s.next_batch() == [2] and s.next_batch() == [3]
    stats = s.stats()
    assert (stats.waiting, stats.admitted_total, stats.rejected_total) == (0, 3, 1)


def test_next_batch_times_out_empty_and_wakes_on_add():
    s: Scheduler[str] = Scheduler(max_queue=1)
    assert s.next_batch(timeout=0.01) == []
    got = []
    t = threading.Thread(target=lambda: got.append(s.next_batch(timeout=30)))
    t.start()
    s.add("x")
    t.join(30)
    assert got == [["x"]]


def test_close_returns_waiting_and_refuses_new():
    s: Scheduler[int] = Scheduler(max_queue=4)
    s.add(1)
    s.add(2)
    assert s.close() == [1, 2]
    assert s.next_batch() is None
    with pytest.raises(SchedulerClosedError):
        s.add(3)


def test_bad_size():
    with pytest.raises(ValueError):
        Scheduler(max_queue=0)
