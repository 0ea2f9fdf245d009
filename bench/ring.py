"""RingAttention prefill: per-device memory and tokens/s against sp, and against dense.

For each sequence length (4K, 8K, ... up to the largest that fits the per-device
budget at sp=8) and sp in 1, 2, 4, 8, one whole-prompt prefill step
(`steps.prefill_chunk` with a mesh: RingAttention + the sequence-sharded cache)
is compiled; its per-device peak comes from XLA's compiled memory analysis
(arguments + outputs - donated aliases + temporaries) and is printed next to
the planner's figure. Lengths up to --max-run-length are also run and timed.
The single-device path (`steps.prefill_chunk` without a mesh: the same tiled
kernel over the whole cache) is compiled at the same lengths while it fits,
giving the ring/single-device ("dense") ratios.

The 8 "devices" are simulated on this machine's CPU cores, so tokens/s cannot
grow with sp here (they share the same cores): the speed column asks whether
the ring costs more per token than one device doing all the work, and the
memory column whether it needs 1/sp of it. Both clocks are printed: wall and
CPU seconds (all threads; steady on a shared host, see bench/generate.py),
each against the matmul roof measured in the same run on the same clock.

    .venv/bin/python bench/ring.py [--device-memory 1GiB] [--max-run-length 16384] [--plot FILE.png]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

from lwm_serve.model import params as params_lib  # noqa: E402
from lwm_serve.model import planner, sharding, steps  # noqa: E402
from lwm_serve.model.config import ModelConfig  # noqa: E402
from lwm_serve.model.kv_cache import init_cache  # noqa: E402
from lwm_serve.model.mesh import make_mesh  # noqa: E402

MIB = 1024 ** 2
CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_sequence_length=1 << 21, vision_vocab_size=0,
                  scan_query_chunk_size=256, scan_key_chunk_size=256, theta=10_000_000.0)


def peak_bytes(compiled) -> int:
    """Per-device peak of a compiled step from XLA's memory analysis."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def inputs(t: int):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (1, t)), jnp.int32)
    return ids, jnp.zeros((1, t), bool), jnp.ones((1, t), jnp.int32), jnp.arange(t, dtype=jnp.int32)[None]


def compile_ring(params, t: int, sp: int):
    mesh = make_mesh(f"1,1,1,{sp}", jax.devices()[:sp])
    sharded = sharding.shard_params(params, CFG, mesh)
    cache = jax.eval_shape(lambda: sharding.init_sharded_cache(CFG, 1, t, mesh))
    cache = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   cache, sharding.cache_shardings(mesh, cache))
    compiled = steps.prefill_chunk.lower(sharded, CFG, *inputs(t), cache, "text", mesh).compile()
    make_cache = lambda: sharding.init_sharded_cache(CFG, 1, t, mesh)  # noqa: E731
    return compiled, sharded, make_cache, mesh


def compile_dense(params, t: int):
    cache = jax.eval_shape(lambda: init_cache(CFG, 1, t))
    compiled = steps.prefill_chunk.lower(params, CFG, *inputs(t), cache, "text").compile()
    return compiled, params, lambda: init_cache(CFG, 1, t)


def run_once(compiled, params, make_cache, t: int, repeats: int = 2) -> tuple[float, float]:
    """(tokens/s wall, tokens per CPU-second) of one prefill, best of `repeats`
    (compiled already; inputs and cache made outside the timing)."""
    args = inputs(t)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        cache = make_cache()
        jax.block_until_ready(cache)
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(params, *args, cache))
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - start)
    return t / best_wall, t / best_cpu


