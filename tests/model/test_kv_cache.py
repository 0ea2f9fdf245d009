"""The cache layout and its in-place write (model/kv_cache.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lwm_serve.model.config import ModelConfig
from lwm_serve.model.kv_cache import init_cache, update_layer, write_slots


def _cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_sequence_length=64)


def test_init_cache_is_head_major_and_empty():
    cfg = _cfg()
    cache = init_cache(cfg, 3, 16)
    assert len(cache.k) == len(cache.v) == cfg.num_hidden_layers
    assert cache.k[0].shape == (3, cfg.kv_heads, 16, cfg.head_dim)
    assert not np.asarray(cache.valid).any() and (np.asarray(cache.index) == 0).all()
    assert (cache.batch_size, cache.max_length) == (3, 16)


def test_write_slots_follow_each_rows_index():
    cache = init_cache(_cfg(), 2, 16)
    cache.index = jnp.asarray([0, 5], jnp.int32)
    np.testing.assert_array_equal(np.asarray(write_slots(cache, 3)), [[0, 1, 2], [5, 6, 7]])


def test_update_layer_writes_only_the_given_slots_of_the_first_rows():
    b, k, s, d = 4, 2, 8, 3
    rng = np.random.default_rng(0)
    old_k = rng.normal(size=(b, k, s, d)).astype(np.float32)
    old_v = rng.normal(size=(b, k, s, d)).astype(np.float32)
    new_k = rng.normal(size=(2, 2, k, d)).astype(np.float32)   # 2 rows, 2 tokens (token-major)
    new_v = rng.normal(size=(2, 2, k, d)).astype(np.float32)
    slots = np.asarray([[1, 2], [7, 8]], np.int32)              # slot 8 is past the end: dropped
    got_k, got_v = update_layer(jnp.asarray(old_k), jnp.asarray(old_v), jnp.asarray(new_k),
                                jnp.asarray(new_v), jnp.asarray(slots))
    want_k, want_v = old_k.copy(), old_v.copy()
    for r in range(2):
        for t in range(2):
            if slots[r, t] < s:
                want_k[r, :, slots[r, t]] = new_k[r, t]
                want_v[r, :, slots[r, t]] = new_v[r, t]
    np.testing.assert_array_equal(np.asarray(got_k), want_k)
    np.testing.assert_array_equal(np.asarray(got_v), want_v)
