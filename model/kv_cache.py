"""The preallocated key/value cache.

Layout:

    k, v   L arrays [B, K, S, D]   one per layer: B rows, K kv heads, S slots, D head dim
    valid  [B, S] bool       the slot holds a real token (False: empty or left pad)
    index  [B] int32         next slot each row writes to

One array per layer rather than one stacked [L, ...] array: a step writes each
layer's new slots and then reads that layer, and with separate buffers XLA
does both in place; with a stacked buffer it copies the whole cache per layer.

Head-major (K before S) so that attention batches over (B, K) with the slots
contiguous: no transpose of the cache per step (model/attention.py).

Rows advance independently (each has its own `index`), which is what a batch of
requests of different lengths needs. Attention over the cache is causal by slot:
a query written at slot p sees slots <= p that are valid. Positions for RoPE are
passed separately, so left padding costs slots but not positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lwm_serve.model.config import ModelConfig


@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]


jax.tree_util.register_dataclass(
    KVCache, data_fields=["k", "v", "valid", "index"], meta_fields=[])


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int,
               dtype: jnp.dtype | str | None = None) -> KVCache:
    """An empty cache of `max_length` slots per row, in the compute dtype by default."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch_size, cfg.kv_heads, max_length, cfg.head_dim)
    layers = range(cfg.num_hidden_layers)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in layers),
        v=tuple(jnp.zeros(shape, dtype) for _ in layers),
        valid=jnp.zeros((batch_size, max_length), jnp.bool_),
        index=jnp.zeros((batch_size,), jnp.int32),
    )


def write_slots(cache: KVCache, num_new: int) -> jax.Array:
    """[B, T] slots the next `num_new` tokens of each row go to."""
    return cache.index[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]


def update_layer(k_layer: jax.Array, v_layer: jax.Array, new_k: jax.Array, new_v: jax.Array,
                 slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write one layer's new keys/values at per-row slots.

    The write is a scatter of D-vectors into the cache viewed as [B*K*S, D]:
    XLA keeps that in place, whereas a batch-1 `dynamic_update_slice` or
    a (rows, :, slots) scatter made it copy the layer (25x slower decode).

    Args:
      k_layer, v_layer: [B, K, S, D] (head-major cache); new_k, new_v: [R, T, K, D]
        (fresh projections of the cache's first R <= B rows: a decode step over
        the occupied prefix of an engine's slot pool); slots: [R, T] (slots
        outside [0, S) are dropped).
    """
    b, kh, s, d = k_layer.shape
    r, t = slots.shape
    in_range = (slots >= 0) & (slots < s)                                         # [R, T]
    rows = (jnp.arange(r)[:, None, None] * kh + jnp.arange(kh)[None, :, None]) * s
    index = jnp.where(in_range[:, None, :], rows + slots[:, None, :], b * kh * s)  # [R, K, T]
    index = index.reshape(-1)

    def write(cache: jax.Array, new: jax.Array) -> jax.Array:
        vectors = jnp.swapaxes(new, 1, 2).reshape(r * kh * t, d).astype(cache.dtype)
        flat = cache.reshape(b * kh * s, d).at[index].set(vectors, mode="drop")
        return flat.reshape(b, kh, s, d)

    return write(k_layer, new_k), write(v_layer, new_v)
