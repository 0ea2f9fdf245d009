"""The LWM decoder: embeddings -> L pre-norm LLaMA blocks -> ln_f -> text/vision heads.

`forward` is a pure function (params, ids, masks, positions, optional cache in;
logits, hidden states, cache out). It serves three callers:

* no cache: a full causal forward (reference fixtures, training-style checks);
* with a cache: prefill (T tokens per row) and decode (T = 1) write their keys
  and values at each row's next slots and attend to the whole cache;
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
# (q [B,T,N,D], new k [B,T,K,D], new v, the layer's cache (k, v) [B,S,K,D] or None)
#   -> (out [B,T,N,D], the layer's updated cache or None)
LayerAttentionFn = Callable[[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None],
                            tuple[jax.Array, tuple[jax.Array, jax.Array] | None]]


class Output(NamedTuple):
    text_logits: jax.Array | None    # [B, T, V] fp32
    vision_logits: jax.Array | None  # [B, T, VV] fp32
    hidden_states: tuple[jax.Array, ...] | None  # input of each layer, then ln_f output
    cache: kvc.KVCache | None


def _block(x: jax.Array, lp: Params, cfg: ModelConfig, cos: jax.Array, sin: jax.Array,
           mask: jax.Array, attention_fn: AttentionFn,
           kv: tuple[jax.Array, jax.Array] | None, slots: jax.Array | None,
           layer_attention: LayerAttentionFn | None = None
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm LLaMA block. x [B, T, H]; kv the layer's cache [B, S, K, D] x2."""
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
    if layer_attention is not None:
        out, kv = layer_attention(q, k, v, kv)
        out = out.reshape(b, t, n * d)
    else:
        if kv is not None:
            k_all, v_all = kvc.update_layer(kv[0], kv[1], k, v, slots)
            kv = (k_all, v_all)
        else:
            k_all, v_all = k, v
        out = attention_fn(q, k_all, v_all, mask).reshape(b, t, n * d)
    x = x + layers.dense(out, a["wo"]["kernel"], dtype)
    x = sharding.constrain(x, sharding.ACTIVATION)
    f = lp["feed_forward"]
    h = layers.rms_norm(x, lp["ffn_norm"]["kernel"], cfg.rms_norm_eps, dtype)
    x = x + layers.swiglu_mlp(h, f["w1"]["kernel"], f["w2"]["kernel"], f["w3"]["kernel"], dtype)
    x = sharding.constrain(x, sharding.ACTIVATION)
    return x, kv


def _scanned_layer_params(params: Params, cfg: ModelConfig) -> Params:
    """The stacked layer tree with the layer axis first (what lax.scan wants)."""
    stacked = params["transformer"]["h"][SCAN_KEY]
    if cfg.param_scan_axis == 0:
        return stacked
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, cfg.param_scan_axis, 0), stacked)


def attention_mask_for(cfg: ModelConfig, tokens: jax.Array, attention_mask: jax.Array,
                       segment_ids: jax.Array | None, cache: kvc.KVCache | None
                       ) -> tuple[jax.Array, jax.Array | None]:
    """The [B, T, S] attend-mask and (with a cache) the [B, T] slots written."""
    b, t = tokens.shape
    valid = attention_mask.astype(jnp.bool_)
    if cache is None:
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attn.causal_mask(idx, idx) & attn.key_mask(valid, t)
        if segment_ids is not None:
            mask &= attn.segment_mask(segment_ids, segment_ids)
        return mask, None
    slots = kvc.write_slots(cache, t)
    rows = jnp.arange(b)[:, None]
    cache_valid = cache.valid.at[rows, slots].set(valid, mode="drop")
    key_idx = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), (b, cache.max_length))
    mask = attn.causal_mask(slots, key_idx) & attn.key_mask(cache_valid, t)
    return mask, slots


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
      layer_attention: replaces the cache write + attention of every layer; the
        returned cache then carries the new k/v but the input's `valid`/`index`
        (the override's caller keeps that bookkeeping, in its own layout).
    Returns:
      Output with fp32 logits.
    """
    dtype = jnp.dtype(cfg.dtype)
    tr = params["transformer"]
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    if layer_attention is None:
        mask, slots = attention_mask_for(cfg, tokens, attention_mask, segment_ids, cache)
    else:
        mask = slots = None
    cos, sin = layers.rope_angles(positions, cfg.head_dim, cfg.theta)
    x = layers.embed_tokens(tokens, vision_mask, tr["wte"]["embedding"],
                            tr.get("vte", {}).get("embedding"), dtype)
    x = sharding.constrain(x, sharding.ACTIVATION)

    hidden: list[jax.Array] = []
    new_k = new_v = None
    if cfg.scan_layers:
        stacked = _scanned_layer_params(params, cfg)

        def body(carry: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
            lp, kl, vl = xs
            kv = None if kl is None else (kl, vl)
            out, kv = _block(carry, lp, cfg, cos, sin, mask, attention_fn, kv, slots,
                             layer_attention)
            kv_out = (None, None) if kv is None else kv
            return out, (carry if output_hidden_states else None, *kv_out)

        xs = (stacked, None, None) if cache is None else (stacked, cache.k, cache.v)
        x, (layer_inputs, new_k, new_v) = jax.lax.scan(body, x, xs)
        if output_hidden_states:
            hidden = list(layer_inputs)
    else:
        ks, vs = [], []
        for i in range(cfg.num_hidden_layers):
            lp = tr["h"][str(i)]
            if output_hidden_states:
                hidden.append(x)
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = _block(x, lp, cfg, cos, sin, mask, attention_fn, kv, slots, layer_attention)
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        if cache is not None:
            new_k, new_v = jnp.stack(ks), jnp.stack(vs)

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
        new_cache = kvc.KVCache(k=new_k, v=new_v, valid=cache.valid, index=cache.index)
    elif cache is not None:
        new_cache = kvc.advance(cache, new_k, new_v, slots, attention_mask.astype(jnp.bool_))
    return Output(text_logits, vision_logits, tuple(hidden) if output_hidden_states else None,
                  new_cache)
