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
import json
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
from lwm_serve.model.runner import SlotPool, chunk_plan  # noqa: E402


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


def prefilled_tokens(n: int, chunk: int) -> int:
    """Tokens the slot pool's chunk plan runs for a fresh n-token prompt (model/runner.py
    `chunk_plan`: whole chunks, then pieces of power-of-two sizes, the padding or overlap)."""
    return sum(t for _, t in chunk_plan(n, 0, chunk))


def run_one(gen: Generator, prompt_len: int, batch: int, new_tokens: int,
            repeats: int) -> tuple[float, float, float, float]:
    """(wall seconds to first token, CPU seconds of it, decode tokens/s over all rows,
    decode tokens per CPU-second), best of `repeats` runs after one that compiles."""
    rng = np.random.default_rng(0)
    rows = [PromptRow([1] + rng.integers(3, gen.cfg.vocab_size, prompt_len - 1).tolist())
            for _ in range(batch)]
    best = [float("inf"), float("inf"), 0.0, 0.0]
    for attempt in range(repeats + 1):  # the first run compiles
        c0, t0 = time.process_time(), time.perf_counter()
        stream = gen.stream(rows, SamplingParams(temperature=0), max_new_tokens=new_tokens, key=seed_key(0))
        next(stream)
        t1, c1 = time.perf_counter(), time.process_time()
        n = 1
        for _ in stream:
            n += 1
        t2, c2 = time.perf_counter(), time.process_time()
        if attempt == 0:
            continue
        best[0], best[1] = min(best[0], t1 - t0), min(best[1], c1 - c0)
        if n > 1:
            best[2] = max(best[2], (n - 1) * batch / (t2 - t1))
            best[3] = max(best[3], (n - 1) * batch / max(c2 - c1, 1e-9))
    return best[0], best[1], best[2], best[3]


def pool_decode(params, cfg, chunk: int, rows: int, length: int, prompt_len: int, active: int,
                steps: int) -> float:
    """Decode tokens/s of `active` rows in an engine-shaped slot pool (`rows` rows of
    `length` slots, as the server allocates for --max-num-seqs and --max-model-len): the
    server's decode reads such a pool, most of it empty, not the tight pool `Generator`
    builds per call."""
    pool = SlotPool(params, cfg, num_slots=rows, max_length=length, prefill_chunk=chunk)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, prompt_len)
    task = pool.start_prefill(ids, np.zeros(prompt_len, bool))
    while not pool.prefill_step(task):
        pass
    feed = {}
    for row in pool.allocate(active):
        pool.insert(task, row)
        feed[row] = 5
    best = 0.0
    for attempt in range(3):  # the first compiles
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = pool.decode(feed)
            np.asarray(logits[:1, :1])  # the engine reads every step's tokens back
        if attempt:
            best = max(best, steps * active / (time.perf_counter() - t0))
    return best


