"""Training LWM-Nano's language model: the served forward, a dense attention, optax AdamW.

The loss runs `model.transformer.forward` itself (the function that serves the
model), with a causal softmax attention by query blocks swapped in, because the serving
kernel's tile skipping is not differentiable. Logits are computed only where a target
is trained, and the vision head only for batches that draw.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.model import attention as attn
from lwm_serve.model import layers
from lwm_serve.model import transformer
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.params import init_params
from lwm_serve.nano.data import IGNORE, Batch
from lwm_serve.tokenizers import vision_layout as vl

logger = logging.getLogger(__name__)

Params = dict[str, Any]


_BLOCK = 256


def causal_blocked_attention(q, k, v, mask):
    """Softmax attention, query block by query block over the keys up to that block.

    The same math as `attention.dense_attention` (its `attend_block`); skipping the
    keys after each query block halves the cost of long rows, and the loop is
    unrolled, so reverse-mode differentiation sees plain array ops.
    """
    t = q.shape[1]
    outs = []
    for start in range(0, t, _BLOCK):
        end = min(start + _BLOCK, t)
        part = attn.attend_block(q[:, start:end], attn.head_major(k[:, :end]), attn.head_major(v[:, :end]),
                                 mask[:, start:end, :end])
        outs.append(attn.finalize(part, q.dtype))
    return jnp.concatenate(outs, axis=1)


def init_model(cfg: ModelConfig, seed: int, code_features: np.ndarray | None = None,
               frame_heads: tuple[int, ...] = ()) -> Params:
    """Reference-style random init; the used codes' embeddings start from what they depict.

    `code_features` [n_codes, F] (the VQGAN codebook's descriptors of colour and
    cell brightness) is written, scaled, into the first F dims of those codes'
    vision embeddings, so the model does not have to discover from scratch that
    two codes are the same colour.

    `frame_heads`: offsets (in tokens) that heads 0, 1, ... of the first layer start out
    attending to (`_add_offset_heads`), e.g. 257, the same patch
    one frame back.
    """
    params = init_params(cfg, jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(np.array, params)
    if code_features is not None:
        vte = params["transformer"]["vte"]["embedding"]
        f = np.asarray(code_features, np.float32)
        f = f / (np.abs(f).max() + 1e-6) * 0.5
        vte[: f.shape[0], : f.shape[1]] = f
    if frame_heads:
        _add_offset_heads(params, cfg, frame_heads)
    return params


# With offset heads, every embedding's last dimension is this many times the RMS of its
# other dimensions: after the first RMSNorm it is then the same constant for every token.
_CONSTANT_RATIO = 4.0


def offset_amplitudes(cfg: ModelConfig, offset: int, margin: float = 8.0, span: int = 2048) -> np.ndarray:
    """[head_dim/2] logit amplitude per RoPE frequency so that sum_i a_i cos(theta_i (d - offset))
    is the largest at d = offset by at least `margin` over every other distance d in [0, span).

    The least total amplitude that does it (a linear program): the frequencies of a
    32-dim head are mostly slow, and only the fastest can tell 257 from 256.
    """
    from scipy.optimize import linprog  # a dependency of jax

    theta = layers.rope_inv_freq(cfg.head_dim, cfg.theta).astype(np.float64)
    gaps = np.array([d - offset for d in range(span) if d != offset], np.float64)
    drop = 1.0 - np.cos(np.outer(gaps, theta))
    n = len(theta)
    res = linprog(np.ones(n), A_ub=-drop, b_ub=-margin * np.ones(len(gaps)), bounds=[(0, None)] * n)
    if res.status != 0:
        raise ValueError(f"no RoPE amplitudes single out offset {offset}: {res.message}")
    return res.x


def _constant_column(table):
    """The last dim every embedding row carries: `_CONSTANT_RATIO` x the RMS of its other dims."""
    h = table.shape[1] - 1
    xp = jnp if isinstance(table, jax.Array) else np
    return _CONSTANT_RATIO * xp.sqrt(xp.mean(xp.square(table[:, :h]), axis=1))


def _offset_head_qk(cfg: ModelConfig, offsets: tuple[int, ...]) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(layer, head, q row, k row) of each offset head: what the constant dim maps to."""
    h = cfg.hidden_size - 1
    level = _CONSTANT_RATIO * np.sqrt(cfg.hidden_size / (h + _CONSTANT_RATIO ** 2))  # after the RMSNorm
    if len(offsets) > cfg.num_attention_heads:
        # A head of the second layer reads the constant through a norm of a residual the
        # first layer has grown: measured, it kept 0.002 of its mass at its offset.
        raise ValueError(f"{len(offsets)} offset heads: only the first layer's "
                         f"{cfg.num_attention_heads} heads can be built to attend a fixed distance")
    theta = layers.rope_inv_freq(cfg.head_dim, cfg.theta)
    out = []
    for head, offset in enumerate(offsets):
        layer = 0
        amp = offset_amplitudes(cfg, offset)
        scale = np.sqrt(amp * np.sqrt(cfg.head_dim)) / level
        q = np.zeros(cfg.head_dim, np.float32)
        k = np.zeros(cfg.head_dim, np.float32)
        q[0::2], q[1::2] = scale * np.cos(theta * offset), -scale * np.sin(theta * offset)
        k[0::2] = scale
        out.append((layer, head, q, k))
    return out


