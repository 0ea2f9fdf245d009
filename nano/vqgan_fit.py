"""LWM-Nano's VQGAN: the reference architecture at small width, fitted to the world.

The encoder is *constructed*, not trained: its convolutions are set so that a
16x16 patch becomes a descriptor of what the world's frames hold there,

    * the patch's mean red, green and blue (in [0, 1]);
    * the mean brightness (R+G+B)/3 of each of its 4x4 cells of 4x4 px,

using only what the architecture offers: the stem copies the channels, each
stride-2 downsampling conv either averages 2x2 pixels or moves them into
channels (space to depth), every residual block is the identity (its last conv
is zero), and the last level's shortcut conv writes each signal `s` into one
GroupNorm group of four channels, `s`, `1 - s`, `0.5 + A`, `0.5 - A` (the last two
constants, from the conv's bias). That matters: the encoder's final GroupNorm
(32 groups) then normalizes each group by a mean of exactly 0.5 and a variance that
the constants dominate (A^2 / 2, against at most 0.125 from the image), so a patch
gets the same code in every frame it appears in. (With the pair alone, the variance
followed the image's content, and pure black took 53 different codes.)

The codebook is fitted by k-means on descriptors of the world's frames (after
the H.264 round trip the server sees), `NUM_USED` codes; the other entries of
the reference's 8192-entry codebook are parked far away, so they are never the
nearest code. The decoder is trained (optax Adam, MSE) to draw frames back from
their codes; its residual blocks at the two finest levels are kept the identity,
and so are the upsampling convs into them (a centre-tap identity after the
nearest-neighbour repeat), which makes training many times cheaper.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.tokenizers import vqgan as vq

logger = logging.getLogger(__name__)

Params = dict[str, Any]

CONFIG = vq.VQGANConfig(hidden_channels=32, channel_mult=(1, 1, 1, 1, 4), num_res_blocks=1,
                        z_channels=32, quantized_embed_dim=32)
NUM_SIGNALS = 3 + 16  # mean R, G, B + brightness of 4x4 cells
NUM_USED = 1024  # codes fitted by k-means; the rest of the 8192 are parked
COLOR_WEIGHT = 2.0  # colour counts double in the code distance: a code must never mix colours
# Decoder blocks kept the identity (never trained): the residual blocks of the two
# finest levels and the upsampling convs into them, which then only repeat pixels.
# Edges are drawn at 4 px, the encoder's finest cell, by the final conv.
FROZEN_DECODER_BLOCKS = ("UpsamplingBlock_3", "UpsamplingBlock_4")
IDENTITY_UPSAMPLES = ("UpsamplingBlock_2", "UpsamplingBlock_3")
_GN_BIAS = 4.0  # keeps silu in its nearly linear range after the final GroupNorm
_GROUP = CONFIG.hidden_channels * CONFIG.channel_mult[-1] // 32  # channels per final GroupNorm group
_ANCHOR = 8.0  # the constants' distance from 0.5 in each group: they set the group's variance


def _zeros_like_tree(shapes: Params) -> Params:
    return jax.tree_util.tree_map(lambda s: np.zeros(s, np.float32), shapes, is_leaf=vq._is_shape)


def _identity_norms(tree: Params) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            if set(v) == {"scale", "bias"}:
                v["scale"][...] = 1.0
            else:
                _identity_norms(v)


def _avg_pool_taps(kernel: np.ndarray, channels: range) -> None:
    for c in channels:
        for a in (0, 1):
            for b in (0, 1):
                kernel[a, b, c, c] = 0.25


def constructed_encoder(cfg: vq.VQGANConfig = CONFIG) -> Params:
    """Encoder, quant_conv (and zero decoder/codebook) params computing the descriptor."""
    p = _zeros_like_tree(vq.param_shapes(cfg))
    _identity_norms(p)
    enc = p["encoder"]
    # Stem: [-1, 1] -> [0, 1] for R, G, B (ch 0-2) and brightness (ch 3).
    stem = enc["Conv_0"]
    for c in range(3):
        stem["kernel"][1, 1, c, c] = 0.5
        stem["kernel"][1, 1, c, 3] = 0.5 / 3
    stem["bias"][:4] = 0.5
    # 256 -> 128 -> 64: average 2x2 (4 px cells).
    for level in (0, 1):
        _avg_pool_taps(enc[f"DownsamplingBlock_{level}"]["Downsample_0"]["Conv_0"]["kernel"], range(4))
    # 64 -> 32: colour averaged, brightness of the 2x2 cells into ch 3 + 2a + b.
    k2 = enc["DownsamplingBlock_2"]["Downsample_0"]["Conv_0"]["kernel"]
    _avg_pool_taps(k2, range(3))
    for a in (0, 1):
        for b in (0, 1):
            k2[a, b, 3, 3 + 2 * a + b] = 1.0
    # 32 -> 16: colour averaged, the 4x4 cells into ch 3 + 4 * row + col.
    k3 = enc["DownsamplingBlock_3"]["Downsample_0"]["Conv_0"]["kernel"]
    _avg_pool_taps(k3, range(3))
    for a in (0, 1):
        for b in (0, 1):
            for am in (0, 1):
                for bm in (0, 1):
                    k3[a, b, 3 + 2 * am + bm, 3 + 4 * (2 * a + am) + (2 * b + bm)] = 1.0
    # Last level's shortcut: signal k into GroupNorm group k as (s, 1 - s, 0.5 + A, 0.5 - A).
    assert _GROUP == 4, "the final GroupNorm groups must hold four channels"
    sc = enc["DownsamplingBlock_4"]["ResnetBlock_0"]["Conv_2"]
    gn = enc["GroupNorm_0"]
    for k in range(NUM_SIGNALS):
        c = _GROUP * k
        sc["kernel"][0, 0, k, c] = 1.0
        sc["kernel"][0, 0, k, c + 1] = -1.0
        sc["bias"][c + 1] = 1.0
        sc["bias"][c + 2] = 0.5 + _ANCHOR
        sc["bias"][c + 3] = 0.5 - _ANCHOR
        # normalized, s - 0.5 is divided by about A / sqrt(2): scale it back to 2 (s - 0.5) in [-1, 1]
        gn["scale"][c] = math.sqrt(2.0) * _ANCHOR
        gn["bias"][c] = _GN_BIAS
    # Final conv: the centre tap of each group's signal channel, centred near 0.
    out = enc["Conv_1"]
    lo, hi = _silu(_GN_BIAS - 1), _silu(_GN_BIAS + 1)
    for k in range(NUM_SIGNALS):
        w = (COLOR_WEIGHT if k < 3 else 1.0) * 2.0 / (hi - lo)
        out["kernel"][1, 1, _GROUP * k, k] = w
        out["bias"][k] = -w * (hi + lo) / 2
    qc = p["quant_conv"]
    for k in range(cfg.z_channels):
        qc["kernel"][0, 0, k, k] = 1.0
    return p


def _silu(x: float) -> float:
    return x / (1 + math.exp(-x))


@jax.jit
def _descriptors(params: Params, frames: jax.Array) -> jax.Array:
    h = vq._encoder(params["encoder"], CONFIG, frames)
    return vq._conv(params["quant_conv"], h)  # [N, 16, 16, E]


def descriptors(params: Params, frames_u8: np.ndarray, batch: int = 16) -> np.ndarray:
    """Pre-quantization encoder outputs of uint8 frames [N, 256, 256, 3] -> [N, 16, 16, E]."""
    out = []
    for i in range(0, len(frames_u8), batch):
        x = np.asarray(frames_u8[i : i + batch], np.float32) / 127.5 - 1
        out.append(np.asarray(_descriptors(params, jnp.asarray(x))))
    return np.concatenate(out)


def kmeans(points: np.ndarray, weights: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Weighted Lloyd k-means (deterministic for a seed); returns [k, E] centroids."""
    rng = np.random.default_rng(seed)
    # Init: k distinct points drawn in proportion to sqrt(weight), so that rare
    # edge patterns are represented, not just the black background.
    prob = np.sqrt(weights) / np.sqrt(weights).sum()
    idx = rng.choice(len(points), size=min(k, len(points)), replace=False, p=prob)
    cent = points[idx].astype(np.float32)
    pts = jnp.asarray(points, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)

    @jax.jit
    def step(cent):
        d = jnp.sum(pts**2, 1, keepdims=True) + jnp.sum(cent**2, 1)[None] - 2 * pts @ cent.T
        a = jnp.argmin(d, 1)
        sums = jax.ops.segment_sum(pts * w[:, None], a, num_segments=cent.shape[0])
        cnt = jax.ops.segment_sum(w, a, num_segments=cent.shape[0])
        new = jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1e-9)[:, None], cent)
        return new, jnp.sum(w * jnp.min(d, 1)) / jnp.sum(w)

    for i in range(iters):
        cent, err = step(cent)
    logger.info("k-means: %d codes, mean squared distance %.4f", k, float(err))
    return np.asarray(cent)


