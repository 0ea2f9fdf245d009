"""The slot pool (model/runner.py): chunk plans, prefix reuse and inserts, dense and sequence-sharded."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lwm_serve.model import params as params_lib
from lwm_serve.model import sharding
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.mesh import make_mesh
from lwm_serve.model.params import unstack_layers
from lwm_serve.model.prefix_cache import PrefixCache
from lwm_serve.model.runner import SlotPool, prompt_offset

# Equal math over differently shaped matmuls (a 4-row step vs a 1-row step, a 32-token tail
# vs a 128-token chunk) sums in another order: fp32 logits then agree to ~1e-5, not bit for bit.
FP32_TOL = 1e-4


@pytest.fixture
def model():  # fresh per test: placing params on a mesh must not leak into the next test
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, max_sequence_length=2048, vision_vocab_size=64,
                      initializer_range=0.1, scan_query_chunk_size=32, scan_key_chunk_size=32)
    params, cfg = unstack_layers(params_lib.init_params(cfg, jax.random.PRNGKey(0)), cfg)
    return params, cfg


def _pool(model, mesh_spec=None, prefix=True):
    params, cfg = model
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    if mesh is not None:
        params = sharding.shard_params(params, cfg, mesh)
    return SlotPool(params, cfg, num_slots=4, max_length=1024, prefill_chunk=128, mesh=mesh,
                    prefix_cache=PrefixCache(256 << 20) if prefix else None)


def _run(pool, ids):
    task = pool.start_prefill(ids, np.zeros(len(ids), bool))
    while not task.complete:
        pool.prefill_step(task)
    return task


def test_chunk_plan_pads_only_short_prompts_and_overlaps_the_tail(model):
    pool = _pool(model, prefix=False)
    for n in (5, 100, 128, 129, 300, 511):
        task = pool.start_prefill(np.arange(n) % 100 + 3, np.zeros(n, bool))
        spans = [(start - task.offset, start - task.offset + t) for start, t in task.chunks]
        assert task.offset == prompt_offset(n, 128)
        assert spans[-1][1] == n  # the last chunk ends at the prompt's last token
        covered = set()
        for a, b in spans:
            covered |= set(range(max(a, 0), b))
        assert covered == set(range(n))
        assert sum(b - a for a, b in spans) - n < 128  # never more than one bucket recomputed or padded


@pytest.mark.parametrize("mesh_spec", [None, "1,1,1,8", "1,2,1,4"])
def test_prefix_reuse_gives_the_logits_of_a_cold_prefill(model, mesh_spec):
    rng = np.random.default_rng(1)
    base = rng.integers(3, 128, 300)
    longer = np.concatenate([base, rng.integers(3, 128, 70)])
    warm = _pool(model, mesh_spec)
    first = _run(warm, base)
    assert warm.keep(first) is not None
    reused = _run(warm, longer)
    new = len(longer) - len(base)
    assert reused.reused >= len(base) - new  # one piece (a power of two) ends the prompt: < 2x the new part
    cold = _run(_pool(model, mesh_spec, prefix=False), longer)
    assert cold.reused == 0
    np.testing.assert_allclose(np.asarray(reused.logits), np.asarray(cold.logits), atol=FP32_TOL, rtol=0)
    # and decoding after an insert continues the same way
    for pool, task in ((warm, reused), (_pool(model, mesh_spec, prefix=False), cold)):
        pool.insert(task, 2)
        a = pool.decode({2: 7})
        task.decode_logits = np.asarray(a)[2]
    np.testing.assert_allclose(reused.decode_logits, cold.decode_logits, atol=FP32_TOL, rtol=0)


def test_rows_are_independent_in_the_pool(model):
    pool = _pool(model, prefix=False)
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 128, 200), rng.integers(3, 128, 40)
    ta, tb = _run(pool, a), _run(pool, b)
    pool.insert(ta, 0)
    pool.insert(tb, 3)
    both = np.asarray(pool.decode({0: 5, 3: 9}))
    alone = _pool(model, prefix=False)
    alone.insert(_run(alone, b), 0)
    single = np.asarray(alone.decode({0: 9}))
    np.testing.assert_allclose(both[3], single[0], atol=FP32_TOL, rtol=0)


def test_a_decode_step_owns_its_host_inputs(model):
    """The positions a step is given are not a view of the pool's host mirror: on the CPU,
    JAX may read a host array only when the queued step runs, after `_advance` has
    bumped the mirror in place (jax-ml/jax#37830: that gave wrong logits at random)."""
    pool = _pool(model, prefix=False)
    pool.insert(_run(pool, np.arange(3, 43)), 1)
    _, feed, positions, active = pool._decode_inputs({1: 5})
    assert positions.tolist() == pool.position[: len(positions)].tolist()
    assert not np.shares_memory(positions, pool.position)


def test_decode_right_after_inserts_sees_the_inserted_rows(model):
    """Inserts and a decode queued back to back, never waited for in between (as the engine
    runs them), give the same logits every time."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 128, 200), rng.integers(3, 128, 40)
    results = []
    for _ in range(6):
        pool = _pool(model, prefix=False)
        ta, tb = _run(pool, a), _run(pool, b)
        pool.insert(ta, 0)
        pool.insert(tb, 3)
        results.append(np.asarray(pool.decode({0: 5, 3: 9}))[[0, 3]])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