def _add_offset_heads(params: Params, cfg: ModelConfig, offsets: tuple[int, ...]) -> None:
    """Make head j of the first layer attend `offsets[j]` tokens back, whatever the tokens are.

    A head that compares a patch with the same patch a frame (257 tokens) earlier is
    what motion needs, and SGD does not find it from a random start: attention spread
    over hundreds of keys gives the right key a gradient too small to grow (measured:
    a random init does not learn to copy a frame of random codes in 300 steps; with
    such a head it does in 100). Here every token carries a last dimension that the
    first RMSNorm turns into the same constant for every token (`_CONSTANT_RATIO`); the
    head's query and key read only it, and their rotary phases differ by offset x
    frequency, so q.k peaks at that distance (`offset_amplitudes`). Values and outputs
    stay random: what the head moves is learnt. Training keeps the construction in
    place (`pin_offset_heads`): left free, the first steps' gradients wash it out.
    """
    h = cfg.hidden_size - 1
    t = params["transformer"]
    for name in ("wte", "vte"):
        t[name]["embedding"][:, h] = _constant_column(t[name]["embedding"])
    for layer, head, q, k in _offset_head_qk(cfg, offsets):
        attn_p = t["h"][str(layer)]["attention"]
        cols = slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)
        attn_p["wq"]["kernel"][:, cols] = 0.0
        attn_p["wk"]["kernel"][:, cols] = 0.0
        attn_p["wq"]["kernel"][h, cols] = q
        attn_p["wk"]["kernel"][h, cols] = k


def pin_offset_heads(cfg: ModelConfig, offsets: tuple[int, ...]) -> Callable[[Params], Params]:
    """params -> params with the offset heads put back as `_add_offset_heads` built them.

    Measured: left free, the heads of a direction-only run attended their offset with
    0.00-0.07 of their mass after 700 steps (0.69 for one of five), and the model never
    predicted a patch from the frame before; pinned, they kept 0.99 and the run answered
    direction above chance. Pinned after every update: the heads' query and key columns,
    the embeddings' constant dim (recomputed from their other dims, which train) and the
    first norm's gain on it. Pure, for the jitted step.
    """
    h = cfg.hidden_size - 1
    heads = _offset_head_qk(cfg, offsets)

    def pin(params: Params) -> Params:
        t = dict(params["transformer"])
        for name in ("wte", "vte"):
            table = t[name]["embedding"]
            t[name] = {**t[name], "embedding": table.at[:, h].set(_constant_column(table))}
        first = dict(t["h"]["0"])
        norm = first["attention_norm"]["kernel"]
        first["attention_norm"] = {**first["attention_norm"], "kernel": norm.at[h].set(1.0)}
        a = dict(first["attention"])
        for _, head, q, k in heads:
            cols = slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)
            for name, row in (("wq", q), ("wk", k)):
                w = a[name]["kernel"]
                a[name] = {**a[name], "kernel": w.at[:, cols].set(0.0).at[h, cols].set(jnp.asarray(row, w.dtype))}
        first["attention"] = a
        t["h"] = {**t["h"], "0": first}
        return {**params, "transformer": t}

    return pin


