"""RingAttention and the sequence-sharded KV cache: the shard_map / ppermute schedules.

All attention math (tiles, online-softmax merges, the cross-device merge) is in
model/attention.py; this module only decides which device computes what and
moves blocks between devices over the sequence axis `sp` of the mesh.

Three schedules, each a `shard_map` over the whole mesh:

* **ring** (prefill of a sequence, no cache or within a prefill chunk): queries
  and keys are sharded along the sequence; each of the `sp` steps computes the
  local queries against the key/value block it holds, merges into fp32
  accumulators, and passes the block to the next device with `ppermute`.
* **chunk vs cache** (chunked prefill): besides the ring within the chunk, the
  chunk's query blocks travel the same ring with their fp32 accumulators while
  the cache stays put; each device adds its cache shard's partial to the
  visiting block (`attention.merge`, the online-softmax merge) and writes the
  visiting key/value tokens whose slots it owns. Nothing of size chunk or
  cache is ever gathered: per device O(chunk/sp) activations and
  (q_block x k_block) score tiles over its own shard.
* **decode**: the new token's query is replicated; per-shard partials over the
  cache are merged with pmax + psum.

Load balance: the **striped** order. Token (or cache slot) p lives on sequence
shard p % sp, at local offset p // sp. We chose striping over zig-zag because
with causal masking every (query block, key block) pair then has the same
shape on every device at every ring step (each step every device skips the
same upper-triangle tiles), not merely the same total over the ring; because
the permutation is a reshape (no index tables); and because the same layout
for the cache makes decode balanced too: slot p is written by device p % sp,
so the filled part of the cache grows evenly on every shard and the per-shard
decode work stays equal (contiguous sharding would leave all but one device
with nothing valid for the first S/sp tokens). Causal masks use GLOBAL
positions/slots, so the layout never changes a result.

Lengths that do not divide `sp` are left-padded with masked tokens (left, so
the last real token stays last after striping); tiles are chosen per local
shape by `attention.choose_tiles`, and `attention.blockwise_partial` clamps a
ragged last tile instead of padding (nothing of size chunk or cache is copied).
Per ring step, the tiles a device computes are the ones its striped block pair
leaves visible; the rest are skipped by the kernel's table, so the ring does the
single-device kernel's work in sp pieces (bench/ring.py compares the two).

The cache made by `sharding.init_sharded_cache` is in the striped layout
(physical index j on shard d holds slot (j - d * S/sp) * sp + d); `valid` is
stored in the same physical order, `index` counts slots as usual.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from lwm_serve.model import attention as attn
from lwm_serve.model import kv_cache as kvc
from lwm_serve.model import sharding
from lwm_serve.model import transformer
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.params import Params

SP = sharding.SEQUENCE_AXIS


# --------------------------------------------------------------------------- striped layout


def stripe(x: jax.Array, sp: int, axis: int = 1) -> jax.Array:
    """Reorder `axis` so that contiguous shard d holds positions d, d+sp, d+2sp, ..."""
    if sp == 1:
        return x
    n = x.shape[axis]
    y = x.reshape(*x.shape[:axis], n // sp, sp, *x.shape[axis + 1:])
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def unstripe(x: jax.Array, sp: int, axis: int = 1) -> jax.Array:
    """Inverse of `stripe`."""
    if sp == 1:
        return x
    n = x.shape[axis]
    y = x.reshape(*x.shape[:axis], sp, n // sp, *x.shape[axis + 1:])
    return jnp.swapaxes(y, axis, axis + 1).reshape(x.shape)


def physical_index(slot: jax.Array, max_length: int, sp: int) -> jax.Array:
    """Where slot `slot` is stored in a striped cache of `max_length` slots (-1 -> out of range)."""
    phys = (slot % sp) * (max_length // sp) + slot // sp
    return jnp.where(slot >= 0, phys, max_length)


def _left_pad(x: jax.Array, pad: int, value) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (pad, 0)
    return jnp.pad(x, widths, constant_values=value)


# --------------------------------------------------------------------------- specs


class _Specs(NamedTuple):
    q: PartitionSpec        # [B, T, N, D]
    kv: PartitionSpec       # [B, T, K, D]
    tok: PartitionSpec      # [B, T]
    q_rep: PartitionSpec    # [B, T, N, D], T replicated over sp (decode)
    tok_rep: PartitionSpec  # [B, T]
    cache: PartitionSpec    # [B, K, S, D] (head-major)
    valid: PartitionSpec    # [B, S]


def _entries(spec: PartitionSpec, ndim: int) -> list:
    return list(spec) + [None] * (ndim - len(spec))


def _specs(mesh: Mesh, batch: int, kv_heads: int) -> _Specs:
    """Consistent specs: q and k/v heads are split over tp only when the kv heads divide."""
    sp = mesh.shape[SP]
    kv = _entries(sharding.spec_for(sharding.KEY_VALUE, (batch, sp, kv_heads, 1), mesh), 4)
    b_ax, t_ax, h_ax = kv[0], kv[1], kv[2]
    cache = _entries(sharding.spec_for(sharding.CACHE_KV, (batch, kv_heads, sp, 1), mesh), 4)
    s_ax = cache[2]
    return _Specs(
        q=PartitionSpec(b_ax, t_ax, h_ax), kv=PartitionSpec(b_ax, t_ax, h_ax),
        tok=PartitionSpec(b_ax, t_ax), q_rep=PartitionSpec(b_ax, None, h_ax),
        tok_rep=PartitionSpec(b_ax), cache=PartitionSpec(b_ax, h_ax, s_ax),
        valid=PartitionSpec(b_ax, s_ax))


# --------------------------------------------------------------------------- local schedules
# These run inside shard_map: every array is the local shard.


def _ring_partial(q, k, v, q_index, k_index, k_valid, q_segment, k_segment, *, sp: int,
                  q_block: int, k_block: int) -> attn.Partial:
    """Local queries against every device's key block, passed around the ring.

    The key/value block travels head-major ([B, K, T/sp, D], transposed once
    before the ring), so each step's tiles are slices of what arrived.
    """
    perm = [(i, (i + 1) % sp) for i in range(sp)]
    b, t, n, d = q.shape
    use_segments = q_segment is not None

    def step(carry, _):
        acc, blk = carry
        kb, vb, ki, kv, ks = blk
        part = attn.blockwise_partial(q, kb, vb, q_index, ki, kv, q_block=q_block, k_block=k_block,
                                      q_segment=q_segment if use_segments else None,
                                      k_segment=ks if use_segments else None)
        acc = attn.merge(acc, part)
        # Send our block on, receive the previous device's. After sp steps every
        # block has visited every device (the last send returns it home).
        blk = jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, SP, perm), blk)
        return (acc, blk), None

    segs = k_segment if use_segments else jnp.zeros((), jnp.int32)
    init = (attn.empty_partial(b, t, n, d),
            (attn.head_major(k), attn.head_major(v), k_index, k_valid, segs))
    (acc, _), _ = jax.lax.scan(step, init, None, length=sp)
    return acc


def _cache_slots(batch: int, local_len: int, sp: int) -> jax.Array:
    """[B, S/sp] slot held at each local physical index of this shard (striped)."""
    d = jax.lax.axis_index(SP)
    return jnp.broadcast_to(jnp.arange(local_len, dtype=jnp.int32) * sp + d, (batch, local_len))


def _write_local(cache_k, cache_v, new_k, new_v, slots, *, sp: int):
    """Write the tokens whose slot this shard owns; others (and slot -1) are dropped."""
    local_len = cache_k.shape[2]
    d = jax.lax.axis_index(SP)
    mine = (slots >= 0) & (slots % sp == d)
    local = jnp.where(mine, slots // sp, local_len)
    return kvc.update_layer(cache_k, cache_v, new_k, new_v, local)


def _ring_local(q, k, v, q_index, k_index, k_valid, q_segment, k_segment, *, sp, q_block, k_block):
    if q_block <= 0:  # chosen per local shape (attention.choose_tiles)
        q_block, k_block = attn.choose_tiles(q.shape[1], k.shape[1], batch=q.shape[0], heads=q.shape[2])
    part = _ring_partial(q, k, v, q_index, k_index, k_valid, q_segment, k_segment, sp=sp,
                         q_block=q_block, k_block=k_block)
    return attn.finalize_or_zero(part, q.dtype)


def _prefill_local(q, k, v, slots, tok_valid, cache_k, cache_v, cache_valid, *, sp):
    """One prefill chunk, all in O(chunk / sp) memory per device.

    Two blocks travel the ring together for sp steps: the chunk's key/value
    block (RingAttention within the chunk; each device also writes the visiting
    tokens whose slots it owns into its cache shard), and the query block with
    its fp32 accumulator for the cache so far (the cache never moves; each
    device adds its shard's partial to the visiting queries). After sp steps
    both blocks are home: the key block has been written everywhere it belongs,
    the query block has seen every cache shard. The key/value block travels
    head-major, the layout of the cache and of the kernel's tiles.
    """
    perm = [(i, (i + 1) % sp) for i in range(sp)]
    b, t, n, d = q.shape
    k_slots = _cache_slots(cache_k.shape[0], cache_k.shape[2], sp)
    within_tiles = attn.choose_tiles(t, t, batch=b, heads=n)
    cache_tiles = attn.choose_tiles(t, cache_k.shape[2], batch=b, heads=n)

    def step(carry, _):
        within, kv_blk, q_blk, cache_k, cache_v = carry
        kb, vb, kslot, kvalid = kv_blk
        within = attn.merge(within, attn.blockwise_partial(
            q, kb, vb, slots, kslot, kvalid, q_block=within_tiles.q, k_block=within_tiles.k))
        cache_k, cache_v = _write_local(cache_k, cache_v, attn.head_major(kb), attn.head_major(vb),
                                        kslot, sp=sp)
        qb, qslot, past = q_blk
        # Only slots valid before this chunk: the chunk itself is the ring's part.
        past = attn.merge(past, attn.blockwise_partial(
            qb, cache_k, cache_v, qslot, k_slots, cache_valid, q_block=cache_tiles.q,
            k_block=cache_tiles.k))
        kv_blk, q_blk = jax.tree_util.tree_map(
            lambda x: jax.lax.ppermute(x, SP, perm), (kv_blk, (qb, qslot, past)))
        return (within, kv_blk, q_blk, cache_k, cache_v), None

    empty = attn.empty_partial(b, t, n, d)
    init = (empty, (attn.head_major(k), attn.head_major(v), slots, tok_valid), (q, slots, empty),
            cache_k, cache_v)
    (within, _, (_, _, past), cache_k, cache_v), _ = jax.lax.scan(step, init, None, length=sp)
    out = attn.finalize_or_zero(attn.merge(within, past), q.dtype)
    return out, cache_k, cache_v


def _decode_local(q, k, v, slots, cache_k, cache_v, cache_valid, *, sp):
    """Replicated new token(s): write to the owning shard, attend per shard, merge across sp.

    One query per row: the whole shard is one tile (a [B, 1, S/sp] mask is cheap),
    as in the single-device decode.
    """
    cache_k, cache_v = _write_local(cache_k, cache_v, k, v, slots, sp=sp)
    k_slots = _cache_slots(cache_k.shape[0], cache_k.shape[2], sp)
    part = attn.attend_block(q, cache_k, cache_v, attn.index_mask(slots, k_slots, cache_valid))
    out = attn.finalize_or_zero(attn.combine_across(part, SP), q.dtype)
    return out, cache_k, cache_v


# --------------------------------------------------------------------------- global ops


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array,
                   k_index: jax.Array, k_valid: jax.Array, *, mesh: Mesh, q_block: int = 0,
                   k_block: int = 0, q_segment: jax.Array | None = None,
                   k_segment: jax.Array | None = None) -> jax.Array:
    """RingAttention over sequence-sharded q, k, v (already in the striped order).

    Args:
      q: [B, T, N, D]; k, v: [B, T, K, D]; T a multiple of sp.
      q_index, k_index: [B, T] global positions (causal mask); k_valid: [B, T].
      q_segment, k_segment: optional [B, T] segment ids.
      q_block, k_block: tile sizes; 0 (default): `attention.choose_tiles` for
        the local shard's shape.
    Returns:
      [B, T, N, D] in q.dtype (0 for queries with no valid key).
    """
    sp = mesh.shape[SP]
    if q.shape[1] % sp:
        raise ValueError(f"ring_attention: length {q.shape[1]} is not a multiple of sp={sp}; "
                         "pad it (forward_ring does)")
    s = _specs(mesh, q.shape[0], k.shape[2])
    use_seg = q_segment is not None and k_segment is not None
    seg_spec = s.tok if use_seg else PartitionSpec()
    fn = jax.shard_map(
        functools.partial(_ring_local, sp=sp, q_block=q_block, k_block=k_block),
        mesh=mesh, in_specs=(s.q, s.kv, s.kv, s.tok, s.tok, s.tok, seg_spec, seg_spec),
        out_specs=s.q, check_vma=False)
    if not use_seg:
        q_segment = k_segment = None
    return fn(q, k, v, q_index, k_index, k_valid, q_segment, k_segment)


def _prefill_op(mesh: Mesh, slots: jax.Array, tok_valid: jax.Array,
                cache_valid: jax.Array) -> transformer.LayerAttentionFn:
    sp = mesh.shape[SP]

    def op(q, k, v, kv):
        s = _specs(mesh, q.shape[0], k.shape[2])
        fn = jax.shard_map(
            functools.partial(_prefill_local, sp=sp),
            mesh=mesh, in_specs=(s.q, s.kv, s.kv, s.tok, s.tok, s.cache, s.cache, s.valid),
            out_specs=(s.q, s.cache, s.cache), check_vma=False)
        out, ck, cv = fn(q, k, v, slots, tok_valid, kv[0], kv[1], cache_valid)
        return out, (ck, cv)

    return op


def _decode_op(mesh: Mesh, slots: jax.Array,
               cache_valid: jax.Array) -> transformer.LayerAttentionFn:
    sp = mesh.shape[SP]

    def op(q, k, v, kv):
        s = _specs(mesh, q.shape[0], k.shape[2])
        fn = jax.shard_map(
            functools.partial(_decode_local, sp=sp),
            mesh=mesh, in_specs=(s.q_rep, s.q_rep, s.q_rep, s.tok_rep, s.cache, s.cache, s.valid),
            out_specs=(s.q_rep, s.cache, s.cache), check_vma=False)
        out, ck, cv = fn(q, k, v, slots, kv[0], kv[1], cache_valid)
        return out, (ck, cv)

    return op


# --------------------------------------------------------------------------- sharded forwards


def _unpermute(x: jax.Array | None, sp: int, pad: int) -> jax.Array | None:
    return None if x is None else unstripe(x, sp)[:, pad:]


def forward_ring(params: Params, cfg: ModelConfig, mesh: Mesh, tokens: jax.Array,
                 vision_mask: jax.Array, positions: jax.Array, *,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 heads: Sequence[transformer.Head] = ("text", "vision"), last_only: bool = False,
                 output_hidden_states: bool = False) -> transformer.Output:
    """`transformer.forward` without a cache, attention by RingAttention over `sp`.

    Same arguments and outputs (in the caller's token order) as
    `transformer.forward`; outputs at left-pad positions are not meaningful
    (as in the reference). Any length works: it is left-padded to a multiple of sp.
    """
    sp = mesh.shape[SP]
    b, t = tokens.shape
    pad = -t % sp
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    index = jnp.broadcast_to(jnp.arange(-pad, t, dtype=jnp.int32), (b, t + pad))
    prep = lambda x, value: stripe(_left_pad(x, pad, value), sp)  # noqa: E731
    tokens_s, vmask_s, pos_s = prep(tokens, 0), prep(vision_mask, False), prep(positions, 0)
    valid_s, index_s = prep(attention_mask.astype(jnp.bool_), False), stripe(index, sp)
    seg_s = None if segment_ids is None else prep(segment_ids, -1)

    def op(q, k, v, kv):
        del kv
        out = ring_attention(q, k, v, index_s, index_s, valid_s, mesh=mesh, q_segment=seg_s,
                             k_segment=seg_s)
        return out, None

    with sharding.use_mesh(mesh):
        out = transformer.forward(params, cfg, tokens_s, vmask_s, pos_s,
                                  attention_mask=valid_s.astype(jnp.int32), heads=heads,
                                  last_only=last_only, output_hidden_states=output_hidden_states,
                                  layer_attention=op)
    fix = (lambda x: x) if last_only else (lambda x: _unpermute(x, sp, pad))
    hidden = None
    if out.hidden_states is not None:
        hidden = tuple(_unpermute(h, sp, pad) for h in out.hidden_states)
    return transformer.Output(fix(out.text_logits) if out.text_logits is not None else None,
                              fix(out.vision_logits) if out.vision_logits is not None else None,
                              hidden, None)


def forward_cached(params: Params, cfg: ModelConfig, mesh: Mesh, tokens: jax.Array,
                   vision_mask: jax.Array, positions: jax.Array, cache: kvc.KVCache, *,
                   attention_mask: jax.Array | None = None,
                   heads: Sequence[transformer.Head] = ("text", "vision"),
                   last_only: bool = False) -> transformer.Output:
    """`transformer.forward` with a striped, sequence-sharded cache (from `init_sharded_cache`).

    T > 1 (a prefill chunk): ring within the chunk + the cache so far, then the
    chunk is written to the shards owning its slots. T == 1 (decode): the
    replicated token is written to its shard and attends per shard.
    Returns logits in the caller's order (only the last position with
    `last_only`) and the updated cache (valid/index advanced by T).
    """
    sp = mesh.shape[SP]
    b, t = tokens.shape
    max_len = cache.max_length
    if max_len % sp:
        raise ValueError(f"cache length {max_len} is not a multiple of sp={sp}; "
                         "create it with sharding.init_sharded_cache")
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    tok_valid = attention_mask.astype(jnp.bool_)
    slots = kvc.write_slots(cache, t)                                        # [B, T]
    rows = jnp.arange(b)[:, None]
    new_valid = cache.valid.at[rows, physical_index(slots, max_len, sp)].set(tok_valid, mode="drop")
    decode = t == 1
    if decode:
        pad = 0
        op = _decode_op(mesh, slots, new_valid)
        inputs = (tokens, vision_mask, positions, tok_valid)
    else:
        pad = -t % sp
        prep = lambda x, value: stripe(_left_pad(x, pad, value), sp)  # noqa: E731
        op = _prefill_op(mesh, prep(slots, -1), prep(tok_valid, False), cache.valid)
        inputs = (prep(tokens, 0), prep(vision_mask, False), prep(positions, 0), prep(tok_valid, False))
    with sharding.use_mesh(mesh):
        out = transformer.forward(params, cfg, inputs[0], inputs[1], inputs[2],
                                  attention_mask=inputs[3].astype(jnp.int32), cache=cache,
                                  heads=heads, last_only=last_only, layer_attention=op)
    new_cache = kvc.KVCache(k=out.cache.k, v=out.cache.v, valid=new_valid, index=cache.index + t)
    fix = (lambda x: x) if (last_only or decode) else (lambda x: _unpermute(x, sp, pad))
    return transformer.Output(fix(out.text_logits) if out.text_logits is not None else None,
                              fix(out.vision_logits) if out.vision_logits is not None else None,
                              None, new_cache)
