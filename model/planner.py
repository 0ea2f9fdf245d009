"""Capacity planner: per-device memory of a model on a mesh, by arithmetic alone.

`lwm-serve plan --model 7b --mesh 1,1,4,64 --dtype bf16 --context 1048576`
prints, per device: parameters, KV cache, the peak transient memory of a
prefill chunk, their total against the device's memory, and a mesh that fits.
The server calls `check_fits` at start and refuses a max context that cannot
fit (`CapacityError`).

The figures follow the placement of model/sharding.py exactly (the same
`spec_for` rules, so a dimension that does not divide its mesh axes counts as
replicated): parameter and cache bytes are what `shard_params` and
`init_sharded_cache` allocate per device (tests/model/test_planner.py checks
this against real arrays). The prefill figure is an estimate: the sum of one
layer's transients in model/ring_attention.py's prefill (local chunk
activations, the ring's visiting key/value block, fp32 accumulators, the
travelling query block and accumulator of the chunk-vs-cache step, the score
tiles, the MLP intermediate, one layer's all-gathered (FSDP) weights with
prefetch, the last-position logits); bench/ring.py compares it with XLA's
compiled memory analysis.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import re
from typing import Sequence

from lwm_serve.model import config as config_lib
from lwm_serve.model import params as params_lib
from lwm_serve.model import sharding
from lwm_serve.model.config import ModelConfig

logger = logging.getLogger(__name__)

GIB = 1024 ** 3
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "f16": "float16",
                 "float16": "float16", "fp32": "float32", "f32": "float32", "float32": "float32"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Memory of well-known accelerators (per device), for --device-memory names.
DEVICE_MEMORY = {"tpu-v4": 32 * GIB, "tpu-v5e": 16 * GIB, "tpu-v5p": 95 * GIB,
                 "a100-40g": 40 * GIB, "a100-80g": 80 * GIB, "h100": 80 * GIB, "h200": 141 * GIB}
# Part of device memory kept free for the runtime, compiled code and fragmentation.
RESERVE_FRACTION = 0.05


class CapacityError(ValueError):
    """The requested context (or batch) does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Axis sizes of a mesh (no devices needed: the planner is arithmetic)."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    sp: int = 1

    @property
    def shape(self) -> dict[str, int]:  # what sharding.spec_for reads from a Mesh
        return dict(zip(sharding.MESH_AXES, (self.dp, self.fsdp, self.tp, self.sp)))

    @property
    def size(self) -> int:
        return self.dp * self.fsdp * self.tp * self.sp

    def __str__(self) -> str:
        return f"{self.dp},{self.fsdp},{self.tp},{self.sp}"

    @classmethod
    def parse(cls, spec: str, device_count: int | None = None) -> "MeshShape":
        """"1,1,4,64" (or "!..."/named form); -1 needs `device_count`."""
        text = spec.strip().lstrip("!")
        if device_count is None:
            if "-1" in re.split(r"[,:]", text):
                raise CapacityError(f"mesh {spec!r} has a -1 axis: give the device count")
            device_count = math.prod(int(p.split(":")[-1]) for p in text.split(","))
        from lwm_serve.model.mesh import parse_mesh_dim  # jax-free parse, shared rules
        dims, _ = parse_mesh_dim(spec, device_count)
        return cls(*dims)

    @classmethod
    def of(cls, mesh) -> "MeshShape":
        return cls(*(mesh.shape[a] for a in sharding.MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one (model, mesh, dtype, context, batch, chunk)."""

    mesh: MeshShape
    dtype: str
    context: int
    batch: int
    prefill_chunk: int
    params_bytes: int
    kv_cache_bytes: int
    prefill_bytes: int
    device_memory: int
    problems: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.kv_cache_bytes + self.prefill_bytes

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory * (1 - RESERVE_FRACTION))

    @property
    def fits(self) -> bool:
        return not self.problems and self.total_bytes <= self.usable_bytes

    def as_dict(self) -> dict:
        return dict(mesh=str(self.mesh), dtype=self.dtype, context=self.context, batch=self.batch,
                    prefill_chunk=self.prefill_chunk, params_bytes=self.params_bytes,
                    kv_cache_bytes=self.kv_cache_bytes, prefill_bytes=self.prefill_bytes,
                    total_bytes=self.total_bytes, device_memory=self.device_memory,
                    fits=self.fits, problems=list(self.problems))


def _dtype(name: str) -> str:
    if name not in DTYPE_ALIASES:
        raise CapacityError(f"unknown dtype {name!r}; choose one of {sorted(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[name]


def _local(shape: Sequence[int], logical: Sequence[str | None], mesh: MeshShape) -> list[int]:
    """Per-device shape under sharding.spec_for (non-dividing dims are replicated)."""
    spec = sharding.spec_for(logical, shape, mesh)  # type: ignore[arg-type]
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for size, entry in zip(shape, entries):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        out.append(size // math.prod(mesh.shape[a] for a in axes))
    return out


def param_bytes_per_device(cfg: ModelConfig, mesh: MeshShape, dtype: str) -> tuple[int, list[str]]:
    """Bytes of the parameters on the busiest device, and the ones that do not divide."""
    total, problems = 0, []
    for path, info in params_lib.param_infos(cfg).items():
        try:
            sharding.spec_for(info.axes, info.shape, mesh, strict=True)  # type: ignore[arg-type]
        except sharding.ShardingError as e:
            problems.append(f"{'/'.join(path)} {info.shape}: {e}")
        total += math.prod(_local(info.shape, info.axes, mesh)) * DTYPE_BYTES[dtype]
    return total, problems


def cache_length(context: int, mesh: MeshShape) -> int:
    """Slots the sharded cache allocates for `context` (a multiple of sp)."""
    return -(-context // mesh.sp) * mesh.sp


def kv_cache_bytes_per_device(cfg: ModelConfig, mesh: MeshShape, dtype: str, context: int,
                              batch: int) -> int:
    """k + v (L arrays [B, K, S, D]) plus valid [B, S] and index [B] on one device."""
    s = cache_length(context, mesh)
    kv_shape = (batch, cfg.kv_heads, s, cfg.head_dim)
    kv = 2 * cfg.num_hidden_layers * math.prod(_local(kv_shape, sharding.CACHE_KV, mesh)) * DTYPE_BYTES[dtype]
    valid = math.prod(_local((batch, s), sharding.CACHE_VALID, mesh))
    index = math.prod(_local((batch,), sharding.CACHE_INDEX, mesh)) * 4
    return kv + valid + index


def prefill_bytes_per_device(cfg: ModelConfig, mesh: MeshShape, dtype: str, batch: int,
                             chunk: int) -> int:
    """Estimated peak transient bytes of one prefill chunk (see the module docstring)."""
    isz, f32 = DTYPE_BYTES[dtype], 4
    b = _local((batch,), (sharding.BATCH,), mesh)[0]
    c_local = -(-chunk // mesh.sp)
    h, d = cfg.hidden_size, cfg.head_dim
    heads_split = mesh.tp if cfg.kv_heads % mesh.tp == 0 else 1
    n, k = cfg.num_attention_heads // heads_split, cfg.kv_heads // heads_split
    m = _local((cfg.intermediate_size,), (sharding.MLP,), mesh)[0]
    qb = min(cfg.scan_query_chunk_size, c_local)
    kb = cfg.scan_key_chunk_size
    terms = {
        "residual, norm, attention out": 3 * b * c_local * h * isz,
        "q, k, v": b * c_local * (n + 2 * k) * d * isz,
        "ring: visiting k/v (double-buffered)": 2 * 2 * b * c_local * k * d * isz,
        "ring: fp32 accumulators": 2 * b * c_local * n * (d + 2) * f32,
        "cache step: travelling q block + fp32 accumulator (x2 in flight)":
            2 * b * c_local * n * (d * isz + (d + 2) * f32),
        "score tiles": 3 * b * n * qb * kb * f32,
        "mlp": 3 * b * c_local * m * isz,
        "rope": b * c_local * d * f32,
    }
    gathered = 0
    for info in params_lib.layer_param_infos(cfg).values():
        # FSDP gathers the hidden (embed) dimension before use; the rest stays split.
        kept = [a if a != sharding.EMBED else None for a in info.axes]
        gathered += math.prod(_local(info.shape, kept, mesh)) * isz
    terms["one layer's gathered weights (x2 prefetch)"] = 2 * gathered
    vocab = cfg.vocab_size + cfg.vision_vocab_size
    terms["last-position logits"] = b * vocab * f32
    return int(sum(terms.values()))


def plan(cfg: ModelConfig, mesh: MeshShape, *, dtype: str = "bfloat16", context: int,
         batch: int = 1, prefill_chunk: int = 2048, device_memory: int = 32 * GIB) -> Plan:
    """Per-device memory of serving `cfg` with `context` tokens per row on `mesh`."""
    dtype = _dtype(dtype)
    pcfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params_b, problems = param_bytes_per_device(pcfg, mesh, dtype)
    chunk = min(prefill_chunk, context)
    return Plan(mesh=mesh, dtype=dtype, context=context, batch=batch, prefill_chunk=chunk,
                params_bytes=params_b,
                kv_cache_bytes=kv_cache_bytes_per_device(pcfg, mesh, dtype, context, batch),
                prefill_bytes=prefill_bytes_per_device(pcfg, mesh, dtype, batch, chunk),
                device_memory=device_memory, problems=tuple(problems))


def candidate_meshes(device_count: int) -> list[MeshShape]:
    """Every (dp, fsdp, tp, sp) whose product is `device_count`."""
    divisors = [d for d in range(1, device_count + 1) if device_count % d == 0]
    out = []
    for dp, fsdp, tp in itertools.product(divisors, repeat=3):
        rest = dp * fsdp * tp
        if device_count % rest == 0:
            out.append(MeshShape(dp, fsdp, tp, device_count // rest))
    return out


def suggest_meshes(cfg: ModelConfig, device_count: int, *, dtype: str = "bfloat16", context: int,
                   batch: int = 1, prefill_chunk: int = 2048, device_memory: int = 32 * GIB,
                   limit: int = 3) -> list[Plan]:
    """Fitting meshes for `device_count` devices, best first.

    Best = the smallest dp (dp replicates the weights), then the smallest tp (tp
    all-reduces activations in every layer, while the sp ring overlaps its
    transfers with compute), then the least memory per device.
    """
    plans = [plan(cfg, m, dtype=dtype, context=context, batch=batch, prefill_chunk=prefill_chunk,
                  device_memory=device_memory) for m in candidate_meshes(device_count)]
    fitting = [p for p in plans if p.fits]
    fitting.sort(key=lambda p: (p.mesh.dp, p.mesh.tp, p.total_bytes))
    return fitting[:limit]


def check_fits(cfg: ModelConfig, mesh: MeshShape, *, dtype: str | None = None, context: int,
               batch: int = 1, prefill_chunk: int = 2048,
               device_memory: int | None = None) -> Plan:
    """The plan, or CapacityError saying why it does not fit and which mesh would.

    `device_memory` None: asked from the first local device (`memory_stats`),
    else 32 GiB (a TPU v4 chip, the paper's hardware).
    """
    dtype = dtype or cfg.dtype
    if device_memory is None:
        device_memory = detect_device_memory() or 32 * GIB
    p = plan(cfg, mesh, dtype=dtype, context=context, batch=batch, prefill_chunk=prefill_chunk,
             device_memory=device_memory)
    if p.fits:
        return p
    why = ("; ".join(p.problems) if p.problems else
           f"needs {_fmt(p.total_bytes)} per device (params {_fmt(p.params_bytes)}, KV cache "
           f"{_fmt(p.kv_cache_bytes)}, prefill {_fmt(p.prefill_bytes)}) but only "
           f"{_fmt(p.usable_bytes)} of {_fmt(device_memory)} is usable")
    better = suggest_meshes(cfg, mesh.size, dtype=dtype, context=context, batch=batch,
                            prefill_chunk=prefill_chunk, device_memory=device_memory, limit=1)
    hint = (f"; mesh {better[0].mesh} fits on the same {mesh.size} devices" if better else
            f"; no mesh of {mesh.size} devices fits: use more devices, a shorter context "
            f"or a smaller batch")
    raise CapacityError(f"context {context} x batch {batch} does not fit mesh {mesh} "
                        f"({p.dtype}): {why}{hint}")


def detect_device_memory() -> int | None:
    """Memory of the first local device when the runtime reports it (TPU/GPU; not CPU)."""
    try:
        import jax
        stats = jax.local_devices()[0].memory_stats() or {}
        return int(stats["bytes_limit"]) if "bytes_limit" in stats else None
    except Exception:  # noqa: BLE001 (no backend, no stats: fall back to a default)
        return None


def parse_bytes(text: str) -> int:
    """"32GiB", "80GB", "16g", "1.5TiB", a device name (tpu-v4, h100), or plain bytes."""
    t = text.strip().lower()
    if t in DEVICE_MEMORY:
        return DEVICE_MEMORY[t]
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(i?b?)", t)
    if not m:
        raise CapacityError(f"cannot read a memory size from {text!r} (e.g. 32GiB, 80GB)")
    value, unit, suffix = float(m.group(1)), m.group(2), m.group(3)
    base = 1000 if suffix == "b" else 1024
    return int(value * base ** " kmgt".index(unit or " "))


def _fmt(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024 ** 2:.1f} MiB"


def _load_model(name: str) -> ModelConfig:
    if os.path.exists(name):
        return config_lib.from_reference_json(name)
    try:
        return config_lib.from_preset(name)
    except ValueError as e:
        raise CapacityError(str(e)) from None


def format_plan(cfg_name: str, p: Plan, suggestions: Sequence[Plan]) -> str:
    rows = [("parameters", p.params_bytes), ("KV cache", p.kv_cache_bytes),
            ("prefill peak (estimate)", p.prefill_bytes), ("total", p.total_bytes),
            (f"usable ({100 - RESERVE_FRACTION * 100:.0f}% of device)", p.usable_bytes)]
    lines = [f"model {cfg_name}, mesh dp,fsdp,tp,sp = {p.mesh} ({p.mesh.size} devices), {p.dtype}, "
             f"context {p.context}, batch {p.batch}, prefill chunk {p.prefill_chunk}",
             f"{'per device':<28}{'bytes':>18}{'':>4}{'human':>12}"]
    lines += [f"{name:<28}{value:>18,}{'':>4}{_fmt(value):>12}" for name, value in rows]
    lines.append(f"fits: {'yes' if p.fits else 'NO'}")
    lines += [f"  problem: {x}" for x in p.problems]
    if suggestions:
        lines.append(f"meshes that fit on {p.mesh.size} devices (best first):")
        lines += [f"  {s.mesh}: {_fmt(s.total_bytes)} per device" for s in suggestions]
    elif not p.fits:
        lines.append(f"no mesh of {p.mesh.size} devices fits; try more devices or a shorter context")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`lwm-serve plan ...`: print the table; exit status 0 if it fits, 1 if not."""
    ap = argparse.ArgumentParser(prog="lwm-serve plan",
                                 description="Per-device memory of an LWM model on a mesh.")
    ap.add_argument("--model", default="7b-1m", help="preset name or a reference config.json")
    ap.add_argument("--mesh", default="1,1,1,-1", help="dp,fsdp,tp,sp (one may be -1)")
    ap.add_argument("--devices", type=int, default=None,
                    help="device count (needed for a -1 axis; default: the mesh's product)")
    ap.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    ap.add_argument("--context", type=int, required=True, help="tokens per row (prompt + output)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--device-memory", default=None,
                    help="per-device memory: 32GiB, 80GB, or tpu-v4/h100/...; default: detect, else 32GiB")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args(argv)
    try:
        cfg = _load_model(args.model)
        mesh = MeshShape.parse(args.mesh, args.devices)
        memory = (parse_bytes(args.device_memory) if args.device_memory
                  else detect_device_memory() or 32 * GIB)
        p = plan(cfg, mesh, dtype=args.dtype, context=args.context, batch=args.batch,
                 prefill_chunk=args.prefill_chunk, device_memory=memory)
        suggestions = suggest_meshes(cfg, mesh.size, dtype=args.dtype, context=args.context,
                                     batch=args.batch, prefill_chunk=args.prefill_chunk,
                                     device_memory=memory)
    except (CapacityError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(format_plan(args.model, p, suggestions))
    if args.json:
        print(json.dumps({**p.as_dict(), "suggestions": [str(s.mesh) for s in suggestions]}))
    return 0 if p.fits else 1
