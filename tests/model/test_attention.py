"""model/attention.py: the tiled kernel against the plain dot-product path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm_serve.model import attention as attn

FP32_TOL = 1e-5


def _inputs(b, t, s, n, kh, d, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kh, s, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kh, s, d)), dtype)
    return q, k, v


def _reference(q, k, v, mask):
    """The plain path: one block over all keys, a materialised [B, T, S] mask."""
    return np.asarray(attn.finalize(attn.attend_block(q, k, v, mask), jnp.float32))


def _tiled(q, k, v, qi, ki, kv, qb, kb, qs=None, ks=None):
    fn = jax.jit(lambda *a: attn.blockwise_partial(*a[:6], q_block=qb, k_block=kb,
                                                   q_segment=a[6], k_segment=a[7]))
    return fn(q, k, v, qi, ki, kv, qs, ks)


# (batch, queries, keys, query heads, kv heads, head dim, query offset, q tile, k tile)
SHAPES = [
    (1, 64, 64, 4, 4, 8, 0, 16, 16),     # whole tiles, causal square
    (2, 37, 50, 4, 2, 8, 13, 8, 16),     # GQA, a chunk at slot 13 of a longer cache, ragged tiles
    (2, 45, 45, 8, 4, 8, 0, 7, 5),       # tiles that divide nothing
    (1, 5, 300, 2, 1, 16, 290, 4, 64),   # a short chunk late in a long cache
    (3, 1, 40, 4, 4, 8, 39, 1, 8),       # one query (decode shape)
    (1, 8, 45, 2, 2, 8, 100, 8, 16),     # all keys visible, the clamped last key tile overlaps
]


@pytest.mark.parametrize("shape", SHAPES)
def test_tiled_kernel_equals_plain_path_with_causal_and_padding_masks(shape):
    b, t, s, n, kh, d, off, qb, kb = shape
    q, k, v = _inputs(b, t, s, n, kh, d)
    qi = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + off, (b, t))
    ki = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = np.ones((b, s), bool)
    valid[0, :3] = False                 # left padding of row 0
    valid[:, off + t:] = False           # empty cache slots after the chunk
    valid = jnp.asarray(valid)
    mask = attn.index_mask(qi, ki, valid)
    got = np.asarray(attn.finalize_or_zero(_tiled(q, k, v, qi, ki, valid, qb, kb), jnp.float32))
    want = _reference(q, k, v, mask)
    seen = np.asarray(mask).any(-1)      # queries with at least one key
    np.testing.assert_allclose(got[seen], want[seen], atol=FP32_TOL, rtol=0)
    assert np.isfinite(got).all()        # the others are meaningless (never read) but never NaN


def test_segment_masks_inside_tiles():
    b, t, n, kh, d = 2, 40, 4, 2, 8
    q, k, v = _inputs(b, t, t, n, kh, d, seed=3)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = np.zeros((b, t), np.int32)
    seg[0, 11:] = 1
    seg[1, 27:] = 2
    seg = jnp.asarray(seg)
    valid = jnp.ones((b, t), bool)
    want = _reference(q, k, v, attn.index_mask(idx, idx, valid, seg, seg))
    got = attn.finalize_or_zero(_tiled(q, k, v, idx, idx, valid, 8, 8, seg, seg), jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, atol=FP32_TOL, rtol=0)


def test_result_does_not_depend_on_the_tiles():
    q, k, v = _inputs(1, 96, 96, 4, 4, 8, seed=5)
    idx = jnp.arange(96, dtype=jnp.int32)[None]
    valid = jnp.ones((1, 96), bool)
    outs = [np.asarray(attn.finalize(_tiled(q, k, v, idx, idx, valid, qb, kb), jnp.float32))
            for qb, kb in [(96, 96), (32, 32), (16, 48), (48, 16), (7, 13)]]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=FP32_TOL, rtol=0)


def test_masked_tiles_are_skipped_not_computed():
    """Poison every key/value above the diagonal with NaN: a tile that is computed
    and then masked would still carry NaN (0 * NaN) into the result."""
    t, qb, kb = 64, 16, 16
    q, k, v = _inputs(1, t, t, 2, 2, 8, seed=7)
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    valid = jnp.ones((1, t), bool)
    clean = np.asarray(attn.finalize(_tiled(q, k, v, idx, idx, valid, qb, kb), jnp.float32))
    # Key tile j is needed only by query tiles i >= j; poison the keys of the
    # last tile and check that the first three query tiles never saw them.
    kp = k.at[:, :, 48:].set(jnp.nan)
    vp = v.at[:, :, 48:].set(jnp.nan)
    got = np.asarray(attn.finalize(_tiled(q, kp, vp, idx, idx, valid, qb, kb), jnp.float32))
    assert np.isfinite(got[:, :48]).all()
    np.testing.assert_array_equal(got[:, :48], clean[:, :48])
    # Empty cache slots (valid = False) are skipped the same way.
    valid_half = jnp.arange(t)[None] < 48
    got = np.asarray(attn.finalize_or_zero(_tiled(q, kp, vp, idx, idx, valid_half, qb, kb), jnp.float32))
    assert np.isfinite(got).all()


def test_skipping_equals_computing_the_masked_tiles():
    """The old way (every tile computed, the masked ones merged in) gives the
    same result: merging a fully masked tile scales the accumulator by
    exp(m - m) = 1 and the tile by exp(MASK - m) = 0, bit for bit."""
    t = 48
    q, k, v = _inputs(1, t, t, 2, 2, 8, seed=11)
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    valid = jnp.ones((1, t), bool)
    got = attn.finalize(_tiled(q, k, v, idx, idx, valid, 16, 16), jnp.float32)
    rows = []
    for i in range(3):
        acc = attn.empty_partial(1, 16, 2, 8)
        qi = idx[:, 16 * i:16 * i + 16]
        for j in range(3):  # every tile, the fully masked ones included
            mask = attn.index_mask(qi, idx[:, 16 * j:16 * j + 16], valid[:, :16])
            part = attn.attend_block(q[:, 16 * i:16 * i + 16], k[:, :, 16 * j:16 * j + 16],
                                     v[:, :, 16 * j:16 * j + 16], mask)
            merged = attn.merge(acc, part)
            if j > i:  # above the diagonal: fully masked, and merging it changes no bit
                assert not np.asarray(mask).any()
                for x, y in zip(merged, acc):
                    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            acc = merged
        rows.append(attn.finalize(acc, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.concatenate(rows, axis=1)), atol=1e-6, rtol=0)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 q/k/v: statistics and accumulators are fp32, and the result equals the
    fp32 computation on the same (bf16-rounded) inputs, not a bf16 one."""
    b, t, n, d = 1, 256, 2, 64
    q, k, v = _inputs(b, t, t, n, n, d, seed=13, dtype=jnp.bfloat16)
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    valid = jnp.ones((1, t), bool)
    part = _tiled(q, k, v, idx, idx, valid, 64, 64)
    assert part.out.dtype == part.max.dtype == part.sum.dtype == jnp.float32
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _reference(*f32, attn.index_mask(idx, idx, valid))
    got = np.asarray(attn.finalize(part, jnp.float32))
    np.testing.assert_allclose(got, want, atol=FP32_TOL, rtol=0)
    # A bf16 accumulation would be off by ~1e-2 on sums of 256 terms.
    assert attn.finalize(part, jnp.bfloat16).dtype == jnp.bfloat16


