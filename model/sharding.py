"""Logical axes -> mesh axes: the ONLY module that names the mesh axes.

Model code names the dimensions of its arrays with logical names (`batch`,
`length`, `heads`, ...); `RULES` maps each to mesh axes. Changing a
parallelism strategy means changing a rule here, never a layer (maxtext's
`logical_axis_rules`, jax-llm-examples' `ShardingRules`).

Parameters follow the reference's `get_partition_rules` (lwm/vision_llama.py)
for all three layouts: the hidden dimension of every matrix over
('fsdp', 'sp') (ZeRO-3 style: gathered when used), heads / MLP / vocabulary over
'tp', norms replicated, the stacked layer axis unsharded. Activations: batch
over ('dp', 'fsdp'), sequence over 'sp', heads over 'tp'. The KV cache (one
head-major [B, K, S, D] array per layer, model/kv_cache.py) has the same
batch/heads/sequence placement, so it stays sequence-sharded from prefill
through decode (its slot layout is striped, see model/ring_attention.py).

The logical names live in model/logical_axes.py and each parameter's axes in
its declaration (model/params.py); this module only places them.

Parameters must divide their mesh axes exactly (checked by `validate`, before
anything is traced). Activations may not (a batch of 1 on dp=2, one decode
token on sp=8): `spec_for` then leaves that dimension unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lwm_serve.model import logical_axes as ax
from lwm_serve.model import params as params_lib
from lwm_serve.model.config import ModelConfig

logger = logging.getLogger(__name__)

# The mesh axes, in the order of the reference's mesh_dim.
DP, FSDP, TP, SP = "dp", "fsdp", "tp", "sp"
MESH_AXES = (DP, FSDP, TP, SP)

# Logical dimension names used by model code (declared in logical_axes.py;
# re-exported so that model code can say `sharding.BATCH`).
BATCH, LENGTH, CACHE_LENGTH = ax.BATCH, ax.LENGTH, ax.CACHE_LENGTH
HEADS, KV_HEADS, HEAD_DIM = ax.HEADS, ax.KV_HEADS, ax.HEAD_DIM
ACT_EMBED, EMBED, MLP, VOCAB, LAYERS, NORM = (
    ax.ACT_EMBED, ax.EMBED, ax.MLP, ax.VOCAB, ax.LAYERS, ax.NORM)

Axes = str | tuple[str, ...] | None
RULES: dict[str, Axes] = {
    BATCH: (DP, FSDP),
    LENGTH: SP,
    CACHE_LENGTH: SP,
    HEADS: TP,
    KV_HEADS: TP,
    HEAD_DIM: None,
    ACT_EMBED: None,
    EMBED: (FSDP, SP),
    MLP: TP,
    VOCAB: TP,
    LAYERS: None,
    NORM: None,
}

# Named axes of the sequence-parallel kernels (ring_attention.py uses these names,
# never the strings).
SEQUENCE_AXIS = RULES[LENGTH]
assert isinstance(SEQUENCE_AXIS, str)

# Logical axes of the arrays the model passes around.
ACTIVATION = (BATCH, LENGTH, ACT_EMBED)                  # [B, T, H]
QUERY = (BATCH, LENGTH, HEADS, HEAD_DIM)                 # [B, T, N, D]
KEY_VALUE = (BATCH, LENGTH, KV_HEADS, HEAD_DIM)          # [B, T, K, D]
TOKENS = (BATCH, LENGTH)                                 # [B, T]
CACHE_KV = (BATCH, KV_HEADS, CACHE_LENGTH, HEAD_DIM)      # [B, K, S, D], one array per layer
CACHE_VALID = (BATCH, CACHE_LENGTH)                      # [B, S]
CACHE_INDEX = (BATCH,)                                   # [B]

assert set(RULES) == set(ax.ALL), "every logical axis needs a rule"


class ShardingError(ValueError):
    """A model/mesh combination that cannot be sharded (sizes not divisible)."""


def _mesh_axes(logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in RULES:
        raise ShardingError(f"unknown logical axis {logical!r}; known: {sorted(RULES)}")
    rule = RULES[logical]
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def axis_size(mesh: Mesh, logical: str | None) -> int:
    """How many devices a logical dimension is split over on this mesh."""
    return math.prod(mesh.shape[a] for a in _mesh_axes(logical))


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None, *, strict: bool = False) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical names.

    Args:
      logical_axes: one logical name (or None) per dimension.
      shape, mesh: when both are given, a dimension that does not divide its mesh
        axes is left unsharded (or, with `strict`, raises ShardingError).
    Raises:
      ShardingError: a mesh axis used by two dimensions, or (strict) a size that
        does not divide.
    """
    entries: list[Axes] = []
    used: set[str] = set()
    for i, logical in enumerate(logical_axes):
        axes = _mesh_axes(logical)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                if strict:
                    raise ShardingError(
                        f"dimension {i} ({logical}) of size {shape[i]} is not divisible by "
                        f"mesh axes {axes} of total size {size}")
                axes = ()
        clash = used.intersection(axes)
        if clash:
            raise ShardingError(f"mesh axes {sorted(clash)} used by two dimensions of {logical_axes}")
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def named(mesh: Mesh, logical_axes: Sequence[str | None],
          shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes, shape, mesh))


# --------------------------------------------------------------------------- parameters


def _strip_params_prefix(path: Sequence[str]) -> params_lib.Path:
    path = tuple(str(p) for p in path)
    return path[1:] if path and path[0] == "params" else path


