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


def _best_cpu_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        jax.block_until_ready(fn(*args))
        best = min(best, time.process_time() - t0)
    return best


def memory_bandwidth_cpu_time(nbytes: int = 1 << 30) -> float:
    """Bytes per CPU second (all threads) streamed by a reduction (see `matmul_peak_cpu_time`)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return nbytes / _best_cpu_time(jax.jit(jnp.sum), x)


def matmul_peak_cpu_time(n: int = 2048, dtype: str = "float32") -> float:
    """FLOPs per CPU second (all threads) of an n x n x n matmul.

    On a shared CPU host wall-clock roofs move 2-3x with other people's load;
    CPU seconds of a compute-bound kernel barely do. A figure measured in CPU
    seconds against this roof is its share of the machine's cores while it ran
    (on an accelerator use the wall-clock `matmul_peak`).
    """
    a = jnp.ones((n, n), dtype)
    return 2 * n**3 / _best_cpu_time(jax.jit(jnp.matmul), a, a)


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{len(jax.devices())}"


def git_sha() -> str:
    """The commit the figures belong to (`-dirty` when the tree has uncommitted changes)."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.check_output(["git", "-C", str(root), "describe", "--always", "--dirty"],
                                      text=True, stderr=subprocess.DEVNULL, timeout=10).strip()
        return out or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_json_line(record: dict) -> None:
    print(json.dumps(record, sort_keys=True))


def plot_roofline(path: str, points: list[dict], *, peak_flops: float, bandwidth: float,
                  title: str, reference: list[dict] | None = None) -> None:
    """Draw achieved FLOP/s against arithmetic intensity under this machine's two roofs.

    Args:
      path: the PNG to write.
      points: dicts with `label`, `intensity` (FLOP per byte moved), `flops_per_s`
        and `kind` (one marker/colour per kind, e.g. "prefill b1", "decode b8").
      peak_flops, bandwidth: the roofs measured in the same run.
      reference: the same dicts for the reference's figures (drawn hollow).
    Requires matplotlib (`pip install -e '.[bench]'`).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # bench-only dependency
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from e
    import textwrap

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    every = [p["intensity"] for p in points + (reference or [])]
    lo, hi = min(every + [1.0]) / 3, max(every + [peak_flops / bandwidth]) * 3
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak_flops, bandwidth * x) for x in xs], color="black", lw=2,
            label=f"roof: {peak_flops / 1e9:.0f} GFLOP/s matmul, {bandwidth / 1e9:.1f} GB/s")
    markers = "osD^v<>ph*"
    kinds = list(dict.fromkeys(p["kind"] for p in points + (reference or [])))
    for i, kind in enumerate(kinds):
        for group, hollow in ((points, False), (reference or [], True)):
            sel = [p for p in group if p["kind"] == kind]
            if not sel:
                continue
            ax.scatter([p["intensity"] for p in sel], [p["flops_per_s"] for p in sel],
                       marker=markers[i % len(markers)], s=46, zorder=3,
                       facecolors="none" if hollow else f"C{i}", edgecolors=f"C{i}",
                       label=f"{kind}{' (reference)' if hollow else ''}")
            for p in sel:
                share = p["flops_per_s"] / min(peak_flops, bandwidth * p["intensity"])
                ax.annotate(f"{p['label']} {share:.0%}", (p["intensity"], p["flops_per_s"]),
                            textcoords="offset points", xytext=(5, -11 if hollow else 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of weights, KV cache and activations moved)")
    ax.set_ylabel("achieved FLOP/s")
    ys = [p["flops_per_s"] for p in points + (reference or [])]
    ax.set_ylim(min(ys + [peak_flops]) / 2, peak_flops * 2)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
