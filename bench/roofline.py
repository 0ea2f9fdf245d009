"""This machine's limits, measured in the same process as the figure they bound.

* memory bandwidth: a jitted reduction over a buffer much larger than the caches
  (what a decode step does with the weights);
* matmul peak: a large square fp32 (or bf16) matmul.

The numbers are noisy on a shared host (they move 2x between days): always
report a figure next to the roof measured in the same run.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def _best_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s streamed by a reduction over `nbytes` of fp32."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    seconds = _best_time(jax.jit(jnp.sum), x)
    return nbytes / seconds


def matmul_peak(n: int = 2048, dtype: str = "float32") -> float:
    """FLOP/s of an n x n x n matmul in `dtype`."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    seconds = _best_time(jax.jit(jnp.matmul), a, b)
    return 2 * n**3 / seconds


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{len(jax.devices())}"


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_json_line(record: dict) -> None:
    print(json.dumps(record, sort_keys=True))
