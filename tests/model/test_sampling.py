"""Pure samplers on tiny shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm_serve.model import sampling
from lwm_serve.model.sampling import SamplingArrays, SamplingParams


def knobs(**kw) -> SamplingArrays:
    return SamplingArrays.from_params([SamplingParams(**kw)])


def test_top_k_keeps_k_largest():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5]])
    out = np.asarray(sampling.apply_top_k(logits, jnp.asarray([2])))
    assert np.isfinite(out).tolist() == [[False, True, False, True, False]]
    np.testing.assert_array_equal(np.asarray(sampling.apply_top_k(logits, jnp.asarray([0]))), logits)


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = np.asarray([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None])
    kept = lambda p: np.isfinite(np.asarray(sampling.apply_top_p(logits, jnp.asarray([p])))).sum()  # noqa: E731
    assert kept(0.5) == 1      # first token alone has 0.5: the token reaching p is kept
    assert kept(0.6) == 2
    assert kept(0.95) == 3
    assert kept(1.0) == 4      # disabled


def test_greedy_is_argmax_and_ignores_key():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 50))
    k = SamplingArrays.from_params([SamplingParams(temperature=0)] * 3)
    a = sampling.sample(jax.random.PRNGKey(1), logits, k)
    b = sampling.sample(jax.random.PRNGKey(2), logits, k)
    np.testing.assert_array_equal(a, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(a, b)


def test_sampling_follows_distribution():
    probs = np.asarray([0.7, 0.2, 0.1])
    logits = jnp.log(jnp.asarray(probs))[None].repeat(4000, 0)
    k = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * 4000)
    tokens = np.asarray(sampling.sample(jax.random.PRNGKey(0), logits, k))
    freq = np.bincount(tokens, minlength=3) / len(tokens)
    np.testing.assert_allclose(freq, probs, atol=0.03)


def test_gumbel_categorical_equals_jax_categorical_stream():
    """Same stream as jax.random.categorical (what the reference called)."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (4, 100))
    key = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(sampling.gumbel_categorical(key, logits),
                                  jax.random.categorical(key, logits, axis=-1))


def test_cfg_mix_and_penalties():
    cond = jnp.asarray([[1.0, 2.0]])
    uncond = jnp.asarray([[0.5, 0.0]])
    mixed = sampling.cfg_mix(jnp.concatenate([cond, uncond]), jnp.asarray([3.0]))
    np.testing.assert_allclose(mixed, [[0.5 + 3 * 0.5, 0 + 3 * 2.0]])
    counts = jnp.asarray([[2, 0]])
    pen = sampling.apply_penalties(jnp.zeros((1, 2)), counts, jnp.asarray([0.5]), jnp.asarray([0.25]))
    np.testing.assert_allclose(pen, [[-0.5 - 0.5, 0.0]])


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_invalid_params_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_logprobs_are_normalised():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 10))
    tokens = jnp.asarray([1, 2])
    chosen, top_vals, top_ids = sampling.logprobs(logits, tokens, 3)
    lp = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(chosen, lp[jnp.arange(2), tokens], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    assert top_ids.shape == (2, 3) and np.all(np.diff(np.asarray(top_vals), axis=-1) <= 0)


def test_feature_flags_skip_only_unused_filters():
    """The static fast paths give the same tokens as the full pipeline."""
    from lwm_serve.model.sampling import SamplingFeatures

    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 300))
    key = jax.random.PRNGKey(9)
    for rows in ([SamplingParams(temperature=0)] * 4,
                 [SamplingParams(temperature=0.7)] * 4,
                 [SamplingParams(temperature=0.7, top_k=20), SamplingParams(temperature=0)] * 2,
                 [SamplingParams(temperature=1.0, top_p=0.8)] * 4):
        k = SamplingArrays.from_params(rows)
        features = SamplingFeatures.of(rows)
        np.testing.assert_array_equal(sampling.sample(key, logits, k, features),
                                      sampling.sample(key, logits, k))
    assert SamplingFeatures.of([SamplingParams(temperature=0)]).all_greedy
    assert not SamplingFeatures.of([SamplingParams(temperature=0.5)]).top_k


def test_top_k_and_top_p_without_a_sort_equal_the_sorted_filters():
    """`lax.top_k` paths (k <= FAST_TOP_K_LIMIT) keep exactly what sorting the vocabulary keeps."""
    from lwm_serve.model.sampling import SamplingFeatures

    logits = jax.random.normal(jax.random.PRNGKey(4), (7, 3000)) * 3
    rows = [SamplingParams(temperature=0.8, top_k=k, top_p=p)
            for k, p in ((50, 1.0), (1, 0.9), (700, 0.5), (0, 1.0), (13, 0.97), (64, 0.3))]
    with_k = SamplingFeatures.of(rows)
    assert with_k.top_k_bound == 1024 and with_k.top_p_within_k
    mixed = rows + [SamplingParams(temperature=1.0, top_p=0.9)]  # a nucleus without k: the full sort
    assert not SamplingFeatures.of(mixed).top_p_within_k
    assert SamplingFeatures.of([SamplingParams(top_k=5000)]).top_k_bound == 0
    for chosen in (rows, mixed):
        knobs, features = SamplingArrays.from_params(chosen), SamplingFeatures.of(chosen)
        sorted_only = dataclasses.replace(features, top_k_bound=0, top_p_within_k=False)
        lg = logits[:len(chosen)]
        np.testing.assert_array_equal(np.asarray(sampling.warp(lg, knobs, features)),
                                      np.asarray(sampling.warp(lg, knobs, sorted_only)))
    # ties at the k-th value leave more finite logits than the prefix holds: the full sort decides
    flat = jnp.zeros((2, 3000)).at[0, :5].set(1.0)
    tie_rows = [SamplingParams(temperature=1.0, top_k=3, top_p=0.5)] * 2
    knobs, features = SamplingArrays.from_params(tie_rows), SamplingFeatures.of(tie_rows)
    np.testing.assert_array_equal(
        np.asarray(sampling.warp(flat, knobs, features)),
        np.asarray(sampling.warp(flat, knobs, dataclasses.replace(features, top_k_bound=0, top_p_within_k=False))))