def codebook(centroids: np.ndarray, cfg: vq.VQGANConfig = CONFIG, seed: int = 0) -> np.ndarray:
    """The 8192-entry codebook: the fitted centroids first, the rest parked far away."""
    rng = np.random.default_rng(seed)
    book = np.zeros((cfg.num_embeddings, cfg.quantized_embed_dim), np.float32)
    book[: len(centroids), : centroids.shape[1]] = centroids
    far = rng.standard_normal((cfg.num_embeddings - len(centroids), cfg.quantized_embed_dim))
    book[len(centroids):] = 1e3 * far / np.linalg.norm(far, axis=1, keepdims=True)
    return book


def unique_descriptors(desc: np.ndarray, decimals: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicate patch descriptors (most are the black background): (points, counts)."""
    flat = np.round(desc.reshape(-1, desc.shape[-1]), decimals)
    pts, counts = np.unique(flat, axis=0, return_counts=True)
    return pts.astype(np.float32), counts.astype(np.float32)


# ----------------------------------------------------------------------------
# decoder training


def decoder_init(cfg: vq.VQGANConfig = CONFIG, seed: int = 0) -> Params:
    """Trainable decoder params: random convs, except the frozen blocks (identity)."""
    rand = vq.init_params(cfg, seed)
    dec = {"post_quant_conv": rand["post_quant_conv"], "decoder": rand["decoder"]}
    for name in FROZEN_DECODER_BLOCKS:
        del dec["decoder"][name]
    for name in IDENTITY_UPSAMPLES:
        dec["decoder"].get(name, {}).pop("Upsample_0", None)
    return jax.tree_util.tree_map(np.asarray, dec)


def _train_decoder_forward(dec: Params, book: jax.Array, codes: jax.Array) -> jax.Array:
    """vq.decode with the frozen blocks skipped: they add exact zeros or copy, so the same numbers."""
    cfg = CONFIG
    p = dec["decoder"]
    h = vq._conv(dec["post_quant_conv"], book[codes])
    h = vq._conv(p["Conv_0"], h)
    h = vq._mid_block(p["MidBlock_0"], h)
    for k, level in enumerate(reversed(range(cfg.num_resolutions))):
        name = f"UpsamplingBlock_{k}"
        blk = p.get(name, {})
        if name not in FROZEN_DECODER_BLOCKS:
            for j in range(cfg.num_res_blocks + 1):
                h = vq._resnet_block(blk[f"ResnetBlock_{j}"], h)
        if level == 0:
            continue
        if name in IDENTITY_UPSAMPLES:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        else:
            h = vq._upsample(blk["Upsample_0"], h)
    h = vq._conv(p["Conv_1"], jax.nn.silu(vq._group_norm(p["GroupNorm_0"], h)))
    return jnp.clip(h, -1, 1)


def full_params(encoder_params: Params, book: np.ndarray, dec: Params) -> Params:
    """The reference-format tree: constructed encoder, fitted codebook, trained decoder."""
    p = jax.tree_util.tree_map(np.array, encoder_params)
    p["quantize"]["embeddings"] = np.asarray(book, np.float32)
    p["post_quant_conv"] = jax.tree_util.tree_map(np.array, dec["post_quant_conv"])
    out = _zeros_like_tree(vq.param_shapes(CONFIG)["decoder"])
    _identity_norms(out)
    for name, sub in dec["decoder"].items():
        if name.startswith("UpsamplingBlock_"):
            out[name].update(jax.tree_util.tree_map(np.array, sub))
        else:
            out[name] = jax.tree_util.tree_map(np.array, sub)
    for name in IDENTITY_UPSAMPLES:
        kernel = out[name]["Upsample_0"]["Conv_0"]["kernel"]
        for c in range(kernel.shape[2]):
            kernel[1, 1, c, c] = 1.0
    p["decoder"] = out
    vq.check_params(p, CONFIG)
    return p


def train_decoder(codes_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], book: np.ndarray, steps: int,
                  lr: float = 2e-3, seed: int = 0, progress: Callable[[int, float], None] | None = None
                  ) -> tuple[Params, list[float]]:
    """Fit the decoder by MSE; `codes_fn(step)` gives (codes [B,16,16], frames [B,256,256,3] in [-1,1])."""
    import optax  # training only

    dec = decoder_init(CONFIG, seed)
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
    state = opt.init(dec)
    book_j = jnp.asarray(book)

    @jax.jit
    def update(dec, state, codes, frames):
        def loss_fn(d):
            return jnp.mean(jnp.square(_train_decoder_forward(d, book_j, codes) - frames))

        loss, grads = jax.value_and_grad(loss_fn)(dec)
        upd, state = opt.update(grads, state, dec)
        return optax.apply_updates(dec, upd), state, loss

    losses = []
    for step in range(steps):
        codes, frames = codes_fn(step)
        dec, state, loss = update(dec, state, jnp.asarray(codes), jnp.asarray(frames))
        losses.append(float(loss))
        if progress:
            progress(step, losses[-1])
    return jax.tree_util.tree_map(np.asarray, dec), losses


def _fast_descriptors(params: Params, frames_u8: jax.Array) -> jax.Array:
    """The constructed encoder with its identity blocks skipped (they add exact zeros)."""
    cfg, enc = CONFIG, params["encoder"]
    n = frames_u8.shape[0]
    x = frames_u8.astype(jnp.float32) / 127.5 - 1
    # Stem (a centre-tap conv) then levels 0-1 (two 2x2 averages) = a 4x4 mean.
    stem = enc["Conv_0"]
    h = x.reshape(n, 64, 4, 64, 4, 3).mean(axis=(2, 4)) @ stem["kernel"][1, 1] + stem["bias"]
    h = jnp.pad(h, ((0, 0), (0, 0), (0, 0), (0, cfg.hidden_channels - h.shape[-1])))
    for level in (2, 3):
        h = vq._downsample(enc[f"DownsamplingBlock_{level}"]["Downsample_0"], h)
    h = vq._conv(enc["DownsamplingBlock_4"]["ResnetBlock_0"]["Conv_2"], h)
    h = vq._conv(enc["Conv_1"], jax.nn.silu(vq._group_norm(enc["GroupNorm_0"], h)))
    return vq._conv(params["quant_conv"], h)


@jax.jit
def _fast_codes(params: Params, frames_u8: jax.Array) -> jax.Array:
    # The parked codes are never nearest, so searching the fitted ones gives the same argmin.
    return vq._quantize(params["quantize"]["embeddings"][:NUM_USED], _fast_descriptors(params, frames_u8))[1]


def fast_codes(params: Params, frames_u8: np.ndarray, batch: int = 64) -> np.ndarray:
    """Codes of uint8 frames [N, 256, 256, 3], the constructed encoder's shortcut.

    The residual blocks of the constructed encoder are the identity (their last
    conv is zero, so they add exact zeros) and its first levels only average;
    skipping them makes training data many times cheaper to encode. Only the
    order of float sums differs from `vq.encode`; `tests/nano` measures the
    agreement of the codes.
    """
    out = []
    for i in range(0, len(frames_u8), batch):
        chunk = np.asarray(frames_u8[i : i + batch], np.uint8)
        n = len(chunk)
        if n < batch:  # one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.uint8)])
        out.append(np.asarray(_fast_codes(params, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


@jax.jit
def _fast_descriptors_jit(params: Params, frames_u8: jax.Array) -> jax.Array:
    return _fast_descriptors(params, frames_u8)


def fast_descriptors(params: Params, frames_u8: np.ndarray, batch: int = 64) -> np.ndarray:
    """Pre-quantization descriptors [N, 16, 16, E] by the same shortcut as `fast_codes`."""
    out = []
    for i in range(0, len(frames_u8), batch):
        chunk = np.asarray(frames_u8[i : i + batch], np.uint8)
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.uint8)])
        out.append(np.asarray(_fast_descriptors_jit(params, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)