def prefill_flops_per_token(t: int) -> float:
    """Matmul FLOPs per prompt token: weights + causal attention (scores and values)."""
    h, m, layers = CFG.hidden_size, CFG.intermediate_size, CFG.num_hidden_layers
    weights = 2 * layers * (4 * h * h + 3 * h * m) + 2 * h * CFG.vocab_size / t  # last-token head
    attention = 2 * 2 * layers * h * t / 2
    return weights + attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device-memory", default="1GiB", help="per-device budget that decides 'fits'")
    ap.add_argument("--max-run-length", type=int, default=16384, help="time prefills up to this length")
    ap.add_argument("--max-length", type=int, default=1 << 21)
    ap.add_argument("--plot", metavar="FILE.png", help="draw the roofline (needs the `bench` extra)")
    args = ap.parse_args()
    budget = planner.parse_bytes(args.device_memory)
    params = params_lib.init_params(CFG, jax.random.PRNGKey(0))
    roof, cpu_roof = roofline.matmul_peak(), roofline.matmul_peak_cpu_time()
    bandwidth, cpu_bandwidth = roofline.memory_bandwidth(), roofline.memory_bandwidth_cpu_time()
    rows, dense_fits = [], True
    t = 4096
    while t <= args.max_length:
        dense = None
        if dense_fits:
            compiled, p, make = compile_dense(params, t)
            peak = peak_bytes(compiled)
            dense_fits = peak <= budget
            if dense_fits:
                tps, cps = run_once(compiled, p, make, t) if t <= args.max_run_length else (None, None)
                dense = dict(peak=peak, tps=tps, cps=cps)
                rows.append(dict(length=t, path="dense", sp=1, peak=peak, plan=None, tps=tps, cpu_tps=cps,
                                 fits=True))
        any_fit = False
        for sp in (1, 2, 4, 8):
            compiled, p, make, mesh = compile_ring(params, t, sp)
            peak = peak_bytes(compiled)
            pl = planner.plan(CFG, planner.MeshShape.of(mesh), dtype="float32", context=t,
                              prefill_chunk=t, device_memory=budget)
            fits = peak <= budget
            any_fit |= fits
            tps, cps = (run_once(compiled, p, make, t) if fits and t <= args.max_run_length
                        else (None, None))
            row = dict(length=t, path="ring", sp=sp, peak=peak, plan=pl.total_bytes, tps=tps, cpu_tps=cps,
                       fits=fits)
            if dense is not None:
                row["mem_ratio_vs_dense"] = peak / dense["peak"]
                if tps and dense["tps"]:
                    row["speed_ratio_vs_dense"] = tps / dense["tps"]
                    row["cpu_speed_ratio_vs_dense"] = cps / dense["cps"]
            rows.append(row)
        if not any_fit:
            break
        t *= 2

    print(f"RingAttention prefill, model hidden {CFG.hidden_size} x {CFG.num_hidden_layers} layers, "
          f"{CFG.num_attention_heads} heads, fp32, tiles per shape; "
          f"budget {budget / MIB:.0f} MiB/device; {jax.device_count()} simulated {jax.devices()[0].platform} "
          f"devices on {os.cpu_count()} cores; matmul roof {roof / 1e9:.1f} GFLOP/s wall, "
          f"{cpu_roof / 1e9:.1f} per CPU-second")
    print(f"{'length':>8} {'path':>6} {'sp':>3} {'peak MiB/dev':>13} {'x sp':>7} {'plan MiB':>9} "
          f"{'fits':>5} {'tok/s':>9} {'roof tok/s':>10} {'share':>6} {'cpu share':>9} {'mem/dense':>9} "
          f"{'speed/dense':>11} {'cpu':>5}")
    base = {}
    for r in rows:
        if r["path"] == "ring" and r["sp"] == 1:
            base[r["length"]] = r["peak"]
        roof_tps = roof / prefill_flops_per_token(r["length"])
        r["roof_tps"] = roof_tps
        r["share"] = r["tps"] / roof_tps if r["tps"] else None
        r["cpu_share"] = r["cpu_tps"] * prefill_flops_per_token(r["length"]) / cpu_roof if r["cpu_tps"] else None
        scaled = r["peak"] * r["sp"] / base[r["length"]] if r["length"] in base else None
        r["peak_x_sp_over_sp1"] = scaled
        print(f"{r['length']:>8} {r['path']:>6} {r['sp']:>3} {r['peak'] / MIB:>13.1f} "
              f"{scaled if scaled is not None else float('nan'):>7.2f} "
              f"{(r['plan'] or 0) / MIB if r['plan'] else float('nan'):>9.1f} {str(r['fits']):>5} "
              f"{r['tps'] if r['tps'] else float('nan'):>9.0f} {roof_tps:>10.0f} "
              f"{r['share'] or float('nan'):>6.2f} {r['cpu_share'] or float('nan'):>9.2f} "
              f"{r.get('mem_ratio_vs_dense', float('nan')):>9.3f} {r.get('speed_ratio_vs_dense', float('nan')):>11.2f}"
              f" {r.get('cpu_speed_ratio_vs_dense', float('nan')):>5.2f}")
    largest = {sp: max((r["length"] for r in rows if r["path"] == "ring" and r["sp"] == sp and r["fits"]),
                       default=0) for sp in (1, 2, 4, 8)}
    print("largest length that fits per sp:", largest)
    print(json.dumps(dict(bench="ring", device=f"{jax.device_count()}x{jax.devices()[0].device_kind}",
                          cores=os.cpu_count(), git=roofline.git_sha(), budget_bytes=budget,
                          matmul_roof_flops=roof, matmul_roof_flops_per_cpu_s=cpu_roof,
                          memory_bandwidth_Bps=bandwidth,
                          config=dict(hidden=CFG.hidden_size, layers=CFG.num_hidden_layers,
                                      heads=CFG.num_attention_heads, tiles="attention.choose_tiles per shape"),
                          largest_fitting_length=largest, rows=rows)))
    if args.plot:
        # CPU seconds on a CPU backend (the simulated devices share a loaded host), else wall.
        cpu = jax.devices()[0].platform == "cpu"
        points = []
        for r in rows:
            if not r["tps"]:
                continue
            rate = r["cpu_tps"] if cpu else r["tps"]
            flops = prefill_flops_per_token(r["length"]) * r["length"]
            moved = 2 * 2 * CFG.num_hidden_layers * r["length"] * CFG.hidden_size * 4 + weight_bytes()
            kind = "single device" if r["path"] == "dense" else f"ring sp={r['sp']}"
            points.append(dict(kind=kind, label=f"{r['length'] // 1024}K", intensity=flops / moved,
                               flops_per_s=flops * rate / r["length"]))
        roofline.plot_roofline(args.plot, points, peak_flops=cpu_roof if cpu else roof,
                               bandwidth=cpu_bandwidth if cpu else bandwidth,
                               title=f"RingAttention prefill, hidden {CFG.hidden_size} x {CFG.num_hidden_layers}, "
                                     f"fp32, {jax.device_count()} simulated devices on {os.cpu_count()} cores, "
                                     f"{roofline.git_sha()}: " + ("FLOPs per CPU-second against roofs measured in CPU seconds"
                                                           if cpu else "wall clock against roofs measured")
                                     + " in the same run; % of the roof under each point")
        print(f"roofline plot written to {args.plot}")


def weight_bytes() -> int:
    h, m = CFG.hidden_size, CFG.intermediate_size
    return 4 * (CFG.num_hidden_layers * (4 * h * h + 3 * h * m) + h * CFG.vocab_size)


if __name__ == "__main__":
    main()
