"""Jitted model steps: the only model API the engine calls.

* `prefill_chunk` / `prefill_into` write a chunk of prompt tokens into the
  cache (at each row's next slots / from a given slot) and return the logits
  of the chunk's last position;
* `decode_rows` feeds one token to each of the cache's first rows and returns
  next-token logits, reading only the slots in use;
* `resize_row` / `insert_row` copy one-row caches (prefix reuse, a finished
  prefill into the engine's pool: model/runner.py);
* `sample_rows` turns logits into tokens, each row on its own key chain (with
  CFG mixing and logprobs).

With a `mesh` (static), both steps run the sequence-parallel paths of
model/ring_attention.py: params and cache must then be placed with
model/sharding.py (`shard_params`, `init_sharded_cache`). Without one, the
single-device path is unchanged.

Shapes are bucketed by the caller (`bucket_length`) so that each function
compiles once per (batch, bucket) and not once per request length. The cache is
donated: XLA updates it in place.
"""

from __future__ import annotations

import dataclasses
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


def _prefill(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_mask: jax.Array,
             attention_mask: jax.Array, positions: jax.Array, cache: KVCache,
             head: Head, mesh: Mesh | None) -> tuple[jax.Array, KVCache]:
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
def prefill_chunk(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_mask: jax.Array,
                  attention_mask: jax.Array, positions: jax.Array, cache: KVCache,
                  head: Head, mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Write a [B, C] chunk at each row's next slots; logits [B, V] of its last position."""
    return _prefill(params, cfg, tokens, vision_mask, attention_mask, positions, cache, head, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "head", "mesh"), donate_argnames=("cache",))
