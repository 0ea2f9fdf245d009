"""The VQGAN encode batch: chosen from measurements, frames split into the measured sizes."""

from __future__ import annotations

import numpy as np
import pytest

from lwm_serve.tokenizers import vqgan as vq
from lwm_serve.tokenizers import vqgan_batch as vb


def test_best_batch_is_the_least_time_per_frame_and_prefers_the_smaller_on_a_near_tie():
    assert vb.best_batch({1: 1.0, 2: 2.4, 4: 5.0, 8: 9.0}) == 1  # CPU-like: batching costs
    assert vb.best_batch({1: 1.0, 2: 1.1, 4: 1.2, 8: 1.4}) == 8  # accelerator-like
    assert vb.best_batch({1: 1.0, 2: 1.98}) == 1  # 1% better per frame is not worth padding


@pytest.mark.parametrize("seconds, n, want", [
    ({1: 1.0}, 5, [1, 1, 1, 1, 1]),
    ({1: 1.0, 2: 2.5}, 4, [1, 1, 1, 1]),  # batch 2 slower per frame: never used
    ({1: 1.0, 2: 1.2, 4: 1.5, 8: 2.0}, 11, [8, 4]),  # one padded 4 beats 2 + 1
    ({1: 1.0, 2: 1.2, 4: 1.5, 8: 2.0}, 8, [8]),
    ({1: 1.0, 8: 2.0}, 3, [8]),  # a padded 8 costs less than three 1s
    ({1: 1.0, 8: 4.0}, 3, [1, 1, 1]),
    ({1: 1.0, 2: 2.5}, 0, []),
])
def test_split_frames_minimises_the_summed_measured_time(seconds, n, want):
    sizes = vb.split_frames(n, seconds)
    assert sizes == want
    assert sum(sizes) >= n and all(s in seconds for s in sizes)


def test_measurement_stops_at_the_first_batch_not_faster_per_frame(monkeypatch):
    calls = []
    per_call = {1: 1.0, 2: 2.6, 4: 4.0, 8: 6.0}  # batch 2 loses per frame; 4 and 8 would not be tried

    def fake_time(model, batch, compiled):
        calls.append((batch, compiled))
        return 0.0, per_call[batch]

    monkeypatch.setattr(vb, "_time_call", fake_time)
    model = type("M", (), {"platform": "cpu"})()
    times = vb.measure_encode(model, compiled=(1, 2))  # type: ignore[arg-type]
    assert calls == [(1, True), (2, True)] and times.batch == 1 and dict(times.seconds) == {1: 1.0, 2: 2.6}

    calls.clear()
    per_call.update({2: 1.2, 4: 1.5, 8: 2.0})  # every size faster per frame: all measured, 8 chosen
    times = vb.measure_encode(model)  # type: ignore[arg-type]
    assert calls == [(1, False), (2, False), (4, False), (8, False)] and times.batch == 8


def test_tuned_wrapper_keeps_codes_exact(vqgan_case):
    cfg, params, a = vqgan_case["cfg"], vqgan_case["params"], vqgan_case["arrays"]
    model = vq.VQGAN(params, cfg, batch_size=8)
    times = model.tune_encode()
    assert model.batch_size == times.batch and set(model.encode_seconds or {}) == set(times.seconds)
    assert min(times.seconds) == 1 and all(s > 0 for s in times.seconds.values())
    frames = np.concatenate([a["processed"], a["processed"][::-1], a["processed"][:1]])  # 5 frames
    # Whatever sizes were measured, the split encodes every frame exactly as the reference.
    for encode_seconds in (dict(times.seconds), {1: 1.0}, {1: 1.0, 2: 1.1, 4: 1.2}):
        model.encode_seconds = encode_seconds
        np.testing.assert_array_equal(model.encode_frames(frames),
                                      np.concatenate([a["codes"], a["codes"][::-1], a["codes"][:1]]))
