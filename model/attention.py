"""All attention math: masks, blockwise attention with online softmax, merging.

Every attention path (dense prefill, cached decode, RingAttention, the
sequence-sharded decode) computes *partial* results over a block of keys,

    out = sum_k exp(s_k - m) v_k,   m = max_k s_k,   l = sum_k exp(s_k - m),

and combines blocks with `merge`; `finalize` divides by `l`. One block over all
keys is plain softmax attention. Scores are fp32; masked scores are set to
`finfo(float32).min` (not -inf) as the reference does, so a query whose keys are
all masked gets a uniform softmax instead of NaN.

Shapes: q [B, T, N, D]; k, v [B, S, K, D] with N = K * G (grouped-query
attention when G > 1); masks [B, T, S] bool (True = may attend).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


class Partial(NamedTuple):
    """Unnormalised attention over one block of keys."""

    out: jax.Array  # [B, T, N, D] fp32, sum_k exp(s_k - m) v_k
    max: jax.Array  # [B, T, N] fp32
    sum: jax.Array  # [B, T, N] fp32


def causal_mask(q_index: jax.Array, k_index: jax.Array) -> jax.Array:
    """[B, T, S]: key position <= query position. Indices are [B, T] and [B, S]."""
    return k_index[:, None, :] <= q_index[:, :, None]


def segment_mask(q_segment: jax.Array, k_segment: jax.Array) -> jax.Array:
    """[B, T, S]: query and key belong to the same packed segment."""
    return q_segment[:, :, None] == k_segment[:, None, :]


def key_mask(k_valid: jax.Array, num_queries: int) -> jax.Array:
    """[B, T, S] from a per-key validity mask [B, S] (left padding, empty cache slots)."""
    return jnp.broadcast_to(k_valid[:, None, :], (k_valid.shape[0], num_queries, k_valid.shape[1]))


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> Partial:
    """Partial attention of all queries over one block of keys.

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D]; mask: [B, T, S] bool.
    Returns:
      Partial with fp32 accumulators.
    """
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads
    # [B, T, K, G, D]: queries grouped by the key/value head they share.
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, groups, d)
    # [B, K, G, T, S]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    block_max = jnp.max(scores, axis=-1)  # [B, K, G, T]
    weights = jnp.exp(scores - block_max[..., None])
    block_sum = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(jnp.float32))
    to_btn = lambda x: jnp.moveaxis(x, 3, 1).reshape(b, t, n)  # noqa: E731  [B,K,G,T] -> [B,T,N]
    return Partial(out.reshape(b, t, n, d), to_btn(block_max), to_btn(block_sum))


def merge(a: Partial, b: Partial) -> Partial:
    """Combine two partials over disjoint key blocks (the online-softmax step)."""
    new_max = jnp.maximum(a.max, b.max)
    scale_a = jnp.exp(a.max - new_max)
    scale_b = jnp.exp(b.max - new_max)
    return Partial(
        a.out * scale_a[..., None] + b.out * scale_b[..., None],
        new_max,
        a.sum * scale_a + b.sum * scale_b,
    )


def empty_partial(batch: int, queries: int, heads: int, head_dim: int) -> Partial:
    """The identity of `merge`: no keys seen yet."""
    return Partial(
        jnp.zeros((batch, queries, heads, head_dim), jnp.float32),
        jnp.full((batch, queries, heads), -jnp.inf, jnp.float32),
        jnp.zeros((batch, queries, heads), jnp.float32),
    )


def finalize(p: Partial, dtype: jnp.dtype) -> jax.Array:
    """Normalise a partial into the attention output [B, T, N, D]."""
    return (p.out / p.sum[..., None]).astype(dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over all keys at once. Returns [B, T, N, D] in q.dtype."""
    return finalize(attend_block(q, k, v, mask), q.dtype)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        key_block: int) -> jax.Array:
    """Same result as `dense_attention`, scanning keys in blocks of `key_block`.

    Keeps the live score tensor at [B, N, T, key_block]: what a long chunked
    prefill needs on one device. S must be a multiple of `key_block`.
    """
    b, t, n, d = q.shape
    s = k.shape[1]
    if s % key_block:
        raise ValueError(f"key length {s} is not a multiple of the key block {key_block}")
    blocks = s // key_block

    def body(acc: Partial, i: jax.Array) -> tuple[Partial, None]:
        start = i * key_block
        kb = jax.lax.dynamic_slice_in_dim(k, start, key_block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, start, key_block, axis=1)
        mb = jax.lax.dynamic_slice_in_dim(mask, start, key_block, axis=2)
        return merge(acc, attend_block(q, kb, vb, mb)), None

    acc, _ = jax.lax.scan(body, empty_partial(b, t, n, d), jnp.arange(blocks))
    return finalize(acc, q.dtype)
