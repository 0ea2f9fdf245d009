"""Frame selection rules: reference-exact uniform sampling, fps, ranges, spec keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_serve.tokenizers.frame_sampling import (
    DEFAULT_MAX_FRAMES,
    SamplingSpec,
    estimate_n_frames,
    select_frames,
    uniform_indices,
)


@given(n=st.integers(0, 5000), m=st.integers(1, 64))
def test_uniform_matches_the_reference_rule(n, m):
    want = list(range(n)) if n <= m else np.linspace(0, n - 1, m, dtype=int).tolist()
    assert uniform_indices(n, m) == want


def test_uniform_on_the_fixture_video(vqgan_case):
    case = vqgan_case["case"]
    assert uniform_indices(case["video_n_frames"], case["video_max_n_frames"]) == case["video_frame_ids_chosen"]


def test_default_spec_is_the_reference_default():
    spec = SamplingSpec()
    assert spec.max_frames == DEFAULT_MAX_FRAMES == 8
    times = [i / 30 for i in range(300)]
    assert select_frames(times, spec) == uniform_indices(300, 8)


def test_fps_takes_one_frame_per_period_from_the_start():
    times = [i / 30 for i in range(300)]  # 10 s at 30 fps
    assert select_frames(times, SamplingSpec(max_frames=None, fps=1.0)) == list(range(0, 300, 30))
    assert select_frames(times, SamplingSpec(max_frames=None, fps=2.0, start=3.0)) == list(range(90, 300, 15))


def test_fps_above_the_video_rate_returns_each_frame_once():
    times = [i / 5 for i in range(20)]
    assert select_frames(times, SamplingSpec(max_frames=None, fps=1000.0)) == list(range(20))


def test_fps_on_variable_frame_rate_takes_the_first_frame_at_or_after_each_target():
    times = [0.0, 0.1, 0.15, 0.4, 1.0, 1.1, 1.5, 2.5]
    # targets 0, 0.5 (-> 1.0), then 1.5, then 2.0 (-> 2.5)
    assert select_frames(times, SamplingSpec(max_frames=None, fps=2.0)) == [0, 4, 6, 7]


def test_range_bounds_are_inclusive():
    times = [i / 10 for i in range(50)]
    got = select_frames(times, SamplingSpec(max_frames=None, start=1.0, end=2.0))
    assert got == list(range(10, 21))


def test_max_frames_caps_after_fps_and_range():
    times = [i / 10 for i in range(600)]
    spec = SamplingSpec(max_frames=5, fps=1.0, start=10.0, end=40.0)
    per_second = list(range(100, 401, 10))
    assert select_frames(times, spec) == [per_second[i] for i in uniform_indices(len(per_second), 5)]


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0.001, 2.0), min_size=1, max_size=200),
    max_frames=st.one_of(st.none(), st.integers(1, 20)),
    fps=st.one_of(st.none(), st.floats(0.05, 50.0)),
    start=st.one_of(st.none(), st.floats(0, 50)),
    length=st.one_of(st.none(), st.floats(0, 50)),
)
def test_selection_properties(gaps, max_frames, fps, start, length):
    times = np.cumsum([0.0] + gaps).tolist()
    end = None if length is None else (start or 0.0) + length
    spec = SamplingSpec(max_frames=max_frames, fps=fps, start=start, end=end)
    got = select_frames(times, spec)
    assert got == sorted(set(got))
    if max_frames is not None:
        assert len(got) <= max_frames
    for i in got:
        assert start is None or times[i] >= start - 1e-6
        assert end is None or times[i] <= end + 1e-6
    if fps is not None and max_frames is None and got:
        # no two picks fall in the same 1/fps period counted from t0
        t0 = start if start is not None else times[got[0]]
        for a, b in zip(got, got[1:]):
            assert (times[b] - t0 + 2e-6) * fps >= np.floor((times[a] - t0 + 1e-6) * fps) + 1 - 1e-6


def test_spec_validation():
    for bad in (
        dict(max_frames=0),
        dict(fps=0.0),
        dict(fps=float("nan")),
        dict(start=-1.0),
        dict(start=5.0, end=4.0),
    ):
        with pytest.raises(ValueError):
            SamplingSpec(**bad)


def test_spec_keys_are_stable_and_distinct():
    specs = [
        SamplingSpec(),
        SamplingSpec(max_frames=None),
        SamplingSpec(max_frames=9),
        SamplingSpec(fps=1.0),
        SamplingSpec(fps=1.5),
        SamplingSpec(start=1.0),
        SamplingSpec(end=1.0),
    ]
    keys = [s.key() for s in specs]
    assert len(set(keys)) == len(keys)
    assert SamplingSpec(fps=1).key() == SamplingSpec(fps=1.0).key()
    assert SamplingSpec().key() == SamplingSpec(max_frames=8).key()


def test_frame_estimates():
    assert estimate_n_frames(SamplingSpec(max_frames=None, fps=1.0), 3600 * 30, 3600.0) == 3600
    assert estimate_n_frames(SamplingSpec(), 3600 * 30, 3600.0) == 8
    assert estimate_n_frames(SamplingSpec(), 0, 0.0) == 0
