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

Where prefill time goes (bench/prefill_profile.py, bench-150m fp32 on the
2-core CPU host, CPU seconds against the matmul roof measured in CPU seconds in
the same run; the host was shared, load 10-14, so wall clocks were useless):

* projections + MLP + head run at the roof (0.86-1.00 of it) for any chunk of
  >= 512 tokens; they are 87% of the time at 512 tokens, 73-76% at 2048.
* attention is the rest and grows linearly per token; its cost per FLOP is
  what decides the long-prompt share. Before this kernel (one `lax.cond` per
  128 x 128 tile over a [nk, B, K, 128, D] copy of the whole cache made per
  layer and chunk, queries transposed per tile) it ran at 0.52 of the roof at
  4K tokens; the tiled kernel below runs at 0.57-0.64 on the same shapes
  (A/B in one process), 0.60 at 2K. What is left is the CPU's elementwise work
  per score (max, exp, sum: one score costs 4 * D = 256 matmul FLOPs at D = 64
  but also an exp), visible in XLA's optimized HLO as passes over each fp32
  score tile around the two dots. A fully visible tile has two (the max; then
  scale, subtract and exp fused): no `select` pass, and the 1/sqrt(D) scaling
  rides in the exp pass (its own pass cost ~8% of the kernel at 8K-16K keys).
  On a host with a high matmul roof (AVX-512: 270-290 GFLOP/s on 2 cores) the
  score and value dots alone reach only ~0.7 of it (a contraction over D = 64,
  or over a 256-key tile) and the whole tile ~0.54.
* layout copies: the optimized HLO of a 512-token step copies/transposes
  ~0.3 GB (the per-layer query and output transposes to and from head-major,
  the k/v transposes of the cache write: O(T * H) each, a few % of the step);
  no copy of the cache is left.
* the host (dispatch between chunk steps) is under 5% of the CPU time.
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


# --------------------------------------------------------------------------- the tiled kernel


def _tile_partial(qt: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array | None) -> Partial:
    """Partial of one (query tile x key tile), all head-major. The one softmax of this module.

    Args:
      qt: [B, K, G, Tq, D]; kt, vt: [B, K, Tk, D]; mask: [B, Tq, Tk] bool, or
        None for a tile known to be fully visible (no select pass over the scores).
    Returns:
      Partial with out [B, K, G, Tq, D] and max/sum [B, K, G, Tq], fp32.
    Inputs keep their dtype and the matmuls accumulate in fp32
    (`preferred_element_type`): a bf16 x bf16 product is exact in fp32, so this
    equals upcasting first, without an fp32 copy of the tiles.
    """
    root_d = jnp.sqrt(jnp.float32(qt.shape[-1]))
    scores = jnp.einsum("bkgqd,bksd->bkgqs", qt, kt, preferred_element_type=jnp.float32)
    if mask is None:
        # Rounding is monotone, so max(s / c) == max(s) / c bit for bit: the max reads
        # the dot's output and the scaling fuses into the exp pass. A separate scaling
        # pass over the score tile cost ~8% of the kernel at 8K-16K keys on CPU.
        block_max = jnp.max(scores, axis=-1) / root_d
        weights = jnp.exp(scores / root_d - block_max[..., None])
    else:
        scores = jnp.where(mask[:, None, None], scores / root_d, MASK_VALUE)
        block_max = jnp.max(scores, axis=-1)
        weights = jnp.exp(scores - block_max[..., None])
    out = jnp.einsum("bkgqs,bksd->bkgqd", weights, vt.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    return Partial(out, block_max, jnp.sum(weights, axis=-1))


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, D] -> [B, K, G, T, D]: queries grouped by the key/value head they share."""
    b, t, n, d = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _token_major(p: Partial) -> Partial:
    """Head-major partial [B, K, G, T, ...] -> the module's [B, T, N, ...] layout."""
    b, kh, g, t = p.max.shape
    return Partial(p.out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, -1),
                   p.max.transpose(0, 3, 1, 2).reshape(b, t, kh * g),
                   p.sum.transpose(0, 3, 1, 2).reshape(b, t, kh * g))


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> Partial:
    """Partial attention of all queries over one block of keys (the plain dot-product path).

    Args:
      q: [B, T, N, D]; k, v: [B, K, S, D] (head-major); mask: [B, T, S] bool.
    Returns:
      Partial with fp32 accumulators.
    """
    return _token_major(_tile_partial(_grouped(q, k.shape[1]), k, v, mask))


