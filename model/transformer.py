"""The LWM decoder: embeddings -> L pre-norm LLaMA blocks -> ln_f -> text/vision heads.

`forward` is a pure function (params, ids, masks, positions, optional cache in;
logits, hidden states, cache out). It serves three callers:

* no cache: a full causal forward (reference fixtures, training-style checks);
* with a cache: prefill (T tokens per row) and decode (T = 1) write their keys
  and values at each row's next slots and attend to the whole cache. The whole
  cache is threaded through the (unrolled) layer loop and each layer writes
  only its new slots, so XLA updates it in place (a cache passed as scan
  input/output is copied every step: 100x slower decode at 4K slots on CPU). Prefill attends
  in (query block x key block) tiles, skipping fully masked ones, so no
  [B, T, S] mask or score tensor is built; decode attends in one block;
* an `attention` override: sequence-parallel paths (RingAttention) swap the
  attention op without touching the block. `attention_fn` replaces only the
  softmax over a materialised mask; `layer_attention` replaces the cache write
  and the attention together (model/ring_attention.py: masks built from indices
  inside shard_map, cache in its sharded layout).

Activations are constrained to the logical axes of model/sharding.py (batch,
length, embed); outside `sharding.use_mesh` that is a no-op.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lwm_serve.model import attention as attn
from lwm_serve.model import kv_cache as kvc
from lwm_serve.model import layers
from lwm_serve.model import sharding
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.params import SCAN_KEY, Params

Head = Literal["text", "vision"]
# (q [B,T,N,D], k [B,S,K,D], v [B,S,K,D], mask [B,T,S]) -> [B,T,N,D]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# (q [B,T,N,D], new k [B,T,K,D], new v, the layer's head-major cache (k, v) [B,K,S,D] or None)
#   -> (out [B,T,N,D], the layer's updated cache or None)
LayerAttentionFn = Callable[[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None],
                            tuple[jax.Array, tuple[jax.Array, jax.Array] | None]]


class Output(NamedTuple):
    text_logits: jax.Array | None    # [B, T, V] fp32
    vision_logits: jax.Array | None  # [B, T, VV] fp32
    hidden_states: tuple[jax.Array, ...] | None  # input of each layer, then ln_f output
    cache: kvc.KVCache | None


# (q [B,T,N,D], k [B,T,K,D], v [B,T,K,D], layer index, the loop's cache state)
#   -> (out [B,T,N,D], the new cache state)
_Attend = Callable[[jax.Array, jax.Array, jax.Array, int, tuple], tuple[jax.Array, tuple]]


def _block(x: jax.Array, lp: Params, cfg: ModelConfig, cos: jax.Array, sin: jax.Array,
           attend: _Attend, layer: int, state: tuple) -> tuple[jax.Array, tuple]:
    """One pre-norm LLaMA block. x [B, T, H]; `attend` owns the cache handling."""
    dtype = jnp.dtype(cfg.dtype)
    b, t, _ = x.shape
    n, k_heads, d = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
    a = lp["attention"]
    h = layers.rms_norm(x, lp["attention_norm"]["kernel"], cfg.rms_norm_eps, dtype)
    q = layers.dense(h, a["wq"]["kernel"], dtype).reshape(b, t, n, d)        # [B, T, N, D]
    k = layers.dense(h, a["wk"]["kernel"], dtype).reshape(b, t, k_heads, d)  # [B, T, K, D]
    v = layers.dense(h, a["wv"]["kernel"], dtype).reshape(b, t, k_heads, d)
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)
    out, state = attend(q, k, v, layer, state)
    x = x + layers.dense(out.reshape(b, t, n * d), a["wo"]["kernel"], dtype)
    x = sharding.constrain(x, sharding.ACTIVATION)
    f = lp["feed_forward"]
    h = layers.rms_norm(x, lp["ffn_norm"]["kernel"], cfg.rms_norm_eps, dtype)
    x = x + layers.swiglu_mlp(h, f["w1"]["kernel"], f["w2"]["kernel"], f["w3"]["kernel"], dtype)
    x = sharding.constrain(x, sharding.ACTIVATION)
    return x, state


def _layer_params(params: Params, cfg: ModelConfig, i: int) -> Params:
    """Layer i's parameters, from either layout.

    The layer loop is unrolled with static slices: `lax.scan` over the stacked
    tree makes XLA copy every layer's weights out of the stack on each call
    (2.6x slower decode for bench-150m on CPU), while a static slice feeds the
    matmul directly. The cost is compile time linear in the number of layers.
    """
    h = params["transformer"]["h"]
    if not cfg.scan_layers:
        return h[str(i)]
    axis = cfg.param_scan_axis
    return jax.tree_util.tree_map(lambda x: jax.lax.index_in_dim(x, i, axis, keepdims=False), h[SCAN_KEY])


def _full_mask(tokens: jax.Array, attention_mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[B, T, T] causal & valid-key & same-segment mask of a cache-less forward."""
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attn.causal_mask(idx, idx) & attn.key_mask(attention_mask.astype(jnp.bool_), t)
    if segment_ids is not None:
        mask &= attn.segment_mask(segment_ids, segment_ids)
    return mask


