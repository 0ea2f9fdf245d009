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
    assert s.peek() == 1 and s.peek() == 1  # peeking leaves it waiting
    s.pop(1)
    s.add(3)
    assert s.peek() == 2
    s.pop(2)
    assert s.peek() == 3
    s.pop(3)
    stats = s.stats()
    assert (stats.waiting, stats.admitted_total, stats.rejected_total) == (0, 3, 1)


def test_peek_times_out_empty_and_wakes_on_add():
    s: Scheduler[str] = Scheduler(max_queue=1)
    assert s.peek(timeout=0.01) is None
    got = []
    t = threading.Thread(target=lambda: got.append(s.peek(timeout=30)))
    t.start()
    s.add("x")
    t.join(30)
    assert got == ["x"]


def test_remove_if_takes_matching_entries_out():
    s: Scheduler[int] = Scheduler(max_queue=4)
    for i in range(4):
        s.add(i)
    assert s.remove_if(lambda e: e % 2 == 1) == [1, 3]
    assert s.stats().waiting == 2 and s.peek() == 0


def test_close_returns_waiting_and_refuses_new():
    s: Scheduler[int] = Scheduler(max_queue=4)
    s.add(1)
    s.add(2)
    assert s.close() == [1, 2]
    assert s.closed and s.peek(timeout=None) is None
    with pytest.raises(SchedulerClosedError):
        s.add(3)


def test_bad_size():
    with pytest.raises(ValueError):
        Scheduler(max_queue=0)
