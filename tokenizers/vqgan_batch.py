"""How many frames one VQGAN encode call takes: measured per device, split per frame count.

A bigger batch is not always faster per frame. On accelerators it usually is (more work
per launch); on this project's 2-core CPU it was not: a 256x256 frame's activations
(128 channels x 256 x 256 x 4 bytes = 32 MiB per tensor) already overflow the caches,
so batching adds memory traffic and no parallelism the two cores lack (`bench/ingest.py`,
real-size VQGAN, 213 GFLOP/frame, issue 16: batch 1 1.57 frames/s, batch 8 1.20). On the
same machine under load the order changed from run to run (batch 1/2/4/8: 10.3 / 12.1 /
6.1 / 7.5 s per frame at a measured matmul roof of 46 GFLOP/s). So the batch is measured
where it runs, not assumed:

* `measure_encode`: compile each candidate batch (that is also the start-up
  warm-up: the sizes the server will use are compiled before /ready; the first two
  may be compiled and run once beforehand with `compile_encode`, beside the model's own
  compiles),
  time one call of each, stopping at the first size that is not faster per frame than the best so
  far (per-frame time does not come back down once it rises: the caches are
  already overflowing), so a CPU pays for about two sizes, an accelerator for all;
* `split_frames`: a request's n frames become the calls of least summed measured
  time (3 frames with sizes 1 and 4 compiled: 1+1+1 or one padded 4, whichever the
  numbers say), so the frame count, not a fixed 8, decides the shapes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Collection, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from lwm_serve.tokenizers.vqgan import VQGAN

logger = logging.getLogger(__name__)

CANDIDATES = (1, 2, 4, 8)
# A larger batch must beat the best per-frame time by this much to be chosen: a smaller
# batch pads less, holds less memory and gives progress (and overlap with decoding) sooner.
_MARGIN = 0.05


@dataclass(frozen=True)
class EncodeTimes:
    """Measured seconds of one encode call per batch size, and the batch chosen."""

    seconds: Mapping[int, float]
    batch: int
    platform: str

    def frames_per_s(self) -> dict[int, float]:
        return {b: b / s for b, s in self.seconds.items()}


def best_batch(seconds: Mapping[int, float]) -> int:
    """The batch of least time per frame; a larger one only when it wins by `_MARGIN`."""
    best = min(seconds)
    for b in sorted(seconds):
        if seconds[b] / b < (1 - _MARGIN) * seconds[best] / best:
            best = b
    return best


def split_frames(n: int, seconds: Mapping[int, float]) -> list[int]:
    """The batch sizes that encode `n` frames in the least summed time (pure).

    A call of size b encodes up to b frames (the last call may be padded). Sizes are
    returned largest first.

    Args:
        n: frames to encode (>= 0).
        seconds: measured seconds of one call per compiled batch size.
    """
    if n <= 0:
        return []
    return list(_split(n, tuple(sorted(seconds.items()))))


@lru_cache(maxsize=256)
def _split(n: int, items: tuple[tuple[int, float], ...]) -> tuple[int, ...]:
    cost = [0.0] + [float("inf")] * n
    choice = [0] * (n + 1)
    for k in range(1, n + 1):
        for b, s in items:
            c = s + cost[max(0, k - b)]
            if c < cost[k] - 1e-12:
                cost[k], choice[k] = c, b
    out = []
    k = n
    while k > 0:
        out.append(choice[k])
        k = max(0, k - choice[k])
    return tuple(sorted(out, reverse=True))


def compile_encode(model: "VQGAN", sizes: Iterable[int]) -> None:
    """Compile the encode of each batch size and run it once: the untimed half of a measurement,
    which may run beside other compiles (`measure_encode(..., compiled=sizes)` then only times).
    The first run of an executable is slower (its buffers are touched for the first time: 3x
    the steady time on the demo VQGAN), so it is never the one timed."""
    r, c = model.cfg.resolution, model.cfg.num_channels
    for b in sizes:
        model.compile_encode(b)
        model.encode_batch(np.zeros((b, r, r, c), np.float32))


def _time_call(model: "VQGAN", batch: int, compiled: bool) -> tuple[float, float]:
    """(compile + first run seconds, or 0 if done already; seconds of one more call) of `batch` frames."""
    t0 = time.perf_counter()
    if not compiled:
        compile_encode(model, [batch])
    t1 = time.perf_counter()
    r = model.cfg.resolution
    frames = np.random.default_rng(batch).uniform(-1, 1, (batch, r, r, model.cfg.num_channels)).astype(np.float32)
    t2 = time.perf_counter()
    model.encode_batch(frames)
    return t1 - t0, time.perf_counter() - t2


def measure_encode(model: "VQGAN", candidates: Sequence[int] = CANDIDATES,
                   compiled: Collection[int] = ()) -> EncodeTimes:
    """Compile and time one encode call per candidate batch (module docstring).

    Stops at the first candidate that is not faster per frame than the best so far.
    Sizes in `compiled` (by `compile_encode`) are only timed. Run it with the device
    otherwise idle: the numbers are what requests will see.
    """
    seconds: dict[int, float] = {}
    for b in sorted(candidates):
        compile_s, s = _time_call(model, b, b in compiled)
        seconds[b] = s
        logger.info("VQGAN encode batch %d: %.3f s per frame (compile + first run %.1f s)", b, s / b, compile_s)
        if best_batch(seconds) != b and len(seconds) > 1:
            break
    platform = model.platform
    times = EncodeTimes(seconds, best_batch(seconds), platform)
    logger.info("VQGAN encode batch %d on %s (%s)", times.batch, platform,
                ", ".join(f"batch {b}: {f:.2f} frames/s" for b, f in times.frames_per_s().items()))
    return times