def test_dense_attention_is_the_plain_path_and_merge_is_associative():
    q, k, v = _inputs(2, 12, 12, 4, 2, 8, seed=17)
    idx = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    mask = attn.index_mask(idx, idx, jnp.ones((2, 12), bool))
    dense = attn.dense_attention(q, attn.head_major(k), attn.head_major(v), mask)
    np.testing.assert_allclose(np.asarray(dense), _reference(q, k, v, mask), atol=FP32_TOL, rtol=0)
    parts = [attn.attend_block(q, k[:, :, a:a + 4], v[:, :, a:a + 4], mask[:, :, a:a + 4]) for a in (0, 4, 8)]
    left = attn.merge(attn.merge(parts[0], parts[1]), parts[2])
    right = attn.merge(parts[0], attn.merge(parts[1], parts[2]))
    np.testing.assert_allclose(np.asarray(attn.finalize(left, jnp.float32)),
                               np.asarray(attn.finalize(right, jnp.float32)), atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("q_len,kv_len,heads", [(512, 512, 12), (512, 8192, 12), (8192, 8320, 12), (16384, 16384, 32),
                                                (1, 4096, 12), (45, 45, 8)])
def test_choose_tiles_is_bounded_and_fits_the_shape(q_len, kv_len, heads):
    tiles = attn.choose_tiles(q_len, kv_len, batch=1, heads=heads)
    assert 1 <= tiles.q <= q_len and 1 <= tiles.k <= kv_len
    assert tiles.q * tiles.k * heads * 4 <= 2 * attn._TILE_SCORE_BYTES or min(tiles) <= 128  # noqa: SLF001
    assert tiles.q <= 512  # diagonal waste of a causal prompt: q / (2 * q_len), 3% at 8K tokens
    if q_len >= 512 and kv_len >= 4 * q_len and heads <= 12:  # bench-150m-like: the measured 512 x 256
        assert tiles == attn.Tiles(512, 256)


def test_decode_reads_a_pool_with_more_rows_than_queries_tile_by_tile():
    """A decode step's queries belong to the first R rows of a bigger pool: the kernel reads
    their tiles in place (no slice of the pool) and equals the plain path over those rows,
    rows of different lengths, empty tails skipped."""
    pool_rows, r, s, n, kh, d = 5, 3, 200, 4, 2, 8
    q, _, _ = _inputs(r, 1, s, n, kh, d, seed=1)
    _, k, v = _inputs(pool_rows, 1, s, n, kh, d, seed=2)
    lengths = np.array([150, 7, 61])
    slots = jnp.asarray(lengths[:, None] - 1, jnp.int32)
    ki = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (r, s))
    valid = jnp.asarray(np.arange(s)[None, :] < lengths[:, None])
    want = _reference(q, k[:r], v[:r], attn.index_mask(slots, ki, valid))
    for kb in (16, 64, s):
        got = attn.finalize_or_zero(attn.blockwise_partial(q, k, v, slots, ki, valid, q_block=1, k_block=kb),
                                    jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, 8, 64, 512])
