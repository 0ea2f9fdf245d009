"""The LLaMA building blocks of LWM: RMSNorm, RoPE, SwiGLU MLP, embeddings, heads.

Pure functions over arrays. Parameter names in comments are the reference's
(`attention_norm/kernel`, `feed_forward/w1/kernel`, ...); kernels are stored
(in_features, out_features) and applied as `x @ kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """RMSNorm computed in fp32 whatever the compute dtype, as the reference does.

    Args:
      x: [..., H] activations.
      weight: [H] scale (`*_norm/kernel`).
    Returns:
      [..., H] in `dtype`.
    """
    x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
    # rsqrt rather than 1/sqrt: one op, and the reference's numerics.
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return normed.astype(dtype) * weight.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies, computed in numpy float32 like the reference's table."""
    exponents = np.arange(0, head_dim, 2)[: head_dim // 2].astype(np.float32) / head_dim
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotary angles for the given positions.

    The reference gathers rows of a precomputed [max_len, head_dim/2] table; at a
    1M context that table alone is 512 MB, so the angles are computed on the fly
    (same float32 math; the product differs from the table's float64 product by at
    most one float32 ulp). Angles are always fp32, even in a bf16 model: the
    reference builds its table in the compute dtype, which loses all precision
    at long positions in bf16.

    Args:
      positions: [B, T] int32 positions.
    Returns:
      (cos, sin), each [B, T, head_dim/2] float32.
    """
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved (GPT-J / Meta) rotary embedding.

    Channels (2i, 2i+1) of each head are the complex number x[2i] + j x[2i+1],
    multiplied by cos + j sin of angle i. This is NOT Hugging Face's rotate_half
    form; HF checkpoints are converted on load (model/checkpoint.py).

    Args:
      x: [B, T, N, D] queries or keys.
      cos, sin: [B, T, D/2].
    Returns:
      [B, T, N, D] in x.dtype.
    """
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = x32[..., 0], x32[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([real * c - imag * s, real * s + imag * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def dense(x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`nn.Dense` without bias: x @ kernel in the compute dtype."""
    return jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype))


def swiglu_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, w3: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """LLaMA MLP: w2(silu(w1 x) * w3 x). x [..., H] -> [..., H]."""
    return dense(jax.nn.silu(dense(x, w1, dtype)) * dense(x, w3, dtype), w2, dtype)


def embed_tokens(tokens: jax.Array, vision_mask: jax.Array, wte: jax.Array,
                 vte: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    """Per-position choice between the text and vision tables.

    Matches the reference's blend `text * (1 - m) + vis * m` (it gathers both
    tables, clamping the unused id to 0), which is exact for a 0/1 mask.

    Args:
      tokens: [B, T] ids; text ids index `wte`, vision ids index `vte`.
      vision_mask: [B, T] bool.
    Returns:
      [B, T, H] embeddings in `dtype`.
    """
    text = jnp.take(wte, jnp.where(vision_mask, 0, tokens), axis=0).astype(dtype)
    if vte is None:
        return text
    vision = jnp.take(vte, jnp.where(vision_mask, tokens, 0), axis=0).astype(dtype)
    return jnp.where(vision_mask[..., None], vision, text)
