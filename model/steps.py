"""Jitted model steps: the only model API the engine calls.

* `prefill_chunk` writes a chunk of prompt tokens into the cache and returns the
  logits of the chunk's last position;
* `decode_step` feeds one token per row and returns next-token logits;
* `sample_next` turns logits into tokens (with CFG mixing and logprobs).

With a `mesh` (static), both steps run the sequence-parallel paths of
model/ring_attention.py: params and cache must then be placed with
model/sharding.py (`shard_params`, `init_sharded_cache`). Without one, the
single-device path is unchanged.

Shapes are bucketed by the caller (`bucket_length`) so that each function
compiles once per (batch, bucket) and not once per request length. The cache is
donated: XLA updates it in place.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lwm_serve.model import ring_attention
from lwm_serve.model import sampling
from lwm_serve.model import transformer
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.kv_cache import KVCache
from lwm_serve.model.params import Params
from lwm_serve.model.transformer import Head

MIN_BUCKET = 128


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Round up to one of 4 sizes per power of two (at most 25% padding).

    128, 160, 192, 224, 256, 320, ... keeps the number of compiled shapes
    logarithmic in the context length.
    """
    if n <= minimum:
        return minimum
    step = 2 ** max(int(math.floor(math.log2(n))) - 2, 0)
    return int(math.ceil(n / step) * step)


@functools.partial(jax.jit, static_argnames=("cfg", "head", "mesh"), donate_argnames=("cache",))
def prefill_chunk(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_mask: jax.Array,
                  attention_mask: jax.Array, positions: jax.Array, cache: KVCache,
                  head: Head, mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Write a [B, C] chunk into the cache; logits [B, V] of its last position."""
    if mesh is not None:
        out = ring_attention.forward_cached(params, cfg, mesh, tokens, vision_mask, positions, cache,
                                            attention_mask=attention_mask, heads=(head,),
                                            last_only=True)
    else:
        out = transformer.forward(params, cfg, tokens, vision_mask, positions,
                                  attention_mask=attention_mask, cache=cache, heads=(head,),
                                  last_only=True)
    logits = out.text_logits if head == "text" else out.vision_logits
    return logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "head", "mesh"), donate_argnames=("cache",))
def decode_step(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                cache: KVCache, head: Head, mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """One token per row. tokens, positions: [B]. Returns logits [B, V] and the cache.

    A decode step's single token is a vision code exactly when sampling the
    vision head (the reference picks `vte` by sample mode for length-1 calls).
    """
    tokens = tokens[:, None]
    vision_mask = jnp.full(tokens.shape, head == "vision")
    if mesh is not None:
        out = ring_attention.forward_cached(params, cfg, mesh, tokens, vision_mask, positions[:, None],
                                            cache, heads=(head,))
    else:
        out = transformer.forward(params, cfg, tokens, vision_mask, positions[:, None],
                                  cache=cache, heads=(head,))
    logits = out.text_logits if head == "text" else out.vision_logits
    return logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("use_cfg", "top_n", "features"))
def sample_next(key: jax.Array, logits: jax.Array, knobs: sampling.SamplingArrays,
                counts: jax.Array, cfg_scale: jax.Array, use_cfg: bool, top_n: int,
                features: sampling.SamplingFeatures = sampling.SamplingFeatures()
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Tokens [B'] and logprobs from logits [B, V] (B' = B/2 with CFG).

    `counts` [B', V] holds each row's generated-token counts (for the penalties).
    Returns (tokens, updated counts, chosen logprob [B'], top logprobs [B', n],
    top ids [B', n]).
    """
    if use_cfg:
        logits = sampling.cfg_mix(logits, cfg_scale)
    if features.penalties:
        logits = sampling.apply_penalties(logits, counts, knobs.presence_penalty,
                                          knobs.frequency_penalty)
    tokens = sampling.sample(key, logits, knobs, features)
    chosen, top_vals, top_ids = sampling.logprobs(logits, tokens, top_n)
    counts = counts.at[jnp.arange(tokens.shape[0]), tokens].add(1)
    return tokens, counts, chosen, top_vals, top_ids