def test_decode_key_block_keeps_a_tile_of_the_pool_within_its_budget(rows):
    kb = attn.decode_key_block(rows, 12, 64, 4)
    assert kb & (kb - 1) == 0 and 64 <= kb <= 2048
    assert rows * 12 * 64 * 4 * kb <= attn._DECODE_TILE_BYTES or kb == 64  # noqa: SLF001


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmasked_tile_scales_after_the_max_bit_for_bit(head_dim, dtype):
    # The fully visible tile takes max(s) / sqrt(d) instead of max(s / sqrt(d)) (one pass
    # over the scores fewer); rounding is monotone, so the two agree exactly, and a
    # tile whose mask is all True (the reference order) gives the same bits.
    rng = np.random.default_rng(head_dim)
    q = jnp.asarray(rng.standard_normal((1, 2, 2, 64, head_dim)) * 4, dtype)
    k = jnp.asarray(rng.standard_normal((1, 2, 96, head_dim)) * 4, dtype)
    v = jnp.asarray(rng.standard_normal((1, 2, 96, head_dim)), dtype)
    folded = jax.jit(lambda q, k, v: attn._tile_partial(q, k, v, None))(q, k, v)
    masked = jax.jit(lambda q, k, v: attn._tile_partial(q, k, v, jnp.ones((1, 64, 96), bool)))(q, k, v)
    for a, b in zip(folded, masked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