VISION_WEIGHT = 0.5  # next-code loss next to the answers' loss


def _cross_entropy(logits: jax.Array, target: jax.Array, use: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Sum of weight x cross-entropy over the used targets, divided by their number (not their weight:
    a heavier answer token adds to the loss rather than taking the template's share)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
    if weight is not None:
        picked = picked * weight
    return -jnp.sum(jnp.where(use, picked, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def _loss(params: Params, cfg: ModelConfig, batch: dict[str, jax.Array], full_vision_vocab: bool,
          used_codes: int, vision_weight: float = VISION_WEIGHT) -> jax.Array:
    """Answers' cross-entropy + VISION_WEIGHT x next-code cross-entropy.

    Drawing batches take the softmax over the whole vision vocabulary, so codes
    the VQGAN never uses are pushed down where sampling would meet them; other
    batches over the used codes and the two delimiters only (8x cheaper), weighted
    `vision_weight` (0: the media's codes are not trained, only the answers).
    """
    out = transformer.forward(params, cfg, batch["ids"], batch["vision"], batch["positions"],
                              attention_mask=batch["valid"], heads=(), output_hidden_states=True,
                              attention_fn=causal_blocked_attention)
    h = out.hidden_states[-1]  # ln_f output [B, T, H]
    target = batch["target"]
    trained = target != IGNORE
    text = _cross_entropy(h @ params["lm_head"]["kernel"], target, trained & ~batch["target_vision"],
                          batch["weight"])
    kernel = params["vision_head"]["kernel"]
    use_v = trained & batch["target_vision"]
    if full_vision_vocab:
        return text + VISION_WEIGHT * _cross_entropy(h @ kernel, target, use_v)
    if not vision_weight:
        return text
    k = jnp.concatenate([kernel[:, :used_codes], kernel[:, vl.END_OF_FRAME:vl.END_OF_VISION + 1]], axis=1)
    t = jnp.where(target >= vl.END_OF_FRAME, target - vl.END_OF_FRAME + used_codes, target)
    return text + vision_weight * _cross_entropy(h @ k, t, use_v, batch["weight"])


def make_update(cfg: ModelConfig, optimizer, used_codes: int, vision_weight: float = VISION_WEIGHT,
                pin: Callable[[Params], Params] | None = None) -> Callable:
    """One jitted step per (shape, drawing?): (params, opt_state, batch, draw) -> (params, opt_state, loss).

    `pin` (e.g. `pin_offset_heads`) is applied to the updated params.
    """

    def update(params, opt_state, batch, draw):
        loss, grads = jax.value_and_grad(_loss)(params, cfg, batch, draw, used_codes, vision_weight)
        import optax  # training only

        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (pin(params) if pin is not None else params), opt_state, loss

    return jax.jit(update, static_argnums=3, donate_argnums=(0, 1))


def to_device(batch: Batch) -> dict[str, jax.Array]:
    return {
        "ids": jnp.asarray(batch.ids), "vision": jnp.asarray(batch.vision),
        "target": jnp.asarray(batch.target), "target_vision": jnp.asarray(batch.target_vision),
        "valid": jnp.asarray(batch.valid), "positions": jnp.asarray(batch.positions),
        "weight": jnp.asarray(batch.weight),
    }
