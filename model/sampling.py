"""Pure samplers: logits (+ per-row knobs + rng key) in, token ids out.

The knobs are per-row arrays so that one compiled step serves a batch of
requests with different settings. The order and the math follow Hugging Face's
Flax warpers, which the reference uses: repetition penalties, temperature,
top-k, top-p, then `categorical` (argmax of logits + Gumbel noise).
Classifier-free guidance mixes the conditional and unconditional rows first,
as the reference's `_sample_vision` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf
# Largest k served by `lax.top_k` instead of a sort of the whole vocabulary. On
# XLA:CPU sorting [16, 32000] fp32 rows takes ~90 ms of CPU (more than a
# 16-row bench-150m decode step), `lax.top_k` with k = 64 ~1 ms, k = 1024 ~6 ms.
FAST_TOP_K_LIMIT = 1024


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One request's sampling settings.

    temperature 0 means greedy (argmax), as in the OpenAI API. top_k 0 and
    top_p 1.0 disable those filters. Reference defaults for text chat are
    temperature 0.2 with Hugging Face's implicit top_k=50.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: object) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SamplingFeatures:
    """Which parts of the pipeline a batch needs (static: one compile per combination).

    Sorting the vocabulary for top-k/top-p costs more than a small model's whole
    decode step on CPU, so a batch that uses neither skips it, and one whose
    k are all <= `top_k_bound` takes the `top_k_bound` largest logits instead
    of sorting (`top_p_within_k`: every top-p row also has such a k, so its
    nucleus lies within them too). Same results as the sort (see `apply_top_k`,
    `apply_top_p`), whatever the batch: only the cost depends on the flags.
    """

    all_greedy: bool = False
    top_k: bool = True
    top_p: bool = True
    penalties: bool = True
    top_k_bound: int = 0        # 0: sort the whole vocabulary
    top_p_within_k: bool = False

    @classmethod
    def of(cls, rows: list["SamplingParams"]) -> "SamplingFeatures":
        ks = [p.top_k for p in rows if p.top_k > 0]
        bound = 0
        if ks and max(ks) <= FAST_TOP_K_LIMIT:
            bound = 1 << max(0, (max(ks) - 1).bit_length())  # a power of two: few compiled shapes
        return cls(
            all_greedy=all(p.greedy for p in rows),
            top_k=bool(ks),
            top_p=any(p.top_p < 1.0 for p in rows),
            penalties=any(p.presence_penalty or p.frequency_penalty for p in rows),
            top_k_bound=bound,
            top_p_within_k=bound > 0 and all(0 < p.top_k for p in rows if p.top_p < 1.0),
        )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling knobs, all shaped [B]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array

    @classmethod
    def from_params(cls, rows: list[SamplingParams]) -> "SamplingArrays":
        f32 = lambda xs: jnp.asarray(np.asarray(xs, np.float32))  # noqa: E731
        return cls(
            temperature=f32([p.temperature for p in rows]),
            # any k past the vocabulary keeps every token (apply_top_k): clip into int32
            top_k=jnp.asarray(np.asarray([min(p.top_k, np.iinfo(np.int32).max) for p in rows], np.int32)),
            top_p=f32([p.top_p for p in rows]),
            presence_penalty=f32([p.presence_penalty for p in rows]),
            frequency_penalty=f32([p.frequency_penalty for p in rows]),
        )


def cfg_mix(logits: jax.Array, cfg_scale: jax.Array) -> jax.Array:
    """Classifier-free guidance: rows are [cond..., uncond...]; returns [B/2, V].

    Computed as `uncond + scale * (cond - uncond)` even at scale 1, exactly as
    the reference (the result is then not always bit-identical to `cond`).
    """
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + cfg_scale[:, None] * (cond - uncond)


def apply_penalties(logits: jax.Array, counts: jax.Array, presence: jax.Array,
                    frequency: jax.Array) -> jax.Array:
    """OpenAI presence/frequency penalties from per-row generated-token counts [B, V]."""
    counts = counts.astype(jnp.float32)
    return (logits - frequency[:, None] * counts
            - presence[:, None] * (counts > 0).astype(jnp.float32))


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide by temperature; greedy rows (0) are left alone (they take the argmax)."""
    safe = jnp.where(temperature > 0, temperature, 1.0)
    return logits / safe[:, None]