def prefill_into(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_mask: jax.Array,
                 attention_mask: jax.Array, positions: jax.Array, cache: KVCache, start: jax.Array,
                 head: Head, mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Write a [B, C] chunk at slots start[b].. of each row; logits [B, V] of its last position.

    Starting below the row's current index rewrites slots that already hold
    the same tokens (identical keys/values): the engine ends a prompt with a
    chunk that overlaps the previous one instead of padding it (model/runner.py).
    Slots from `start` on are emptied first, so the chunk attends to them only as
    its own (causal) tokens, never as cache entries "from the past".
    """
    cache = dataclasses.replace(cache, index=start,
                                valid=cache.valid & (_slot_numbers(cache.max_length, mesh)[None, :]
                                                     < start[:, None]))
    return _prefill(params, cfg, tokens, vision_mask, attention_mask, positions, cache, head, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "head", "mesh"), donate_argnames=("cache",))
def decode_rows(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                token_valid: jax.Array, cache: KVCache, head: Head,
                mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """One token for each of the cache's first R rows; logits [R, V] and the cache.

    tokens, positions, token_valid: [R] (R <= the cache's rows; rows whose
    `token_valid` is False write an empty slot: free slots of an engine's pool).
    Attention reads the cache up to the furthest live slot, decided at run time
    (one compiled step per R). With a mesh the sequence-sharded decode attends
    to the whole cache and R must be all rows.
    """
    out = _decode(params, cfg, tokens, jnp.full(tokens.shape, head == "vision"), positions, token_valid, cache,
                  (head,), mesh)
    logits = out.text_logits if head == "text" else out.vision_logits
    return logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("cache",))
def decode_rows_mixed(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_rows: jax.Array,
                      positions: jax.Array, token_valid: jax.Array, cache: KVCache,
                      mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, KVCache]:
    """`decode_rows` for a batch whose rows feed text or vision tokens (`vision_rows` [R] bool).

    Both heads' logits come back (text [R, V], vision [R, V_vision]); each row
    reads the head of its kind. One call, not one per head: every call
    advances every row's cache index, so a call per head would spend two
    slots per token of each row.
    """
    out = _decode(params, cfg, tokens, vision_rows, positions, token_valid, cache, ("text", "vision"), mesh)
    return out.text_logits[:, -1], out.vision_logits[:, -1], out.cache


def _decode(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_rows: jax.Array, positions: jax.Array,
            token_valid: jax.Array, cache: KVCache, heads: tuple[Head, ...],
            mesh: Mesh | None) -> transformer.Output:
    tokens = tokens[:, None]
    vision_mask = vision_rows[:, None]
    if mesh is not None:
        if tokens.shape[0] != cache.batch_size:
            raise ValueError("the sharded decode runs every row of the cache")
        return ring_attention.forward_cached(params, cfg, mesh, tokens, vision_mask, positions[:, None],
                                             cache, attention_mask=token_valid[:, None].astype(jnp.int32),
                                             heads=heads)
    return transformer.forward(params, cfg, tokens, vision_mask, positions[:, None],
                               attention_mask=token_valid[:, None].astype(jnp.int32), cache=cache,
                               heads=heads)


def _slot_numbers(length: int, mesh: Mesh | None) -> jax.Array:
    """[length]: the logical slot stored at each physical position of a cache row."""
    j = jnp.arange(length, dtype=jnp.int32)
    if mesh is None:
        return j
    sp = mesh.shape[ring_attention.SP]
    return (j % (length // sp)) * sp + j // (length // sp)


def _copy_slots(dst: jax.Array, src: jax.Array, count: int, mesh: Mesh | None,
                dst_row: jax.Array | int = 0) -> jax.Array:
    """Copy logical slots [0, count) of src's row 0 into dst's row `dst_row`.

    k/v [B, K, S, D] or valid [B, S] (slots on axis 2 or 1). On one device the
    slot is the physical index; a sequence-sharded cache stores slot s at
    `ring_attention.physical_index(s, S, sp)`, which depends on its length S.
    """
    axis = 2 if dst.ndim == 4 else 1
    if mesh is None:
        piece = jax.lax.slice_in_dim(src, 0, count, axis=axis)
        start = [0] * dst.ndim
        start[0] = dst_row
        return jax.lax.dynamic_update_slice(dst, piece.astype(dst.dtype), start)
    sp = mesh.shape[ring_attention.SP]
    logical = jnp.arange(count, dtype=jnp.int32)
    src_phys = ring_attention.physical_index(logical, src.shape[axis], sp)
    dst_phys = ring_attention.physical_index(logical, dst.shape[axis], sp)
    piece = jnp.take(src[0], src_phys, axis=axis - 1)
    if axis == 2:
        return dst.at[dst_row, :, dst_phys].set(jnp.swapaxes(piece, 0, 1).astype(dst.dtype))
    return dst.at[dst_row, dst_phys].set(piece)


@functools.partial(jax.jit, static_argnames=("length", "mesh"))
def resize_row(cache: KVCache, keep: jax.Array, length: int, mesh: Mesh | None = None) -> KVCache:
    """A new one-row cache of `length` slots holding the first `keep` slots of `cache`.

    A copy (the source is a prefix-cache entry and stays intact); slots from
    `keep` on are empty and the next write goes to slot `keep`.
    """
    count = min(cache.max_length, length)
    zeros = lambda x: jnp.zeros((1, x.shape[1], length, x.shape[3]), x.dtype)  # noqa: E731
    k = tuple(_copy_slots(zeros(x), x, count, mesh) for x in cache.k)
    v = tuple(_copy_slots(zeros(x), x, count, mesh) for x in cache.v)
    valid = _copy_slots(jnp.zeros((1, length), jnp.bool_), cache.valid, count, mesh)
    valid &= _slot_numbers(length, mesh)[None, :] < keep
    return KVCache(k=k, v=v, valid=valid, index=jnp.full((1,), keep, jnp.int32))


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("pool",))
def insert_row(pool: KVCache, row: KVCache, slot: jax.Array, mesh: Mesh | None = None) -> KVCache:
    """Copy a one-row cache (a finished prefill) into row `slot` of the pool.

    The row's slots past the copied ones are emptied: the pool row may hold a
    previous request's tokens.
    """
    count = row.max_length
    k = tuple(_copy_slots(p, r, count, mesh, slot) for p, r in zip(pool.k, row.k))
    v = tuple(_copy_slots(p, r, count, mesh, slot) for p, r in zip(pool.v, row.v))
    valid = pool.valid.at[slot].set(False)
    valid = _copy_slots(valid, row.valid, count, mesh, slot)
    return KVCache(k=k, v=v, valid=valid, index=pool.index.at[slot].set(row.index[0]))


@functools.partial(jax.jit, static_argnames=("use_cfg", "top_n", "features"))
def sample_rows(keys: jax.Array, logits: jax.Array, knobs: sampling.SamplingArrays,
                counts: jax.Array | None, cfg_scale: jax.Array, use_cfg: bool, top_n: int,
                features: sampling.SamplingFeatures = sampling.SamplingFeatures()
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One token per row, each row drawing from its own key chain.

    Row r samples exactly what `sample_next` would for that row alone with key
    keys[r] (the step key is `split(keys[r])[0]`, the chain goes on with
    `[1]`, as Hugging Face's Flax `generate` and the reference): a request's
    tokens do not depend on which other requests share the batch.

    Args:
      keys: [R, 2] raw threefry keys (call under `jax.threefry_partitionable(False)`).
      logits: [R, V] ([2R, V] rows [cond..., uncond...] with `use_cfg`).
      counts: [R, V] generated-token counts when `features.penalties`, else None.
      top_n: alternatives to return per row; -1 skips logprobs entirely (zeros come back).
    Returns:
      (tokens [R], the next keys [R, 2], chosen logprob [R], top logprobs [R, n], top ids [R, n]).
    """
    if use_cfg:
        logits = sampling.cfg_mix(logits, cfg_scale)
    if features.penalties:
        logits = sampling.apply_penalties(logits, counts, knobs.presence_penalty,
                                          knobs.frequency_penalty)
    split = jax.vmap(jax.random.split)(keys)                                    # [R, 2, 2]
    step_keys, next_keys = split[:, 0], split[:, 1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if features.all_greedy:
        tokens = greedy
    else:
        warped = sampling.warp(logits, knobs, features)
        sampled = jax.vmap(lambda k, row: sampling.gumbel_categorical(k, row[None])[0])(step_keys, warped)
        tokens = jnp.where(knobs.temperature == 0.0, greedy, sampled)
    if top_n < 0:  # nobody asked for logprobs: a log-softmax and a top-k over the vocabulary saved
        r = tokens.shape[0]
        return (tokens, next_keys, jnp.zeros((r,), jnp.float32), jnp.zeros((r, 1), jnp.float32),
                jnp.zeros((r, 1), jnp.int32))
    chosen, top_vals, top_ids = sampling.logprobs(logits, tokens, top_n)
    return tokens, next_keys, chosen, top_vals, top_ids