def param_logical_axes(cfg: ModelConfig, path: Sequence[str]) -> tuple[str, ...]:
    """Logical axes of one parameter (reference tree path, with or without "params";
    either layer layout)."""
    key = _strip_params_prefix(path)
    info = params_lib.param_info(cfg, key)
    if info is None:
        raise ShardingError(f"no sharding rule for parameter {'/'.join(key)}")
    return info.axes


def param_specs(cfg: ModelConfig, mesh: Mesh, *, scan_layers: bool | None = None
                ) -> dict[params_lib.Path, PartitionSpec]:
    """PartitionSpec of every parameter of `cfg` (paths as in `params.param_infos`).

    Raises:
      ShardingError: listing every parameter whose size does not divide its axes.
    """
    specs, problems = {}, []
    for path, info in params_lib.param_infos(cfg, scan_layers=scan_layers).items():
        try:
            specs[path] = spec_for(info.axes, info.shape, mesh, strict=True)
        except ShardingError as e:
            problems.append(f"{'/'.join(path)} {info.shape}: {e}")
    if problems:
        raise ShardingError(
            f"model does not fit mesh {dict(mesh.shape)}:\n  " + "\n  ".join(problems))
    return specs


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Callable[[Sequence[str]], NamedSharding]:
    """`path -> NamedSharding` for the checkpoint loader (validates the whole tree first).

    Paths of either layer layout are answered: a checkpoint file's own records
    say whether it is scanned, whatever `cfg.scan_layers` says.
    """
    specs = {**param_specs(cfg, mesh, scan_layers=not cfg.scan_layers),
             **param_specs(cfg, mesh)}

    def sharding_of(path: Sequence[str]) -> NamedSharding:
        key = _strip_params_prefix(path)
        if key not in specs:
            raise ShardingError(f"no sharding rule for parameter {'/'.join(key)}")
        return NamedSharding(mesh, specs[key])

    return sharding_of


def shard_params(params: params_lib.Params, cfg: ModelConfig, mesh: Mesh) -> params_lib.Params:
    """Place an in-memory parameter tree (either layer layout) on the mesh."""
    sharding_of = param_shardings(cfg, mesh)
    items = {path: jax.device_put(x, sharding_of(path)) for path, x in params_lib.flatten_params(params)}
    return params_lib.unflatten_params(items)


def validate(cfg: ModelConfig, mesh: Mesh) -> None:
    """Fail early, with the reason, on a model/mesh combination that cannot work.

    Parameters must divide their axes. Heads that do not divide 'tp' would be
    replicated in attention, which works but wastes the tp devices: logged.
    """
    param_specs(cfg, mesh)
    missing = [a for a in MESH_AXES if a not in mesh.shape]
    if missing:
        raise ShardingError(f"mesh lacks axes {missing}; build it with model/mesh.py")
    tp = axis_size(mesh, KV_HEADS)
    if cfg.kv_heads % tp:
        logger.warning("%d key/value heads do not divide tp=%d: attention runs unsharded over tp",
                       cfg.kv_heads, tp)


# --------------------------------------------------------------------------- activations


_CURRENT_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("lwm_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Make `constrain` place activations on `mesh` (entered while tracing a sharded step)."""
    token = _CURRENT_MESH.set(mesh)
    try:
        yield
    finally:
        _CURRENT_MESH.reset(token)


def current_mesh() -> Mesh | None:
    return _CURRENT_MESH.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside `use_mesh` (single device)."""
    mesh = _CURRENT_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named(mesh, logical_axes, x.shape))


def cache_shardings(mesh: Mesh, cache: Any) -> Any:
    """A KVCache-shaped tree of NamedShardings for `cache` (arrays or ShapeDtypeStructs)."""
    return type(cache)(
        k=tuple(named(mesh, CACHE_KV, x.shape) for x in cache.k),
        v=tuple(named(mesh, CACHE_KV, x.shape) for x in cache.v),
        valid=named(mesh, CACHE_VALID, cache.valid.shape),
        index=named(mesh, CACHE_INDEX, cache.index.shape),
    )


def cache_length_multiple(mesh: Mesh) -> int:
    """The cache's slot count must be a multiple of this (one equal shard per device)."""
    return axis_size(mesh, CACHE_LENGTH)


def init_sharded_cache(cfg: ModelConfig, batch_size: int, max_length: int, mesh: Mesh,
                       dtype: jnp.dtype | str | None = None):
    """An empty KVCache created directly in its sharded placement.

    `max_length` is rounded up to a multiple of the sequence axis. The slots are
    in the striped layout of model/ring_attention.py (slot s lives on sequence
    shard s % sp): use it only with the mesh-aware steps.
    """
    from lwm_serve.model import kv_cache  # local: kv_cache is below sharding in the stack

    mult = cache_length_multiple(mesh)
    max_length = -(-max_length // mult) * mult
    make = lambda: kv_cache.init_cache(cfg, batch_size, max_length, dtype)  # noqa: E731
    shapes = jax.eval_shape(make)
    return jax.jit(make, out_shardings=cache_shardings(mesh, shapes))()


# --------------------------------------------------------------------------- data parallel


def batch_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A one-axis mesh over `devices` for work that only splits its batch (the VQGAN)."""
    batch_axes = _mesh_axes(BATCH)
    return Mesh(np.array(devices), batch_axes[:1])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays whose leading dimension is the batch, split by the `batch` rule."""
    return named(mesh, (BATCH,))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh` (weights of a data-parallel model)."""
    return NamedSharding(mesh, PartitionSpec())