def _pairs(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[int(key)] = float(value)
    return out


def draw(record: dict, path: str, clock: str, reference_prefill: dict[int, float],
         reference_decode: dict[int, float]) -> None:
    """The roofline of one run's JSON record (this script's last output line).

    clock "cpu": CPU seconds against the roofs measured in CPU seconds (what a
    shared CPU host can show honestly); "wall": wall clock against wall roofs.
    The reference's figures are wall-clock seconds of the original code.
    """
    results = record["results"]
    model, dtype = results[0]["model"], results[0]["dtype"]
    cfg = model_config.from_preset(model, dtype=dtype, param_dtype=dtype)
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    cpu = clock == "cpu"
    peak = (record["matmul_peak_flops_per_cpu_s"] if cpu else record["matmul_peak_flops"])[dtype]
    bandwidth = record.get("memory_bandwidth_Bps_per_cpu_s") if cpu else None
    bandwidth = bandwidth or record["memory_bandwidth_Bps"]
    points = []
    for r in results:
        if (r["model"], r["dtype"]) != (model, dtype):
            continue
        b, prompt = r["batch"], r["prompt"]
        padded = r.get("padded_prompt", prompt)
        flops = b * prefill_flops(cfg, padded)
        seconds = r["ttft_cpu_s"] if cpu else r["ttft_s"]
        points.append(dict(kind=f"prefill b{b}", label=f"{prompt // 1024}K" if prompt >= 1024 else f"{prompt}",
                           intensity=flops / prefill_bytes(cfg, padded, b, itemsize), flops_per_s=flops / seconds))
        rate = r.get("decode_tok_per_cpu_s") if cpu else r["decode_tok_s"]
        if rate:
            slots = prompt + record.get("new_tokens", 32) // 2
            dflops = decode_flops(cfg, slots, b)
            points.append(dict(kind=f"decode b{b}", label=f"{prompt}", intensity=dflops / r["decode_step_bytes"],
                               flops_per_s=dflops * rate / b))
    reference = []
    if cpu and (reference_prefill or reference_decode):
        print("the reference's figures are wall-clock seconds from another day: drawn with --clock wall only")
        reference_prefill, reference_decode = {}, {}
    for length, seconds in reference_prefill.items():
        f = prefill_flops(cfg, length)
        reference.append(dict(kind="prefill b1", label=f"{length}", flops_per_s=f / seconds,
                              intensity=f / prefill_bytes(cfg, length, 1, itemsize)))
    for length, tok_s in reference_decode.items():
        moved = weight_bytes_per_step(cfg, itemsize) + kv_bytes_per_step(cfg, length, 1, itemsize)
        f = decode_flops(cfg, length, 1)
        reference.append(dict(kind="decode b1", label=f"{length}", flops_per_s=f * tok_s, intensity=f / moved))
    how = ("FLOPs per CPU-second against roofs measured in CPU seconds in the same run (shared host)"
           if cpu else "wall clock, roofs measured in the same run")
    roofline.plot_roofline(path, points, peak_flops=peak, bandwidth=bandwidth, reference=reference,
                           title=f"{model} {dtype} on {record['device']}, {record['git']}: {how}; "
                                 "% of the roof under each point" + ("; hollow: the original LWM code" if reference else ""))
    print(f"roofline plot written to {path}")


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
    ap.add_argument("--pool", type=int, nargs=2, default=[16, 4096], metavar=("ROWS", "LENGTH"),
                    help="the engine-shaped slot pool decode is also measured in (0 0: skip)")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the roofline (needs the `bench` extra)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="the plot's clock (default: cpu on a CPU backend, wall on an accelerator)")
    ap.add_argument("--from-json", metavar="FILE", help="no measuring: plot the JSON line of an earlier run")
    ap.add_argument("--reference-prefill", nargs="*", default=[], metavar="LEN=SECONDS",
                    help="the reference's time to first token per prompt length (batch 1), for the plot")
    ap.add_argument("--reference-decode", nargs="*", default=[], metavar="LEN=TOK_PER_S",
                    help="the reference's batch-1 decode tokens/s per prompt length, for the plot")
    args = ap.parse_args(argv)
    clock = args.clock or ("cpu" if jax.devices()[0].platform == "cpu" else "wall")
    refs = (_pairs(args.reference_prefill), _pairs(args.reference_decode))
    if args.from_json:
        lines = [ln for ln in Path(args.from_json).read_text().splitlines() if ln.startswith("{")]
        draw(json.loads(lines[-1]), args.plot or "roofline.png", clock, *refs)
        return
    prompts = [512] if args.quick else args.prompts

    bandwidth, cpu_bandwidth = roofline.memory_bandwidth(), roofline.memory_bandwidth_cpu_time()
    peaks = {d: roofline.matmul_peak(dtype=d) for d in args.dtypes}
    cpu_peaks = {d: roofline.matmul_peak_cpu_time(dtype=d) for d in args.dtypes}
    print(f"device {roofline.device_description()}: memory bandwidth {bandwidth / 1e9:.1f} GB/s, "
          + ", ".join(f"matmul {d} {peaks[d] / 1e9:.0f} GFLOP/s wall, {cpu_peaks[d] / 1e9:.0f} per CPU-second"
                      for d in args.dtypes))
    print("one code path: `Generator` (the one-request library API) runs on the engine's steps "
          "(model/runner.SlotPool over model/steps: one-row prefills, then batched decode_rows), so "
          "'new steps vs Generator' is one measurement; batch 1 is the one-row step")
    header = (f"{'model':<11}{'dtype':<9}{'batch':>5}{'prompt':>7}{'chunk':>6} | {'TTFT s':>8}{'prefill tok/s':>14}"
              f"{'roof':>8}{'wall':>6}{'cpu':>6} | {'decode tok/s':>13}{'roof':>8}{'ratio':>6}")
    print(header)
    print("-" * len(header))
    results, pool_results = [], []
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
                ttft, cpu_s, rate, cpu_rate = run_one(gen, prompt, batch, args.new_tokens, args.repeats)
                padded = prefilled_tokens(prompt, chunk)
                flops = batch * prefill_flops(cfg, padded)
                prefill_rate = batch * prompt / ttft
                prefill_roof = batch * prompt / (flops / peaks[dtype])
                wall_share, cpu_share = flops / ttft / peaks[dtype], flops / cpu_s / cpu_peaks[dtype]
                slots = prompt + args.new_tokens // 2
                step_bytes = weight_bytes_per_step(cfg, itemsize) + kv_bytes_per_step(cfg, slots, batch, itemsize)
                decode_roof = batch * bandwidth / step_bytes
                results.append(dict(
                    model=preset, dtype=dtype, batch=batch, prompt=prompt, padded_prompt=padded,
                    prefill_chunk=min(chunk, padded), ttft_s=ttft, ttft_cpu_s=cpu_s, prefill_tok_s=prefill_rate,
                    prefill_roof_tok_s=prefill_roof, prefill_share_wall=wall_share, prefill_share_cpu=cpu_share,
                    decode_tok_s=rate, decode_tok_per_cpu_s=cpu_rate, decode_roof_tok_s=decode_roof,
                    decode_step_bytes=step_bytes))
                print(f"{preset:<11}{dtype:<9}{batch:>5}{prompt:>7}{min(chunk, padded):>6} | {ttft:>8.3f}"
                      f"{prefill_rate:>14.0f}{prefill_roof:>8.0f}{wall_share:>6.2f}{cpu_share:>6.2f} | "
                      f"{rate:>13.1f}{decode_roof:>8.1f}{rate / decode_roof:>6.2f}")
                sys.stdout.flush()
            one = next(r for r in results[::-1] if r["model"] == preset and r["dtype"] == dtype
                       and r["batch"] == 1 and r["prompt"] == 512)
            many = results[-1]
            if one["decode_tok_s"] and many["batch"] > 1:
                print(f"{preset} {dtype}: decode batch {many['batch']} / batch 1 at prompt 512 = "
                      f"{many['decode_tok_s'] / one['decode_tok_s']:.2f}x wall, "
                      f"{many['decode_tok_per_cpu_s'] / one['decode_tok_per_cpu_s']:.2f}x per CPU-second; "
                      f"the memory roof allows {many['decode_roof_tok_s'] / one['decode_roof_tok_s']:.2f}x "
                      "(the KV cache read grows with the batch)")
            if args.pool[0]:
                rows, length = args.pool
                pool_rates = {b: pool_decode(gen.params, gen.cfg, chunk, rows, length, 512, b, args.new_tokens)
                              for b in sorted({1, min(args.batch, rows)})}
                for b, rate in pool_rates.items():
                    roof = b * bandwidth / (weight_bytes_per_step(cfg, itemsize)
                                            + kv_bytes_per_step(cfg, 512 + args.new_tokens // 2, b, itemsize))
                    print(f"{preset} {dtype}: engine pool {rows} rows x {length} slots, batch {b}, prompt 512: "
                          f"decode {rate:.1f} tok/s (roof {roof:.1f}, {rate / roof:.2f})")
                    pool_results.append(dict(model=preset, dtype=dtype, batch=b, prompt=512, rows=rows, length=length,
                                             decode_tok_s=rate, decode_roof_tok_s=roof))
                if len(pool_rates) > 1:
                    print(f"{preset} {dtype}: engine pool decode batch {max(pool_rates)} / batch 1 = "
                          f"{pool_rates[max(pool_rates)] / pool_rates[1]:.2f}x")
            del gen, params
    record = dict(bench="generate", device=roofline.device_description(), git=roofline.git_sha(),
                  memory_bandwidth_Bps=bandwidth, memory_bandwidth_Bps_per_cpu_s=cpu_bandwidth,
                  matmul_peak_flops=peaks, matmul_peak_flops_per_cpu_s=cpu_peaks,
                  new_tokens=args.new_tokens, results=results,
                  engine_pool=pool_results)
    roofline.print_json_line(record)
    if args.plot:
        draw(record, args.plot, clock, *refs)


if __name__ == "__main__":
    main()
