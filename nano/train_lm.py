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


def init_model(cfg: ModelConfig, seed: int, code_features: np.ndarray | None = None) -> Params:
    """Reference-style random init; the used codes' embeddings start from what they depict.

    `code_features` [n_codes, F] (the VQGAN codebook's descriptors of colour and
    cell brightness) is written, scaled, into the first F dims of those codes'
    vision embeddings, so the model does not have to discover from scratch that
    two codes are the same colour.
    """
    params = init_params(cfg, jax.random.PRNGKey(seed))
    params = jax.tree_util.tree_map(np.array, params)
    if code_features is not None:
        vte = params["transformer"]["vte"]["embedding"]
        f = np.asarray(code_features, np.float32)
        f = f / (np.abs(f).max() + 1e-6) * 0.5
        vte[: f.shape[0], : f.shape[1]] = f
    return params


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
    return text + vision_weight * _cross_entropy(h @ k, t, use_v)


def make_update(cfg: ModelConfig, optimizer, used_codes: int, vision_weight: float = VISION_WEIGHT) -> Callable:
    """One jitted step per (shape, drawing?): (params, opt_state, batch, draw) -> (params, opt_state, loss)."""

    def update(params, opt_state, batch, draw):
        loss, grads = jax.value_and_grad(_loss)(params, cfg, batch, draw, used_codes, vision_weight)
        import optax  # training only

        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(update, static_argnums=3, donate_argnums=(0, 1))


def to_device(batch: Batch) -> dict[str, jax.Array]:
    return {
        "ids": jnp.asarray(batch.ids), "vision": jnp.asarray(batch.vision),
        "target": jnp.asarray(batch.target), "target_vision": jnp.asarray(batch.target_vision),
        "valid": jnp.asarray(batch.valid), "positions": jnp.asarray(batch.positions),
        "weight": jnp.asarray(batch.weight),
    }