class Tiles(NamedTuple):
    q: int  # queries per tile
    k: int  # keys per tile


# Score-tile budget of the CPU path: B * N * q * k fp32 scores in flight per tile.
# Measured on bench-150m (12 heads, D 64, fp32, a quiet 2-core host, wall clock):
# XLA:CPU runs a loop-body fusion on one core unless it is big enough to split,
# so the max / exp / sum passes over a small score tile leave the second core
# idle. A 512-query chunk against 1K-16K cached keys: 512 x 256 tiles (6 MiB of
# scores) ran in 13 / 23 / 88 / 177 ms at 1K / 2K / 8K / 16K keys, against 20 /
# 41 / 164 / 330 ms for the 128 x 256 tiles that CPU-second measurements on a
# shared host had picked (the same CPU seconds, now on both cores); 512 x 512 and
# 256 x 512 were slower again (12 MiB falls out of cache; short query tiles).
_TILE_SCORE_BYTES = 6 << 20
_MAX_Q_TILE = 512
_MAX_TILE = 1024


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def choose_tiles(q_len: int, kv_len: int, *, batch: int, heads: int,
                 cap: Tiles | None = None) -> Tiles:
    """Tile sizes for `blockwise_partial` on this shape.

    The argument (measurements above `_TILE_SCORE_BYTES`):
    * a tile's matmuls (2 * 2 * q * k * D FLOPs per head) must dwarf the fixed
      cost of one loop iteration and of the online-softmax merge (O(q * D)), and
      its elementwise passes must be big enough for XLA to spread over the cores;
    * the fp32 score tile (batch * heads * q * k * 4 bytes) is read and written
      by the max / exp / sum passes: it must stay in cache, so q * k is bounded
      by `_TILE_SCORE_BYTES / (batch * heads * 4)`;
    * within that area, tall tiles (up to 512 queries: a whole prefill chunk)
      measured fastest: each key tile is read once per query tile;
    * causal prefill wastes the masked half of each diagonal tile, q / (2 * q_len)
      of the attention work: 3% for 512-query tiles over an 8K prompt, and for a
      512-token chunk late in a long cache only its own last keys are diagonal;
      where keys are fewer than 4x the queries, the tiles stay short (128 x 256).
    Powers of two, so bucketed lengths (model/steps.py) split into whole tiles
    and only the last tile of an odd length is clamped (see `blockwise_partial`).

    Args:
      q_len, kv_len: queries and keys attended (per device for ring attention).
      batch, heads: the batch and the query heads of the local shard.
      cap: upper bounds (the config's scan_query/key_chunk_size, which the
        planner's memory estimate assumes); None: no cap.
    """
    area = max(1, _TILE_SCORE_BYTES // (4 * max(1, batch) * max(1, heads)))
    qt = max(128, min(_MAX_Q_TILE, _pow2_floor(max(1, q_len)), _pow2_floor(max(1, area // 256))))
    kt = min(_MAX_TILE, max(128, _pow2_floor(max(1, area // qt))))
    if kv_len < 4 * q_len:
        # Mostly diagonal (a short prompt, a first chunk): tall tiles would compute the
        # masked half of most of them. 128 x 256 measured 8% faster on a 512-token prompt.
        qt = min(qt, max(128, _pow2_floor(max(1, q_len // 4))))
        kt = min(kt, 2 * qt)
    if cap is not None:
        qt, kt = min(qt, cap.q), min(kt, cap.k)
    return Tiles(max(1, min(qt, q_len)), max(1, min(kt, kv_len)))


# Key tile of a decode step (one query per row), in bytes of K (or V) per tile.
# A decode step reads the slot pool, whose rows and length exceed what the live
# rows need: XLA:CPU makes a dot over a slice of a big buffer (`cache[:R, :, :L]`)
# copy the slice first, single-threaded and out of cache, which cost 3-4x a dot
# over the whole buffer (bench-150m, fp32, one layer: 4.9-7.3 ms for a 4096-slot
# row against 0.8-1.0 ms unsliced; batch 8 x 1024 slots 23 ms against 5 ms). Tiles
# of a few MiB stay in cache: measured, R * T * K * D * 4 bytes of 1.5-6 MiB ran
# within 1.3-2x of the unsliced dot, while 12 MiB and more fell back to the slice's
# cost. Measured with bench/generate.py's server-shaped pool.
_DECODE_TILE_BYTES = 3 << 20
_MIN_DECODE_TILE = 64


def decode_key_block(rows: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Keys per tile of a decode step over `rows` rows (a power of two, 64..2048)."""
    per_slot = max(1, rows * kv_heads * head_dim * itemsize)
    return min(2048, max(_MIN_DECODE_TILE, _pow2_floor(_DECODE_TILE_BYTES // per_slot)))


def _slice(x: jax.Array | None, start: jax.Array, size: int, axis: int) -> jax.Array | None:
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _kv_tile(x: jax.Array, rows: int, start: jax.Array, size: int) -> jax.Array:
    """Slots start..start+size of the first `rows` rows of a head-major [B, K, S, D] buffer."""
    _, kh, _, d = x.shape
    return jax.lax.dynamic_slice(x, (0, 0, start, 0), (rows, kh, size, d))


def blockwise_partial(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                      k_index: jax.Array, k_valid: jax.Array, *, q_block: int, k_block: int,
                      q_segment: jax.Array | None = None,
                      k_segment: jax.Array | None = None) -> Partial:
    """Partial attention of q over k/v in (q_block x k_block) tiles, fully masked tiles skipped.

    The one attention kernel of dense, chunked (cached) and ring prefill.

    * Skipping, not masking: a table says which tiles hold at least one
      attendable (query, key) pair: tile (i, j) does iff, in some row, the
      smallest index of a valid key of block j is <= the largest query index
      of block i (exact for causal + validity; segment masks are applied inside
      the tile). Each query block then loops over its list of needed key blocks
      only (a while loop of data-dependent length), so the causal upper
      triangle, empty cache slots and left padding cost nothing: no `cond`
      per tile, no masked matmul.
    * No copies of K/V: key tiles are `dynamic_slice`s of the caller's
      head-major k/v (the cache itself); nothing is padded, reshaped or
      transposed. A length that is not a multiple of the tile is handled by
      clamping the last tile's start (tile j covers [min(j*kb, S-kb), +kb))
      and masking the keys the previous tile already covered; the last query
      tile is clamped the same way and simply recomputes a few rows.
    * Queries are transposed to head-major once per call ([B, K, G, T, D]), and
      the output once back, not per tile.
    * fp32 scores, softmax statistics and accumulators whatever the input dtype.

    Args:
      q: [B, T, N, D]; k, v: [B', K, S, D] (head-major), B' >= B: the queries
        belong to the first B rows (an engine's slot pool is read in place, tile
        by tile, never sliced whole: see `decode_key_block`).
      q_index, k_index, k_valid, q_segment, k_segment: as in `index_mask` ([B, ...]).
      q_block, k_block: tile sizes (`choose_tiles`, `decode_key_block`).
    Returns:
      Partial over all keys, [B, T, ...]; max = -inf, sum = 0 where every tile
      was skipped.
    """
    b, t, n, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = n // kh
    qb, kb = max(1, min(q_block, t)), max(1, min(k_block, s))
    nq, nk = -(-t // qb), -(-s // kb)
    use_seg = q_segment is not None and k_segment is not None
    q_starts = jnp.minimum(jnp.arange(nq, dtype=jnp.int32) * qb, t - qb)  # [nq]
    k_starts = jnp.minimum(jnp.arange(nk, dtype=jnp.int32) * kb, s - kb)  # [nk]
    k_first = jnp.arange(nk, dtype=jnp.int32) * kb  # keys below this are the previous tile's

    # The skip table, from the small index arrays only.
    q_rows = q_starts[:, None] + jnp.arange(qb, dtype=jnp.int32)           # [nq, qb]
    k_cols = k_starts[:, None] + jnp.arange(kb, dtype=jnp.int32)           # [nk, kb]
    q_max = jnp.max(q_index[:, q_rows], axis=-1)                           # [B, nq]
    k_ok = k_valid[:, k_cols] & (k_cols >= k_first[:, None])[None]          # [B, nk, kb]
    big = jnp.iinfo(jnp.int32).max
    k_min = jnp.min(jnp.where(k_ok, k_index[:, k_cols], big), axis=-1)     # [B, nk]
    needed = jnp.any(k_min[:, None, :] <= q_max[:, :, None], axis=0)       # [nq, nk]
    # Fully visible tiles (every key valid and before every query, no segments)
    # skip the mask: on CPU the select is one more pass over the scores.
    q_min = jnp.min(q_index[:, q_rows], axis=-1)                           # [B, nq]
    k_max = jnp.max(jnp.where(k_ok, k_index[:, k_cols], -big), axis=-1)    # [B, nk]
    k_full = jnp.all(k_ok, axis=-1)  # [B, nk]; a clamped last tile is never full (overlap masked)
    visible = jnp.all(k_full[:, None, :] & (k_max[:, None, :] <= q_min[:, :, None]), axis=0)
    visible &= not use_seg
    order = jnp.argsort(~needed, axis=1, stable=True).astype(jnp.int32)   # needed blocks first
    count = jnp.sum(needed, axis=1, dtype=jnp.int32)

    qh = _grouped(q, kh)                                                   # [B, K, G, T, D]
    empty = Partial(jnp.zeros((b, kh, g, qb, d), jnp.float32),
                    jnp.full((b, kh, g, qb), -jnp.inf, jnp.float32),
                    jnp.zeros((b, kh, g, qb), jnp.float32))

    def query_tile(i, acc_all: Partial) -> Partial:
        qs = q_starts[i]
        qt = _slice(qh, qs, qb, 3)
        qi = _slice(q_index, qs, qb, 1)
        qseg = _slice(q_segment, qs, qb, 1) if use_seg else None

        def key_tile(c, acc: Partial) -> Partial:
            j = order[i, c]
            ks = k_starts[j]
            ki = _slice(k_index, ks, kb, 1)
            kv = _slice(k_valid, ks, kb, 1) & (ks + jnp.arange(kb) >= k_first[j])[None]
            kseg = _slice(k_segment, ks, kb, 1) if use_seg else None
            kt, vt = _kv_tile(k, b, ks, kb), _kv_tile(v, b, ks, kb)
            part = jax.lax.cond(
                visible[i, j], lambda: _tile_partial(qt, kt, vt, None),
                lambda: _tile_partial(qt, kt, vt, index_mask(qi, ki, kv, qseg, kseg)))
            return merge(acc, part)

        acc = jax.lax.fori_loop(0, count[i], key_tile, empty)
        put = lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, qs, 3)  # noqa: E731
        return Partial(*(put(w, p) for w, p in zip(acc_all, acc)))

    init = Partial(jnp.zeros((b, kh, g, t, d), jnp.float32),
                   jnp.full((b, kh, g, t), -jnp.inf, jnp.float32),
                   jnp.zeros((b, kh, g, t), jnp.float32))
    return _token_major(jax.lax.fori_loop(0, nq, query_tile, init))
