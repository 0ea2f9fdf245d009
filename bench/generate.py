"""Prefill and decode speed of the generation core, next to this machine's roofs.

    .venv/bin/python bench/generate.py                      # demo + bench-150m, fp32 + bf16
    .venv/bin/python bench/generate.py --presets bench-150m --dtypes float32 --quick

Decode roof: bytes one step must read (the weights it multiplies with, plus the
KV cache slots it attends over) / measured memory bandwidth. Prefill roof:
matmul FLOPs of the prompt / measured matmul peak. Random weights; greedy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

from lwm_serve.model import config as model_config  # noqa: E402
from lwm_serve.model.generation import Generator, PromptRow, seed_key  # noqa: E402
from lwm_serve.model.params import init_params  # noqa: E402
from lwm_serve.model.sampling import SamplingParams  # noqa: E402
from lwm_serve.model.steps import bucket_length  # noqa: E402


def weight_bytes_per_step(cfg, itemsize: int) -> int:
    """Weights a decode step multiplies with: every layer, ln_f and one head
    (embedding tables are gathered one row per token, not streamed)."""
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_heads * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h
    return (cfg.num_hidden_layers * per_layer + h + h * cfg.vocab_size) * itemsize


def kv_bytes_per_step(cfg, slots: int, batch: int, itemsize: int) -> int:
    return 2 * cfg.num_hidden_layers * batch * slots * cfg.kv_heads * cfg.head_dim * itemsize


def prefill_flops(cfg, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 * params-in-matmuls per token + attention."""
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_heads * cfg.head_dim
    per_token = 2 * cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * m)
    attention = 2 * 2 * cfg.num_hidden_layers * h * tokens * tokens / 2  # QK^T and PV, causal half
    return per_token * tokens + attention + 2 * h * cfg.vocab_size


def run_one(gen: Generator, prompt_len: int, batch: int, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, decode tokens/s over all rows), best of two runs."""
    rng = np.random.default_rng(0)
    rows = [PromptRow([1] + rng.integers(3, gen.cfg.vocab_size, prompt_len - 1).tolist())
            for _ in range(batch)]
    best_ttft, best_rate = float("inf"), 0.0
    for _ in range(3):  # first run compiles
        t0 = time.perf_counter()
        stream = gen.stream(rows, SamplingParams(temperature=0), max_new_tokens=new_tokens, key=seed_key(0))
        next(stream)
        t1 = time.perf_counter()
        n = 1
        for _ in stream:
            n += 1
        t2 = time.perf_counter()
        best_ttft = min(best_ttft, t1 - t0)
        best_rate = max(best_rate, (n - 1) * batch / (t2 - t1))
    return best_ttft, best_rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "bench-150m"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[512, 2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="the batched decode measurement (prompt 512)")
    ap.add_argument("--quick", action="store_true", help="prompts 512 only")
    args = ap.parse_args(argv)
    prompts = [512] if args.quick else args.prompts

    bandwidth = roofline.memory_bandwidth()
    peaks = {d: roofline.matmul_peak(dtype=d) for d in args.dtypes}
    print(f"device {roofline.device_description()}: memory bandwidth {bandwidth / 1e9:.1f} GB/s, "
          + ", ".join(f"matmul {d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    header = f"{'model':<11}{'dtype':<9}{'batch':>5}{'prompt':>7} | {'TTFT s':>8}{'prefill tok/s':>14}{'roof':>9}{'ratio':>7} | {'decode tok/s':>13}{'roof':>9}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    results = []
    for preset in args.presets:
        for dtype in args.dtypes:
            cfg = model_config.from_preset(preset, dtype=dtype, param_dtype=dtype,
                                           max_sequence_length=max(prompts) + 1024)
            params = init_params(cfg, jax.random.PRNGKey(0))
            gen = Generator(params, cfg, prefill_chunk=max(prompts))
            itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
            runs = [(1, p) for p in prompts] + [(args.batch, 512)]
            for batch, prompt in runs:
                ttft, rate = run_one(gen, prompt, batch, args.new_tokens)
                padded = bucket_length(prompt)
                prefill_rate = batch * prompt / ttft
                prefill_roof = batch * prompt / (batch * prefill_flops(cfg, padded) / peaks[dtype])
                slots = prompt + args.new_tokens // 2
                step_bytes = weight_bytes_per_step(cfg, itemsize) + kv_bytes_per_step(cfg, slots, batch, itemsize)
                decode_roof = batch * bandwidth / step_bytes
                rec = dict(model=preset, dtype=dtype, batch=batch, prompt=prompt, ttft_s=ttft,
                           prefill_tok_s=prefill_rate, prefill_roof_tok_s=prefill_roof,
                           decode_tok_s=rate, decode_roof_tok_s=decode_roof,
                           decode_step_bytes=step_bytes)
                results.append(rec)
                print(f"{preset:<11}{dtype:<9}{batch:>5}{prompt:>7} | {ttft:>8.3f}{prefill_rate:>14.0f}"
                      f"{prefill_roof:>9.0f}{prefill_rate / prefill_roof:>7.2f} | {rate:>13.1f}"
                      f"{decode_roof:>9.1f}{rate / decode_roof:>7.2f}")
            del gen, params
    roofline.print_json_line(dict(bench="generate", device=roofline.device_description(),
                                  git=roofline.git_sha(), memory_bandwidth_Bps=bandwidth,
                                  matmul_peak_flops=peaks, results=results))


if __name__ == "__main__":
    main()
