"""RingAttention (striped, sequence-sharded) against dense attention on 8 CPU devices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm_serve.model import attention as attn
from lwm_serve.model import params as params_lib
from lwm_serve.model import ring_attention as ra
from lwm_serve.model import sharding, transformer
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.mesh import make_mesh

FP32_TOL = 1e-5
MESHES = ["1,1,1,8", "1,1,2,4", "1,2,2,2", "2,1,1,4", "1,1,8,1"]


def tiny_config(**changes) -> ModelConfig:
    """8 heads (so tp=8 splits them), blocks of 8 so that lengths straddle blocks."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=8, max_sequence_length=1024, vision_vocab_size=64,
                initializer_range=0.1, scan_query_chunk_size=8, scan_key_chunk_size=8)
    return ModelConfig(**{**base, **changes})


@functools.cache
def tiny_params(cfg: ModelConfig):
    return params_lib.init_params(cfg, jax.random.PRNGKey(0))


def batch_inputs(cfg: ModelConfig, lengths: tuple[int, ...], total: int, seed: int = 0):
    """Left-padded rows with some vision tokens: (tokens, vision_mask, attention_mask, positions)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = rng.integers(3, cfg.vocab_size, size=(b, total)).astype(np.int32)
    vmask = np.zeros((b, total), bool)
    vmask[:, total // 3: total // 2] = True
    tokens[vmask] %= cfg.vision_vocab_size
    amask = np.zeros((b, total), np.int32)
    for i, n in enumerate(lengths):
        amask[i, total - n:] = 1
    positions = np.maximum(np.cumsum(amask, 1) - 1, 0).astype(np.int32)
    return tokens, vmask, amask, positions


def test_stripe_places_position_p_on_shard_p_mod_sp():
    x = jnp.arange(24)[None]
    for sp in (1, 2, 4, 8):
        s = ra.stripe(x, sp)
        shards = np.asarray(s).reshape(sp, -1)
        for d in range(sp):
            assert (shards[d] % sp == d).all()
        np.testing.assert_array_equal(np.asarray(ra.unstripe(s, sp)), np.asarray(x))
    slots = jnp.arange(24)
    phys = np.asarray(ra.physical_index(slots, 24, 4))
    assert sorted(phys.tolist()) == list(range(24))
    np.testing.assert_array_equal(np.asarray(ra.stripe(slots[None], 4))[0][phys], np.asarray(slots))


@pytest.mark.parametrize("spec", ["1,1,1,8", "1,1,2,4", "2,1,1,4"])
def test_ring_attention_op_equals_dense(spec):
    """GQA heads, left padding, packed segments, a length that straddles the blocks."""
    mesh = make_mesh(spec)
    sp = mesh.shape["sp"]
    rng = np.random.default_rng(1)
    b, t, n, k, d = 2, 24, 8, 4, 8
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, k, d)), jnp.float32)
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = np.ones((b, t), bool)
    valid[1, :5] = False
    segments = np.zeros((b, t), np.int32)
    segments[0, 13:] = 1
    valid, segments = jnp.asarray(valid), jnp.asarray(segments)
    want = attn.dense_attention(q, kk, v, attn.index_mask(index, index, valid, segments, segments))
    s = functools.partial(ra.stripe, sp=sp)
    got = ra.ring_attention(s(q), s(kk), s(v), s(index), s(index), s(valid), mesh=mesh,
                            q_block=2, k_block=4, q_segment=s(segments), k_segment=s(segments))
    got = np.asarray(ra.unstripe(got, sp))
    rows = np.asarray(valid)
    np.testing.assert_allclose(got[rows], np.asarray(want)[rows], atol=FP32_TOL, rtol=0)
    assert np.isfinite(got).all()  # padded queries are 0, never NaN


def _forward_ring_jit(cfg, mesh, **kw):
    return jax.jit(lambda p, t, v, pos, a: ra.forward_ring(p, cfg, mesh, t, v, pos, attention_mask=a, **kw))


@pytest.mark.parametrize("spec", MESHES)
def test_forward_ring_equals_dense(spec):
    """Logits and hidden states at every real position, length 45 (not a multiple of 8)."""
    cfg = tiny_config()
    params = tiny_params(cfg)
    tokens, vmask, amask, pos = batch_inputs(cfg, (45, 38), 45)
    args = [jnp.asarray(a) for a in (tokens, vmask, pos, amask)]
    dense = transformer.forward(params, cfg, args[0], args[1], args[2], attention_mask=args[3],
                                output_hidden_states=True)
    mesh = make_mesh(spec)
    ring = _forward_ring_jit(cfg, mesh, output_hidden_states=True)(
        sharding.shard_params(params, cfg, mesh), *args)
    valid = amask.astype(bool)
    for name in ("text_logits", "vision_logits"):
        got, want = np.asarray(getattr(ring, name)), np.asarray(getattr(dense, name))
        assert got.shape == want.shape
        np.testing.assert_allclose(got[valid], want[valid], atol=FP32_TOL, rtol=0, err_msg=name)
    for got, want in zip(ring.hidden_states, dense.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=FP32_TOL, rtol=0)


def test_forward_ring_with_segment_ids_and_per_layer_params():
    cfg = tiny_config(scan_layers=False)
    params = tiny_params(cfg)
    tokens, vmask, amask, pos = batch_inputs(cfg, (30, 30), 30, seed=2)
    segments = np.zeros_like(tokens)
    segments[:, 17:] = 1
    args = [jnp.asarray(a) for a in (tokens, vmask, pos)]
    dense = transformer.forward(params, cfg, *args, attention_mask=jnp.asarray(amask),
                                segment_ids=jnp.asarray(segments))
    mesh = make_mesh("1,1,2,4")
    ring = ra.forward_ring(sharding.shard_params(params, cfg, mesh), cfg, mesh, *args,
                           attention_mask=jnp.asarray(amask), segment_ids=jnp.asarray(segments))
    np.testing.assert_allclose(np.asarray(ring.text_logits), np.asarray(dense.text_logits),
                               atol=FP32_TOL, rtol=0)


def test_reference_fixture_logits_through_the_ring(forward_case, reference_params, reference_config):
    """The reference's own logits, reproduced with the sequence sharded over sp=4."""
    case_dir, params_name, scan = forward_case
    cfg = reference_config(scan)
    d = dict(np.load(case_dir / "data.npz"))
    mesh = make_mesh("1,1,2,4")
    params = sharding.shard_params(reference_params(params_name), cfg, mesh)
    out = ra.forward_ring(params, cfg, mesh, jnp.asarray(d["input_ids"]), jnp.asarray(d["vision_masks"]),
                          jnp.asarray(d["position_ids"]), attention_mask=jnp.asarray(d["attention_mask"]),
                          segment_ids=jnp.asarray(d["segment_ids"]))
    text, vision = np.asarray(out.text_logits), np.asarray(out.vision_logits)
    valid = d["attention_mask"].astype(bool)
    checked = 0
    if "text_logits" in d:
        np.testing.assert_allclose(text[valid], d["text_logits"][valid], atol=FP32_TOL, rtol=0)
        checked += 1
    if "vision_logits" in d:
        np.testing.assert_allclose(vision[valid], d["vision_logits"][valid], atol=FP32_TOL, rtol=0)
        checked += 1
    if "vision_logits_last" in d:
        np.testing.assert_allclose(vision[:, -1], d["vision_logits_last"], atol=FP32_TOL, rtol=0)
        checked += 1
    if "valid_positions" in d:
        np.testing.assert_allclose(text[0, d["valid_positions"]], d["text_logits_valid"], atol=FP32_TOL, rtol=0)
        np.testing.assert_allclose(vision[0, d["vision_logits_positions"]], d["vision_logits_at_positions"],
                                   atol=FP32_TOL, rtol=0)
        checked += 2
    assert checked, "the case has no logits this test knows"


