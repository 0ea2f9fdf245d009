"""The jitted steps (model/steps.py): overlapping prefill, row copies, per-row sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.model import params as params_lib
from lwm_serve.model import sampling, steps
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.kv_cache import init_cache
from lwm_serve.model.params import unstack_layers

TOL = 1e-4  # equal math, differently shaped matmuls (see tests/model/test_runner.py)


def _model():
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_sequence_length=256, vision_vocab_size=32,
                      initializer_range=0.1)
    return unstack_layers(params_lib.init_params(cfg, jax.random.PRNGKey(0)), cfg)


def _prefill(params, cfg, cache, ids, start_token, start_slot):
    t = len(ids)
    pos = np.arange(start_token, start_token + t, dtype=np.int32)[None]
    return steps.prefill_into(params, cfg, jnp.asarray(np.asarray(ids, np.int32)[None]),
                              jnp.zeros((1, t), bool), jnp.ones((1, t), jnp.int32), jnp.asarray(pos), cache,
                              jnp.asarray([start_slot], jnp.int32), "text")


def test_an_overlapping_last_chunk_gives_the_one_shot_logits():
    params, cfg = _model()
    ids = np.random.default_rng(0).integers(3, 96, 40)
    one_shot, _ = _prefill(params, cfg, init_cache(cfg, 1, 64), ids, 0, 0)
    cache = init_cache(cfg, 1, 64)
    _, cache = _prefill(params, cfg, cache, ids[:32], 0, 0)
    last, cache = _prefill(params, cfg, cache, ids[24:], 24, 24)  # rewrites slots 24..31
    np.testing.assert_allclose(np.asarray(last), np.asarray(one_shot), atol=TOL, rtol=0)
    assert int(cache.index[0]) == 40 and np.asarray(cache.valid)[0, :40].all()


def test_resize_and_insert_copy_rows_and_empty_the_rest():
    params, cfg = _model()
    ids = np.random.default_rng(1).integers(3, 96, 20)
    _, row = _prefill(params, cfg, init_cache(cfg, 1, 32), ids, 0, 0)
    kept = steps.resize_row(row, jnp.asarray(12, jnp.int32), 64)
    assert kept.max_length == 64 and int(kept.index[0]) == 12
    assert np.asarray(kept.valid)[0, :12].all() and not np.asarray(kept.valid)[0, 12:].any()
    np.testing.assert_array_equal(np.asarray(kept.k[0])[:, :, :20], np.asarray(row.k[0])[:, :, :20])
    pool = init_cache(cfg, 3, 64)
    pool = pool.__class__(k=pool.k, v=pool.v, valid=jnp.ones_like(pool.valid), index=pool.index)
    pool = steps.insert_row(pool, row, jnp.asarray(1, jnp.int32))
    valid = np.asarray(pool.valid)
    assert valid[1, :20].all() and not valid[1, 20:].any() and valid[0].all() and valid[2].all()
    assert int(pool.index[1]) == 20
    np.testing.assert_array_equal(np.asarray(pool.k[1])[1, :, :32], np.asarray(row.k[1])[0])


def test_sample_rows_gives_each_row_what_it_gets_alone():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(5, 96)).astype(np.float32))
    params = [sampling.SamplingParams(temperature=t, top_k=k, top_p=p)
              for t, k, p in ((0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (1.0, 5, 0.9))]
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(7), 5))
    with jax.threefry_partitionable(False):
        batch, next_keys, *_ = steps.sample_rows(jnp.asarray(keys), logits, sampling.SamplingArrays.from_params(params),
                                                 None, jnp.ones(5), False, 0, sampling.SamplingFeatures.of(params))
        for r in range(5):
            alone, nk, *_ = steps.sample_rows(jnp.asarray(keys[r:r + 1]), logits[r:r + 1],
                                              sampling.SamplingArrays.from_params(params[r:r + 1]), None,
                                              jnp.ones(1), False, 0, sampling.SamplingFeatures.of(params[r:r + 1]))
            assert int(alone[0]) == int(batch[r])
            np.testing.assert_array_equal(np.asarray(nk[0]), np.asarray(next_keys[r]))
            # the reference's step: key, next = split(key); categorical over the warped row
            step_key, nxt = jax.random.split(jnp.asarray(keys[r]))
            np.testing.assert_array_equal(np.asarray(nxt), np.asarray(next_keys[r]))
            if params[r].temperature > 0:
                warped = sampling.warp(logits[r:r + 1], sampling.SamplingArrays.from_params(params[r:r + 1]))
                assert int(sampling.gumbel_categorical(step_key, warped)[0]) == int(batch[r])