def apply_top_k(logits: jax.Array, top_k: jax.Array, bound: int = 0) -> jax.Array:
    """Keep each row's k largest logits (k = 0: keep all), others -inf.

    `bound` > 0 (static; every row's k <= bound): the k-th largest comes from
    `lax.top_k(logits, bound)` rather than a full sort: the same value, so the
    same result.
    """
    vocab = logits.shape[-1]
    keep_all = (top_k <= 0) | (top_k > vocab)
    if bound:
        largest = jax.lax.top_k(logits, min(bound, vocab))[0]
        k = jnp.clip(top_k, 1, largest.shape[-1])
        kth = jnp.take_along_axis(largest, (k - 1)[:, None], axis=-1)
        kth = jnp.where(keep_all[:, None], NEG_INF, kth)
        return jnp.where(logits < kth, NEG_INF, logits)
    k = jnp.where(keep_all, vocab, top_k)
    sorted_desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    return jnp.where(logits < kth, NEG_INF, logits)


def _nucleus_threshold(sorted_desc: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, 1]: the smallest logit of the nucleus, from a row's logits sorted descending
    (the whole row, or a prefix holding every finite one: the -inf rest adds exact
    zeros to the softmax sum and the cumulative mass)."""
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    keep = jnp.concatenate(
        [jnp.ones_like(cum[:, :1], dtype=jnp.bool_), cum[:, :-1] < top_p[:, None]], axis=-1)
    last_kept = jnp.sum(keep, axis=-1) - 1
    return jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1)


def apply_top_p(logits: jax.Array, top_p: jax.Array, prefix: int = 0) -> jax.Array:
    """Nucleus filter as HF's FlaxTopPLogitsWarper: keep the smallest prefix of the
    sorted distribution whose mass reaches top_p (the token crossing it included).

    `prefix` > 0 (static; after a top-k filter of k <= prefix on every top-p
    row): the nucleus is found among the `prefix` largest logits, without
    sorting the vocabulary. A row with more than `prefix` finite logits (ties
    at the k-th value) sends the batch through the full sort instead.
    """
    vocab = logits.shape[-1]
    full = lambda: _nucleus_threshold(-jnp.sort(-logits, axis=-1), top_p)  # noqa: E731
    if prefix and prefix < vocab:
        largest = jax.lax.top_k(logits, prefix)[0]
        fits = (top_p >= 1.0) | (jnp.sum(jnp.isfinite(logits), axis=-1) <= prefix)
        threshold = jax.lax.cond(jnp.all(fits), lambda: _nucleus_threshold(largest, top_p), full)
    else:
        threshold = full()
    filtered = jnp.where(logits < threshold, NEG_INF, logits)
    return jnp.where((top_p < 1.0)[:, None], filtered, logits)


def warp(logits: jax.Array, knobs: SamplingArrays,
         features: SamplingFeatures = SamplingFeatures()) -> jax.Array:
    """Temperature, then top-k, then top-p (Hugging Face's warper order)."""
    logits = apply_temperature(logits, knobs.temperature)
    if features.top_k:
        logits = apply_top_k(logits, knobs.top_k, features.top_k_bound)
    if features.top_p:
        logits = apply_top_p(logits, knobs.top_p, features.top_k_bound if features.top_p_within_k else 0)
    return logits


def gumbel_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """argmax(logits + Gumbel noise): `jax.random.categorical` as of jax 0.4.29,
    written out so the stream does not change with JAX's implementation."""
    dtype = logits.dtype
    u = jax.random.uniform(key, logits.shape, dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0)
    return jnp.argmax(logits - jnp.log(-jnp.log(u)), axis=-1).astype(jnp.int32)


def sample(key: jax.Array, logits: jax.Array, knobs: SamplingArrays,
           features: SamplingFeatures = SamplingFeatures()) -> jax.Array:
    """Next token per row [B] from logits [B, V]. Greedy rows take the raw argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if features.all_greedy:
        return greedy
    sampled = gumbel_categorical(key, warp(logits, knobs, features))
    return jnp.where(knobs.temperature == 0.0, greedy, sampled)


def logprobs(logits: jax.Array, tokens: jax.Array, top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the chosen tokens and the top-n alternatives.

    Taken from the model's distribution before any warping (vLLM's default).
    Returns (chosen [B], top values [B, n], top ids [B, n]).
    """
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_vals, top_ids = jax.lax.top_k(lp, max(top_n, 1))
    return chosen, top_vals, top_ids.astype(jnp.int32)