def _tiles_per_device_step(order: np.ndarray, sp: int, block: int) -> np.ndarray:
    """[step, device] number of causal tiles the ring computes (tiles not fully masked)."""
    shards = order.reshape(sp, -1)
    work = np.zeros((sp, sp), int)
    for step in range(sp):
        for dev in range(sp):
            q = shards[dev].reshape(-1, block)
            k = shards[(dev - step) % sp].reshape(-1, block)
            work[step, dev] = sum(bool((kb[None, :] <= qb[:, None]).any()) for qb in q for kb in k)
    return work


def test_striped_order_balances_every_ring_step():
    """Why striping: every device computes the same number of tiles at every step,
    while contiguous shards leave the first devices idle (the causal upper triangle)."""
    sp, t, block = 4, 128, 8
    positions = np.arange(t)
    striped = _tiles_per_device_step(np.asarray(ra.stripe(jnp.asarray(positions)[None], sp))[0], sp, block)
    contiguous = _tiles_per_device_step(positions, sp, block)
    assert striped.sum() < contiguous.size * (t // sp // block) ** 2  # upper-triangle tiles are skipped
    assert (striped.max(axis=1) - striped.min(axis=1) <= 1).all()
    assert (contiguous.max(axis=1) - contiguous.min(axis=1)).max() == (t // sp // block) ** 2
