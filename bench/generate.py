"""Prefill and decode speed of the generation core, next to this machine's roofs.

    .venv/bin/python bench/generate.py                      # bench-150m fp32, prompts 512..16384
    .venv/bin/python bench/generate.py --presets demo bench-150m --dtypes float32 bfloat16 --quick
    .venv/bin/python bench/generate.py --plot docs/roofline.png --reference-prefill 512=0.60 2048=4.39

Decode roof: bytes one step must read (the weights it multiplies with, plus the
KV cache slots it attends over) / measured memory bandwidth. Prefill roof:
matmul FLOPs of the prompt (causal attention counted as its visible half) /
measured matmul peak. Random weights; greedy.

Two clocks. `wall` is time to first token against the wall-clock roofs. `cpu`
is the CPU seconds (all threads) of the same prefill against the matmul roof
measured in CPU seconds: on a shared CPU host (this project's CI-class machine
runs other people's tests) wall-clock figures and roofs move 2-3x with the
load, while CPU seconds of compute-bound work barely move. On an accelerator
read the wall columns.

`--plot FILE.png` draws the roofline: each prefill (per prompt length and
batch) and decode measurement as achieved FLOP/s at its arithmetic intensity,
under the two roofs measured in this run; `--reference-prefill LEN=SECONDS`
(and `--reference-decode LEN=TOK_PER_S`) add the original LWM code's figures.
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

from lwm_serve.model import chunking  # noqa: E402
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
    return chunking.prefill_flops(cfg, tokens) + 2 * cfg.hidden_size * cfg.vocab_size


def prefill_bytes(cfg, tokens: int, batch: int, itemsize: int) -> int:
    """Bytes a prefill must move at least: the weights once, the KV cache written once
    and read back by the attention of each later query tile (lower bound: once)."""
    return weight_bytes_per_step(cfg, itemsize) + 2 * kv_bytes_per_step(cfg, tokens, batch, itemsize)


def decode_flops(cfg, slots: int, batch: int) -> float:
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_heads * cfg.head_dim
    per_token = 2 * cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * m) + 2 * h * cfg.vocab_size
    return batch * (per_token + 2 * 2 * cfg.num_hidden_layers * h * slots)


def run_one(gen: Generator, prompt_len: int, batch: int, new_tokens: int,
            repeats: int) -> tuple[float, float, float]:
    """(wall seconds to first token, CPU seconds of it, decode tokens/s over all rows),
    best of `repeats` runs after one that compiles."""
    rng = np.random.default_rng(0)
    rows = [PromptRow([1] + rng.integers(3, gen.cfg.vocab_size, prompt_len - 1).tolist())
            for _ in range(batch)]
    best_ttft, best_cpu, best_rate = float("inf"), float("inf"), 0.0
    for attempt in range(repeats + 1):  # the first run compiles
        c0, t0 = time.process_time(), time.perf_counter()
        stream = gen.stream(rows, SamplingParams(temperature=0), max_new_tokens=new_tokens, key=seed_key(0))
        next(stream)
        t1, c1 = time.perf_counter(), time.process_time()
        n = 1
        for _ in stream:
            n += 1
        t2 = time.perf_counter()
        if attempt == 0:
            continue
        best_ttft, best_cpu = min(best_ttft, t1 - t0), min(best_cpu, c1 - c0)
        if n > 1:
            best_rate = max(best_rate, (n - 1) * batch / (t2 - t1))
    return best_ttft, best_cpu, best_rate


def _pairs(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[int(key)] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["bench-150m"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="the batched measurement (prompt 512)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per point (after one that compiles)")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="tokens per prefill step; 0: model.chunking.choose_prefill_chunk")
    ap.add_argument("--quick", action="store_true", help="prompts 512 only")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the roofline (needs the `bench` extra)")
    ap.add_argument("--reference-prefill", nargs="*", default=[], metavar="LEN=SECONDS",
                    help="the reference's time to first token per prompt length (batch 1), for the plot")
    ap.add_argument("--reference-decode", nargs="*", default=[], metavar="LEN=TOK_PER_S",
                    help="the reference's batch-1 decode tokens/s per prompt length, for the plot")
    args = ap.parse_args(argv)
    prompts = [512] if args.quick else args.prompts

    bandwidth = roofline.memory_bandwidth()
    peaks = {d: roofline.matmul_peak(dtype=d) for d in args.dtypes}
    cpu_peaks = {d: roofline.matmul_peak_cpu_time(dtype=d) for d in args.dtypes}
    print(f"device {roofline.device_description()}: memory bandwidth {bandwidth / 1e9:.1f} GB/s, "
          + ", ".join(f"matmul {d} {peaks[d] / 1e9:.0f} GFLOP/s wall, {cpu_peaks[d] / 1e9:.0f} per CPU-second"
                      for d in args.dtypes))
    header = (f"{'model':<11}{'dtype':<9}{'batch':>5}{'prompt':>7}{'chunk':>6} | {'TTFT s':>8}{'prefill tok/s':>14}"
              f"{'roof':>8}{'wall':>6}{'cpu':>6} | {'decode tok/s':>13}{'roof':>8}{'ratio':>6}")
    print(header)
    print("-" * len(header))
    results, points = [], []
    for preset in args.presets:
        for dtype in args.dtypes:
            cfg = model_config.from_preset(preset, dtype=dtype, param_dtype=dtype,
                                           max_sequence_length=max(prompts) + 1024)
            chunk = args.prefill_chunk or chunking.choose_prefill_chunk(cfg)
            params = init_params(cfg, jax.random.PRNGKey(0))
            gen = Generator(params, cfg, prefill_chunk=chunk)
            itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
            runs = [(1, p) for p in prompts] + [(args.batch, 512)]
            for batch, prompt in runs:
                ttft, cpu_s, rate = run_one(gen, prompt, batch, args.new_tokens, args.repeats)
                padded = gen._prompt_bucket(prompt)  # noqa: SLF001 (what the generator prefills)
                flops = batch * prefill_flops(cfg, padded)
                prefill_rate = batch * prompt / ttft
                prefill_roof = batch * prompt / (flops / peaks[dtype])
                wall_share, cpu_share = flops / ttft / peaks[dtype], flops / cpu_s / cpu_peaks[dtype]
                slots = prompt + args.new_tokens // 2
                step_bytes = weight_bytes_per_step(cfg, itemsize) + kv_bytes_per_step(cfg, slots, batch, itemsize)
                decode_roof = batch * bandwidth / step_bytes
                rec = dict(model=preset, dtype=dtype, batch=batch, prompt=prompt, prefill_chunk=min(chunk, padded),
                           ttft_s=ttft, ttft_cpu_s=cpu_s, prefill_tok_s=prefill_rate,
                           prefill_roof_tok_s=prefill_roof, prefill_share_wall=wall_share,
                           prefill_share_cpu=cpu_share, decode_tok_s=rate, decode_roof_tok_s=decode_roof,
                           decode_step_bytes=step_bytes)
                results.append(rec)
                print(f"{preset:<11}{dtype:<9}{batch:>5}{prompt:>7}{min(chunk, padded):>6} | {ttft:>8.3f}"
                      f"{prefill_rate:>14.0f}{prefill_roof:>8.0f}{wall_share:>6.2f}{cpu_share:>6.2f} | "
                      f"{rate:>13.1f}{decode_roof:>8.1f}{rate / decode_roof:>6.2f}")
                sys.stdout.flush()
                tag = f"{preset} {dtype}"
                points.append(dict(kind=f"prefill b{batch}", label=f"{prompt // 1024 or prompt}{'K' if prompt >= 1024 else ''}",
                                   intensity=flops / prefill_bytes(cfg, padded, batch, itemsize),
                                   flops_per_s=flops / ttft, model=tag))
                if rate:
                    dflops = decode_flops(cfg, slots, batch)
                    points.append(dict(kind=f"decode b{batch}", label=f"{prompt}", model=tag,
                                       intensity=dflops / step_bytes, flops_per_s=dflops * rate / batch))
            if args.plot and preset == args.presets[-1] and dtype == args.dtypes[0]:
                plot_cfg, plot_itemsize = cfg, itemsize
            del gen, params
    roofline.print_json_line(dict(bench="generate", device=roofline.device_description(),
                                  git=roofline.git_sha(), memory_bandwidth_Bps=bandwidth,
                                  matmul_peak_flops=peaks, matmul_peak_flops_per_cpu_s=cpu_peaks,
                                  results=results))
    if args.plot:
        tag = f"{args.presets[-1]} {args.dtypes[0]}"
        reference = []
        for length, seconds in _pairs(args.reference_prefill).items():
            f = prefill_flops(plot_cfg, length)
            reference.append(dict(kind="prefill b1", label=f"{length}", flops_per_s=f / seconds,
                                  intensity=f / prefill_bytes(plot_cfg, length, 1, plot_itemsize)))
        for length, tok_s in _pairs(args.reference_decode).items():
            b = weight_bytes_per_step(plot_cfg, plot_itemsize) + kv_bytes_per_step(plot_cfg, length, 1, plot_itemsize)
            f = decode_flops(plot_cfg, length, 1)
            reference.append(dict(kind="decode b1", label=f"{length}", flops_per_s=f * tok_s, intensity=f / b))
        roofline.plot_roofline(
            args.plot, [p for p in points if p["model"] == tag], peak_flops=peaks[args.dtypes[0]],
            bandwidth=bandwidth, reference=reference,
            title=f"{tag} on {roofline.device_description()}, {roofline.git_sha()}: wall clock, roofs measured "
                  "in the same run (shares in % of the roof under each point)")
        print(f"roofline plot written to {args.plot}")


if __name__ == "__main__":
    main()
