"""Which video frames to keep: uniform count, frames per second, time range. Pure.

Selection works on the video's frame timeline (presentation timestamps in
seconds, ascending) so that variable-frame-rate video is sampled by real time,
and so that every decode strategy (full, seek, keyframe skipping) picks the very
same frames: they all select on the same timeline first and decode after.

Rules, applied in order:
1. range: keep frames with `start <= t <= end` (either bound optional);
2. fps: for targets `t_k = t0 + k / fps` (t0 = start, else the first kept
   frame's time) pick the first frame at or after each target; duplicates drop,
   so asking for more fps than the video has returns each frame once;
3. max_frames: if more frames remain than `max_frames`, keep
   `np.linspace(0, n - 1, max_frames, dtype=int)` of them, exactly the
   reference's rule (LWM vision_chat with max_n_frames, default 8).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Sequence

import numpy as np

TOKENS_PER_FRAME = 257  # 256 VQGAN codes + one delimiter (8192 / 8193)
DEFAULT_MAX_FRAMES = 8  # the reference's max_n_frames default
_EPS = 1e-6  # seconds: timestamps are pts * time_base floats


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How to sample a video.

    Attributes:
        max_frames: cap on the number of frames (uniform subsampling above it);
            None keeps every selected frame.
        fps: frames per second to take (None: every frame in range).
        start: range start in seconds (inclusive), None = from the beginning.
        end: range end in seconds (inclusive), None = to the end.
    """

    max_frames: int | None = DEFAULT_MAX_FRAMES
    fps: float | None = None
    start: float | None = None
    end: float | None = None

    def __post_init__(self) -> None:
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            raise ValueError(f"max_frames must be a positive integer or None, got {self.max_frames!r}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive number or None, got {self.fps!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number of seconds or None, got {v!r}")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")

    def key(self) -> str:
        """Stable string naming this spec (cache keys); changes only if the rules change."""

        def f(v: float | None) -> str:
            return "none" if v is None else repr(float(v))

        mf = "none" if self.max_frames is None else str(self.max_frames)
        return f"sampling-v1;max_frames={mf};fps={f(self.fps)};start={f(self.start)};end={f(self.end)}"


def uniform_indices(n: int, max_frames: int) -> list[int]:
    """The reference's choice: all of range(n) if n <= max_frames, else linspace as int."""
    if n <= max_frames:
        return list(range(n))
    return np.linspace(0, n - 1, max_frames, dtype=int).tolist()


def select_frames(timestamps: Sequence[float], spec: SamplingSpec) -> list[int]:
    """Choose frames from a timeline.

    Args:
        timestamps: [n] presentation times in seconds, ascending.
        spec: the sampling spec.

    Returns:
        Ascending indices into `timestamps`.
    """
    ts = [float(t) for t in timestamps]
    if any(b < a for a, b in zip(ts, ts[1:])):
        raise ValueError("timestamps must be ascending")
    lo = 0 if spec.start is None else bisect.bisect_left(ts, spec.start - _EPS)
    hi = len(ts) if spec.end is None else bisect.bisect_right(ts, spec.end + _EPS)
    chosen = list(range(lo, hi))
    if spec.fps is not None and chosen:
        chosen = _fps_pick(ts, lo, hi, spec.fps, ts[lo] if spec.start is None else spec.start)
    if spec.max_frames is not None:
        chosen = [chosen[i] for i in uniform_indices(len(chosen), spec.max_frames)]
    return chosen


def _fps_pick(ts: list[float], lo: int, hi: int, fps: float, t0: float) -> list[int]:
    out: list[int] = []
    k = 0
    while True:
        target = t0 + k / fps
        j = bisect.bisect_left(ts, target - _EPS, lo, hi)
        if j >= hi:
            return out
        out.append(j)
        # Jump straight to the first target after frame j: loops <= frames, whatever fps is.
        k = max(k + 1, math.floor((ts[j] + _EPS - t0) * fps) + 1)
        lo = j + 1


def token_count(n_frames: int) -> int:
    """Vision tokens for n frames (256 codes + 1 delimiter each)."""
    return n_frames * TOKENS_PER_FRAME


def estimate_timestamps(spec: SamplingSpec, n_frames: int, duration_s: float) -> list[float]:
    """Times (seconds) of the frames `spec` would pick from a constant-rate video of
    `n_frames` over `duration_s`.

    For budgeting and previews before decoding (probe first); the real selection uses real pts.
    """
    if n_frames <= 0:
        return []
    step = duration_s / n_frames if duration_s > 0 else 0.0
    timeline = [i * step for i in range(n_frames)]
    return [timeline[i] for i in select_frames(timeline, spec)]


def estimate_n_frames(spec: SamplingSpec, n_frames: int, duration_s: float) -> int:
    """How many frames `estimate_timestamps` picks."""
    return len(estimate_timestamps(spec, n_frames, duration_s))