def _tiled_attend(tokens: jax.Array, token_valid: jax.Array,
                  segment_ids: jax.Array | None) -> _Attend:
    """Cache-less causal attention by `attention.blockwise_partial` (masked tiles skipped)."""
    b, t = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def attend(q, k, v, layer, state):
        tiles = attn.choose_tiles(t, t, batch=b, heads=q.shape[2])
        part = attn.blockwise_partial(q, attn.head_major(k), attn.head_major(v), idx, idx, token_valid,
                                      q_block=tiles.q, k_block=tiles.k,
                                      q_segment=segment_ids, k_segment=segment_ids)
        return attn.finalize_or_zero(part, q.dtype), state

    return attend


def _cached_attend(cfg: ModelConfig, cache: kvc.KVCache, slots: jax.Array,
                   token_valid: jax.Array) -> tuple[_Attend, jax.Array]:
    """Single-device attention over the cache; returns (attend, the new valid mask).

    `slots` [R, T] may cover only the cache's first R rows (an engine's decode
    step over the occupied prefix of its slot pool). The cache is read in place,
    tile by tile, up to the furthest slot a live row attends to (the kernel skips
    empty tiles at run time): a step costs what the live rows need, not what the
    pool could hold, and no length has to be compiled for.
    """
    r, t = slots.shape
    rows = jnp.arange(r)[:, None]
    valid = cache.valid.at[rows, slots].set(token_valid, mode="drop")
    row_valid = valid[:r]
    key_idx = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), (r, cache.max_length))
    live = jnp.max(jnp.where(row_valid, key_idx, -1)) + 1  # slots up to the furthest live one

    def attend(q, k, v, layer, state):
        ks, vs = list(state[0]), list(state[1])
        # Write only this layer's new slots (in place: the layer's buffer has no other use).
        kl, vl = kvc.update_layer(ks[layer], vs[layer], k, v, slots)
        ks[layer], vs[layer] = kl, vl

        def read(tiles: attn.Tiles) -> jax.Array:
            part = attn.blockwise_partial(q, kl, vl, slots, key_idx, row_valid, q_block=tiles.q, k_block=tiles.k)
            return attn.finalize_or_zero(part, q.dtype)

        if t > 1:
            out = read(attn.choose_tiles(t, cache.max_length, batch=r, heads=q.shape[2]))
        else:  # decode: one query per row, tiles sized by the rows read (see decode_key_block)
            tiles = attn.Tiles(1, attn.decode_key_block(r, kl.shape[1], kl.shape[3], kl.dtype.itemsize))
            if r == cache.batch_size and tiles.k < cache.max_length:
                # Every row is read and the live slots fill much of them: one tile over the
                # whole buffer, the unsliced dot (the fastest read there is), wins.
                out = jax.lax.cond(live * 5 >= 2 * cache.max_length, lambda: read(attn.Tiles(1, cache.max_length)),
                                   lambda: read(tiles))
            else:
                out = read(tiles)
        return out, (tuple(ks), tuple(vs))

    return attend, valid


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, vision_mask: jax.Array,
            positions: jax.Array, *, attention_mask: jax.Array | None = None,
            segment_ids: jax.Array | None = None, cache: kvc.KVCache | None = None,
            heads: Sequence[Head] = ("text", "vision"), last_only: bool = False,
            output_hidden_states: bool = False,
            attention_fn: AttentionFn = attn.dense_attention,
            layer_attention: LayerAttentionFn | None = None) -> Output:
    """Run the decoder.

    Args:
      params: the reference-named parameter tree (either layer layout).
      tokens: [B, T] ids (text ids index `wte`, vision ids `vte`).
      vision_mask: [B, T] bool, True where the id is a vision code.
      positions: [B, T] int32 RoPE positions.
      attention_mask: [B, T], 0 for padding tokens (never attended to).
      segment_ids: [B, T] packed-segment ids (only without a cache, as the reference).
      cache: a KVCache to write this chunk into and attend over.
      heads: which logits to compute.
      last_only: compute logits for the last position only ([B, 1, V]).
      output_hidden_states: also return each layer's input and the ln_f output.
      attention_fn: the cache-less attention over a materialised mask; the
        default (`attention.dense_attention`) is run by the tiled kernel from
        indices instead (same math, no [B, T, T] mask or scores).
      layer_attention: replaces the cache write + attention of every layer; the
        returned cache then carries the new k/v but the input's `valid`/`index`
        (the override's caller keeps that bookkeeping, in its own layout).
      With fewer token rows than cache rows, the tokens belong to the cache's
      first rows.
    Returns:
      Output with fp32 logits.
    """
    dtype = jnp.dtype(cfg.dtype)
    tr = params["transformer"]
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    token_valid = attention_mask.astype(jnp.bool_)
    cos, sin = layers.rope_angles(positions, cfg.head_dim, cfg.theta)
    x = layers.embed_tokens(tokens, vision_mask, tr["wte"]["embedding"],
                            tr.get("vte", {}).get("embedding"), dtype)
    x = sharding.constrain(x, sharding.ACTIVATION)

    slots = valid = None
    if layer_attention is not None:
        state: tuple = () if cache is None else (cache.k, cache.v)

        def attend(q, k, v, layer, st):
            if not st:
                return layer_attention(q, k, v, None)[0], st
            ks, vs = list(st[0]), list(st[1])
            out, (ks[layer], vs[layer]) = layer_attention(q, k, v, (ks[layer], vs[layer]))
            return out, (tuple(ks), tuple(vs))
    elif cache is None and attention_fn is attn.dense_attention:
        # The default cache-less attention runs the tiled kernel from indices: the
        # same math as `dense_attention` without a [B, T, T] mask or score tensor.
        attend, state = _tiled_attend(tokens, token_valid, segment_ids), ()
    elif cache is None:
        mask = _full_mask(tokens, attention_mask, segment_ids)
        state = ()

        def attend(q, k, v, layer, st):
            return attention_fn(q, k, v, mask), st
    else:
        slots = kvc.write_slots(cache, tokens.shape[1])[:tokens.shape[0]]
        attend, valid = _cached_attend(cfg, cache, slots, token_valid)
        state = (cache.k, cache.v)

    hidden: list[jax.Array] = []
    for i in range(cfg.num_hidden_layers):
        if output_hidden_states:
            hidden.append(x)
        x, state = _block(x, _layer_params(params, cfg, i), cfg, cos, sin, attend, i, state)

    x = layers.rms_norm(x, tr["ln_f"]["kernel"], cfg.rms_norm_eps, dtype)
    if output_hidden_states:
        hidden.append(x)
    h_out = x[:, -1:] if last_only else x
    text_logits = vision_logits = None
    if "text" in heads:
        kernel = tr["wte"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
        text_logits = layers.dense(h_out, kernel, dtype).astype(jnp.float32)
    if "vision" in heads:
        kernel = tr["vte"]["embedding"].T if cfg.tie_vision_embeddings else params["vision_head"]["kernel"]
        vision_logits = layers.dense(h_out, kernel, dtype).astype(jnp.float32)
    new_cache = None
    if cache is not None and layer_attention is not None:
        new_cache = kvc.KVCache(k=state[0], v=state[1], valid=cache.valid, index=cache.index)
    elif cache is not None:
        index = cache.index.at[:tokens.shape[0]].add(tokens.shape[1])
        new_cache = kvc.KVCache(k=state[0], v=state[1], valid=valid, index=index)
    return Output(text_logits, vision_logits, tuple(hidden) if output_hidden_states else None,
                  new_cache)
