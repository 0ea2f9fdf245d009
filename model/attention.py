"""All attention math: masks, blockwise attention with online softmax, merging.

Every attention path (dense prefill, cached decode, RingAttention, the
sequence-sharded decode) computes *partial* results over a block of keys,

    out = sum_k exp(s_k - m) v_k,   m = max_k s_k,   l = sum_k exp(s_k - m),

and combines blocks with `merge`; `finalize` divides by `l`. One block over all
keys is plain softmax attention. Scores are fp32; masked scores are set to
`finfo(float32).min` (not -inf) as the reference does, so a query whose keys are
all masked gets a uniform softmax instead of NaN.

Shapes: q [B, T, N, D] with N = K * G (grouped-query attention when G > 1);
masks [B, T, S] bool (True = may attend). Keys and values come in two layouts:
token-major [B, S, K, D] (fresh projections) and head-major [B, K, S, D] (the
KV cache). The block kernels take head-major k/v: the score and value matmuls
then batch over (B, K) with S and D contiguous, which XLA runs without
transposing the cache (5-11x faster decode attention on CPU than token-major).
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


def head_major(x: jax.Array) -> jax.Array:
    """[B, S, K, D] (token-major) <-> [B, K, S, D] (head-major)."""
    return jnp.swapaxes(x, 1, 2)


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> Partial:
    """Partial attention of all queries over one block of keys.

    Args:
      q: [B, T, N, D]; k, v: [B, K, S, D] (head-major); mask: [B, T, S] bool.
    Returns:
      Partial with fp32 accumulators.
    """
    b, t, n, d = q.shape
    kv_heads = k.shape[1]
    groups = n // kv_heads
    # [B, K, G*T, D]: queries grouped by the key/value head they share.
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(b, kv_heads, groups * t, d)
    # [B, K, G*T, S]
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    scores = scores.reshape(b, kv_heads, groups, t, -1)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    block_max = jnp.max(scores, axis=-1)  # [B, K, G, T]
    weights = jnp.exp(scores - block_max[..., None])
    block_sum = jnp.sum(weights, axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", weights.reshape(b, kv_heads, groups * t, -1), v.astype(jnp.float32))
    out = out.reshape(b, kv_heads, groups, t, d).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, D]
    to_btn = lambda x: jnp.moveaxis(x, 3, 1).reshape(b, t, n)  # noqa: E731  [B,K,G,T] -> [B,T,N]
    return Partial(out.reshape(b, t, n, d), to_btn(block_max), to_btn(block_sum))


def merge(a: Partial, b: Partial) -> Partial:
    """Combine two partials over disjoint key blocks (the online-softmax step).

    Also correct for partials that saw no key at all (max = -inf, which block
    skipping leaves behind): the shared max is then taken as 0 so that
    exp(-inf - max) = 0 instead of exp(-inf + inf) = NaN.
    """
    new_max = jnp.maximum(a.max, b.max)
    safe = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
    scale_a = jnp.exp(a.max - safe)
    scale_b = jnp.exp(b.max - safe)
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
    """Softmax attention over all keys at once; k, v token-major [B, S, K, D].
    Returns [B, T, N, D] in q.dtype."""
    return finalize(attend_block(q, head_major(k), head_major(v), mask), q.dtype)


# --------------------------------------------------------------------------- sequence-parallel helpers
# Added for RingAttention and the sequence-sharded cache (model/ring_attention.py owns
# the shard_map / ppermute schedule; the math it runs is here).


def combine_across(p: Partial, axis_name: str) -> Partial:
    """Exact merge of the partials held by every device of `axis_name` (inside shard_map).

    The pmax/psum form of `merge`: m = max_i m_i, out = sum_i out_i exp(m_i - m),
    l = sum_i l_i exp(m_i - m); devices that saw no key (m_i = -inf) add nothing.
    """
    glob_max = jax.lax.pmax(p.max, axis_name)
    safe = jnp.where(jnp.isneginf(glob_max), 0.0, glob_max)
    scale = jnp.exp(p.max - safe)
    return Partial(jax.lax.psum(p.out * scale[..., None], axis_name), glob_max,
                   jax.lax.psum(p.sum * scale, axis_name))


def finalize_or_zero(p: Partial, dtype: jnp.dtype) -> jax.Array:
    """`finalize`, with 0 for queries that saw no valid key (their blocks were skipped).

    Dense attention gives such a query (left padding) a uniform average over all
    keys; both are meaningless and never read, but 0 keeps NaN out of the cache.
    """
    empty = p.sum == 0
    out = p.out / jnp.where(empty, 1.0, p.sum)[..., None]
    return jnp.where(empty[..., None], 0.0, out).astype(dtype)


def index_mask(q_index: jax.Array, k_index: jax.Array, k_valid: jax.Array,
               q_segment: jax.Array | None = None, k_segment: jax.Array | None = None) -> jax.Array:
    """[B, T, S] attend-mask from per-token indices: causal by index, valid keys, same segment.

    Args:
      q_index: [B, T] global position (or cache slot) of each query.
      k_index: [B, S] global position (or slot) of each key.
      k_valid: [B, S] bool, the key is a real token.
      q_segment, k_segment: optional [B, T] / [B, S] packed-segment ids.
    """
    mask = causal_mask(q_index, k_index) & k_valid[:, None, :]
    if q_segment is not None and k_segment is not None:
        mask &= segment_mask(q_segment, k_segment)
    return mask


def _pad_axis1(x: jax.Array | None, length: int, value) -> jax.Array | None:
    if x is None or x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def blockwise_partial(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                      k_index: jax.Array, k_valid: jax.Array, *, q_block: int, k_block: int,
                      q_segment: jax.Array | None = None,
                      k_segment: jax.Array | None = None) -> Partial:
    """Partial attention of q over k/v in (q_block x k_block) tiles, masks built per tile.

    No [B, T, S] mask or score tensor is ever materialised: the live scores are
    [B, N, q_block, k_block]. Tiles whose mask is all False (the causal upper
    triangle, left padding, empty cache slots) are skipped with `lax.cond`. Lengths
    that are not multiples of the blocks are padded with masked entries.

    Args:
      q: [B, T, N, D]; k, v: [B, K, S, D] (head-major).
      q_index, k_index, k_valid, q_segment, k_segment: as in `index_mask`.
    Returns:
      Partial over all keys, [B, T, ...]; max = -inf where every tile was skipped.
    """
    b, t, n, d = q.shape
    s = k.shape[2]
    q_block, k_block = max(1, min(q_block, t)), max(1, min(k_block, s))
    tp = -(-t // q_block) * q_block
    sp_ = -(-s // k_block) * k_block
    q, q_index, q_segment = _pad_axis1(q, tp, 0), _pad_axis1(q_index, tp, -1), _pad_axis1(q_segment, tp, -1)
    k, v = head_major(_pad_axis1(head_major(k), sp_, 0)), head_major(_pad_axis1(head_major(v), sp_, 0))
    k_index, k_valid = _pad_axis1(k_index, sp_, 0), _pad_axis1(k_valid, sp_, False)
    k_segment = _pad_axis1(k_segment, sp_, -2)
    nq, nk = tp // q_block, sp_ // k_block
    use_segments = q_segment is not None and k_segment is not None

    def blocks(x: jax.Array | None, size: int, count: int) -> jax.Array | None:
        # [B, count*size, ...] -> [count, B, size, ...]
        if x is None:
            return None
        return jnp.moveaxis(x.reshape(x.shape[0], count, size, *x.shape[2:]), 1, 0)

    def kv_blocks(x: jax.Array) -> jax.Array:
        # [B, K, nk*k_block, D] -> [nk, B, K, k_block, D]
        return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1], nk, k_block, x.shape[3]), 2, 0)

    kb = (kv_blocks(k), kv_blocks(v), blocks(k_index, k_block, nk),
          blocks(k_valid, k_block, nk), blocks(k_segment, k_block, nk) if use_segments else None)

    def one_query_block(xs: tuple) -> Partial:
        qc, qi, qs = xs

        def body(acc: Partial, ks: tuple) -> tuple[Partial, None]:
            kc, vc, ki, kv, kseg = ks
            mask = index_mask(qi, ki, kv, qs if use_segments else None, kseg)
            acc = jax.lax.cond(jnp.any(mask), lambda a: merge(a, attend_block(qc, kc, vc, mask)),
                               lambda a: a, acc)
            return acc, None

        acc, _ = jax.lax.scan(body, empty_partial(b, q_block, n, d), kb)
        return acc

    qs_blocks = blocks(q_segment, q_block, nq) if use_segments else jnp.zeros((nq,), jnp.int32)
    per_block = jax.lax.map(one_query_block,
                            (blocks(q, q_block, nq), blocks(q_index, q_block, nq), qs_blocks))
    # [nq, B, q_block, ...] -> [B, T, ...]
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, tp, *x.shape[3:])[:, :t]  # noqa: E731
    return Partial(unblock(per_block.out), unblock(per_block.max), unblock(per_block.sum))
