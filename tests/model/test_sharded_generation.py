"""Sharded serving end to end: sequence-sharded cache, RingAttention prefill, sharded decode."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm_serve.model import params as params_lib
from lwm_serve.model import ring_attention as ra
from lwm_serve.model import sharding, steps, transformer
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.generation import Generator, PromptRow, seed_key
from lwm_serve.model.kv_cache import init_cache
from lwm_serve.model.mesh import make_mesh
from lwm_serve.model.sampling import SamplingParams

FP32_TOL = 1e-5
MESHES = ["1,1,1,8", "1,1,2,4", "1,2,2,2", "2,1,1,4", "1,1,8,1"]
NEW_TOKENS = 16


@functools.cache
def setup():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, max_sequence_length=1024, vision_vocab_size=64,
                      initializer_range=0.1, scan_query_chunk_size=8, scan_key_chunk_size=8)
    params = params_lib.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    # Two rows of different lengths (row 1 is left padded), neither a multiple of the blocks.
    rows = [PromptRow(rng.integers(3, cfg.vocab_size, 45).tolist()),
            PromptRow(rng.integers(3, cfg.vocab_size, 29).tolist())]
    return cfg, params, rows


@functools.cache
def single_device_run(prefill_chunk: int):
    cfg, params, rows = setup()
    gen = Generator(params, cfg, prefill_chunk=prefill_chunk)
    return list(gen.stream(rows, SamplingParams(temperature=0), max_new_tokens=NEW_TOKENS, key=seed_key(0),
                           top_logprobs=2))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_generation_equals_single_device(spec):
    """RingAttention prefill then 16 sharded decode steps: same tokens, same logprobs."""
    cfg, params, rows = setup()
    gen = Generator(params, cfg, prefill_chunk=64, mesh=make_mesh(spec))
    got = list(gen.stream(rows, SamplingParams(temperature=0), max_new_tokens=NEW_TOKENS, key=seed_key(0),
                          top_logprobs=2))
    want = single_device_run(64)
    assert len(got) == len(want) == NEW_TOKENS
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.tokens, w.tokens)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=FP32_TOL, rtol=0)
        np.testing.assert_allclose(g.top_logprobs, w.top_logprobs, atol=FP32_TOL, rtol=0)


def _inputs(cfg, rows, total):
    b = len(rows)
    tokens = np.zeros((b, total), np.int32)
    amask = np.zeros((b, total), np.int32)
    for i, r in enumerate(rows):
        tokens[i, total - len(r.ids):] = r.ids
        amask[i, total - len(r.ids):] = 1
    pos = np.maximum(np.cumsum(amask, 1) - 1, 0).astype(np.int32)
    return jnp.asarray(tokens), jnp.zeros((b, total), bool), jnp.asarray(amask), jnp.asarray(pos)


@pytest.mark.parametrize("spec", ["1,1,2,4", "2,1,1,4"])
def test_cache_stays_sequence_sharded_with_each_slot_on_its_owner(spec):
    """Prefill (all-position logits == dense) and one decode step; the cache matches the
    single-device cache slot for slot, each slot stored on shard slot % sp."""
    cfg, params, rows = setup()
    mesh = make_mesh(spec)
    sp = mesh.shape["sp"]
    tokens, vmask, amask, pos = _inputs(cfg, rows, 45)
    sharded_params = sharding.shard_params(params, cfg, mesh)
    cache = sharding.init_sharded_cache(cfg, 2, 64, mesh)
    out = jax.jit(lambda p, c: ra.forward_cached(p, cfg, mesh, tokens, vmask, pos, c, attention_mask=amask))(
        sharded_params, cache)
    dense = transformer.forward(params, cfg, tokens, vmask, pos, attention_mask=amask)
    valid = np.asarray(amask).astype(bool)
    np.testing.assert_allclose(np.asarray(out.text_logits)[valid], np.asarray(dense.text_logits)[valid],
                               atol=FP32_TOL, rtol=0)
    next_tok = jnp.asarray([5, 7], jnp.int32)
    next_pos = jnp.asarray(np.asarray(pos)[:, -1] + 1)
    logits, cache = steps.decode_rows(sharded_params, cfg, next_tok, next_pos, jnp.ones(2, bool), out.cache, "text",
                                       mesh)

    ref = init_cache(cfg, 2, 64)
    _, ref = steps.prefill_chunk(params, cfg, tokens, vmask, amask, pos, ref, "text")
    ref_logits, ref = steps.decode_rows(params, cfg, next_tok, next_pos, jnp.ones(2, bool), ref, "text")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=FP32_TOL, rtol=0)

    bsplit = mesh.shape["dp"] * mesh.shape["fsdp"]
    local = (2 // bsplit, cfg.kv_heads // mesh.shape["tp"], 64 // sp, cfg.head_dim)
    assert all({s.data.shape for s in layer.addressable_shards} == {local} for layer in cache.k)
    np.testing.assert_array_equal(np.asarray(cache.index), np.asarray(ref.index))
    phys = np.asarray(ra.physical_index(jnp.arange(64), 64, sp))
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, phys], np.asarray(ref.valid))
    slot_valid = np.asarray(ref.valid)
    token_major = lambda layers: np.stack(layers).swapaxes(2, 3)  # noqa: E731  [L, B, S, K, D]
    for got, want in ((token_major(cache.k), token_major(ref.k)), (token_major(cache.v), token_major(ref.v))):
        np.testing.assert_allclose(got[:, :, phys][:, slot_valid], want[:, slot_valid],
                                   atol=FP32_TOL, rtol=0)
    # Shard d holds exactly the slots s with s % sp == d.
    per_shard = np.asarray(cache.valid).reshape(2, sp, 64 // sp)
    for d in range(sp):
        slots = np.flatnonzero(per_shard[0, d]) * sp + d
        assert set(slots) <= set(np.flatnonzero(slot_valid[0]))


def test_chunked_prefill_of_eight_chunks_equals_one_shot():
    """On sp=4: a prompt 8x the chunk, prefilled chunk by chunk against the sharded cache."""
    cfg, params, _ = setup()
    rng = np.random.default_rng(3)
    rows = [PromptRow(rng.integers(3, cfg.vocab_size, 8 * 16).tolist()),
            PromptRow(rng.integers(3, cfg.vocab_size, 8 * 16 - 9).tolist())]
    mesh = make_mesh("1,1,2,4")
    kwargs = dict(max_new_tokens=4, key=seed_key(1), top_logprobs=3)
    one_shot = list(Generator(params, cfg, prefill_chunk=1024, mesh=mesh).stream(
        rows, SamplingParams(temperature=0), **kwargs))
    seen = []
    chunked = list(Generator(params, cfg, prefill_chunk=16, mesh=mesh).stream(
        rows, SamplingParams(temperature=0), on_prefill_chunk=lambda i, n: seen.append((i, n)), **kwargs))
    # each row is prefilled on its own: 8 chunks each (the shorter row's last chunk overlaps
    # its seventh instead of being padded)
    assert seen == [(i, 16) for i in range(1, 17)]
    for a, b in zip(one_shot, chunked, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=FP32_TOL, rtol=0)
