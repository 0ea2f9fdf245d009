"""LWM's VQGAN (encoder, vector quantizer, decoder) as pure JAX functions.

The parameter tree is the reference's flax tree as pickled by LWM (a nested dict
of float32 arrays, no leading "params" key). Flax names modules by call order,
so the names below are structural and must stay exactly as they are:

    encoder/Conv_0                                   stem 3x3, 3 -> hidden
    encoder/DownsamplingBlock_<l>/ResnetBlock_<j>    l = 0..L-1, j < num_res_blocks
    encoder/DownsamplingBlock_<l>/Downsample_0/Conv_0    all but the last level
    encoder/MidBlock_0/ResnetBlock_{0,1}, encoder/GroupNorm_0, encoder/Conv_1
    quant_conv (1x1, z -> embed), quantize/embeddings [num_embeddings, embed]
    post_quant_conv (1x1, embed -> z)
    decoder/Conv_0, decoder/MidBlock_0/ResnetBlock_{0,1}
    decoder/UpsamplingBlock_<k>: k = 0 is the DEEPEST level (flax numbers the
        blocks in call order and the decoder walks the levels in reverse);
        num_res_blocks + 1 ResnetBlocks, Upsample_0/Conv_0 on all but the last
    decoder/GroupNorm_0, decoder/Conv_1

A ResnetBlock holds GroupNorm_0, Conv_0, GroupNorm_1, Conv_1 and, only when the
channel count changes, Conv_2 (the 1x1 shortcut). Convs are HWIO with a bias and
SAME padding; GroupNorm has 32 groups, eps 1e-6, `scale` and `bias`.

The real LWM VQGAN has no attention (`attn_resolutions=()`,
`no_attn_mid_block=True`) and resamples with convolutions; configs asking for
anything else are rejected when the config is built.

This module never opens a file: `VQGAN.from_pickle` delegates to the checkpoint
module's restricted unpickler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lwm_serve.tokenizers.vqgan_params import (Params, _is_shape, check_params, init_params,  # noqa: F401
                                               param_shapes, params_identity)

if TYPE_CHECKING:
    from lwm_serve.tokenizers.vqgan_batch import EncodeTimes

logger = logging.getLogger(__name__)

_GROUPS = 32
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The reference's VQGANConfig fields; defaults are the real LWM VQGAN.

    `num_resolutions` is derived (len(channel_mult)), as in the reference.
    """

    resolution: int = 256
    num_channels: int = 3
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    no_attn_mid_block: bool = True
    z_channels: int = 64
    num_embeddings: int = 8192
    quantized_embed_dim: int = 64
    dropout: float = 0.0  # inference only: dropout is the identity
    resample_with_conv: bool = True
    commitment_cost: float = 0.25  # training only

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.attn_resolutions or not self.no_attn_mid_block:
            raise NotImplementedError(
                "VQGAN attention blocks (attn_resolutions="
                f"{self.attn_resolutions}, no_attn_mid_block={self.no_attn_mid_block}) are not "
                "implemented: the LWM VQGAN uses none (attn_resolutions=(), no_attn_mid_block=True)"
            )
        if not self.resample_with_conv:
            raise NotImplementedError(
                "resample_with_conv=False (average-pool / conv-free resampling) is not implemented: "
                "the LWM VQGAN resamples with convolutions"
            )
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one resolution level")
        for c in (self.hidden_channels * m for m in self.channel_mult):
            if c % _GROUPS:
                raise ValueError(f"every level's channel count must divide by {_GROUPS} (GroupNorm); got {c}")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} does not divide by the downsample factor {self.downsample_factor}"
            )

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    @property
    def grid(self) -> int:
        """Side of the code grid (16 for the real model)."""
        return self.resolution // self.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        """Build from the reference's field names; `num_resolutions` is checked, not stored."""
        d = dict(d)
        n_res = d.pop("num_resolutions", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQGAN config fields: {unknown}")
        cfg = cls(**d)
        if n_res is not None and n_res != cfg.num_resolutions:
            raise ValueError(f"num_resolutions={n_res} disagrees with channel_mult={cfg.channel_mult}")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> VQGANConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------
# layers (flax numerics: conv_general_dilated NHWC/HWIO, fast-variance GroupNorm)


def _conv(p: Params, x: jax.Array, stride: int = 1, padding: str = "SAME") -> jax.Array:
    # x: [B, H, W, Cin]; kernel: [kh, kw, Cin, Cout]
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]


def _group_norm(p: Params, x: jax.Array) -> jax.Array:
    # Same order of operations as flax.linen.GroupNorm (use_fast_variance=True):
    # var = max(0, E[x^2] - E[x]^2), y = (x - mean) * (rsqrt(var + eps) * scale) + bias.
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, _GROUPS, c // _GROUPS)
    mean = jnp.mean(g, axis=(1, 2, 4))
    mean2 = jnp.mean(jnp.square(g), axis=(1, 2, 4))
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))
    mean = jnp.repeat(mean, c // _GROUPS, axis=-1)[:, None, None, :]
    var = jnp.repeat(var, c // _GROUPS, axis=-1)[:, None, None, :]
    mul = jax.lax.rsqrt(var + _EPS) * p["scale"]
    return (x - mean) * mul + p["bias"]


def _resnet_block(p: Params, x: jax.Array) -> jax.Array:
    h = _conv(p["Conv_0"], jax.nn.silu(_group_norm(p["GroupNorm_0"], x)))
    h = _conv(p["Conv_1"], jax.nn.silu(_group_norm(p["GroupNorm_1"], h)))
    residual = _conv(p["Conv_2"], x) if "Conv_2" in p else x
    return h + residual


def _downsample(p: Params, x: jax.Array) -> jax.Array:
    # Asymmetric padding (bottom/right only) then a VALID stride-2 conv, as the reference.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(p["Conv_0"], x, stride=2, padding="VALID")


def _upsample(p: Params, x: jax.Array) -> jax.Array:
    # Exact 2x nearest resize == repeat each pixel twice along H and W.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(p["Conv_0"], x)


def _mid_block(p: Params, x: jax.Array) -> jax.Array:
    return _resnet_block(p["ResnetBlock_1"], _resnet_block(p["ResnetBlock_0"], x))


def _encoder(p: Params, cfg: VQGANConfig, x: jax.Array) -> jax.Array:
    h = _conv(p["Conv_0"], x)  # [B, R, R, hidden]
    for level in range(cfg.num_resolutions):
        blk = p[f"DownsamplingBlock_{level}"]
        for j in range(cfg.num_res_blocks):
            h = _resnet_block(blk[f"ResnetBlock_{j}"], h)
        if level != cfg.num_resolutions - 1:
            h = _downsample(blk["Downsample_0"], h)
    h = _mid_block(p["MidBlock_0"], h)
    return _conv(p["Conv_1"], jax.nn.silu(_group_norm(p["GroupNorm_0"], h)))  # [B, g, g, z]


def _decoder(p: Params, cfg: VQGANConfig, z: jax.Array) -> jax.Array:
    h = _conv(p["Conv_0"], z)
    h = _mid_block(p["MidBlock_0"], h)
    for k, level in enumerate(reversed(range(cfg.num_resolutions))):
        blk = p[f"UpsamplingBlock_{k}"]
        for j in range(cfg.num_res_blocks + 1):
            h = _resnet_block(blk[f"ResnetBlock_{j}"], h)
        if level != 0:
            h = _upsample(blk["Upsample_0"], h)
    return _conv(p["Conv_1"], jax.nn.silu(_group_norm(p["GroupNorm_0"], h)))


def _quantize(embeddings: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    # z: [B, g, g, E]; embeddings: [K, E]
    flat = z.reshape(-1, z.shape[-1])
    d = (
        jnp.sum(flat**2, axis=1, keepdims=True)
        + jnp.sum(embeddings.T**2, axis=0, keepdims=True)
        - 2 * jnp.einsum("bd,nd->bn", flat, embeddings)
    )  # [B*g*g, K]
    idx = jnp.argmin(d, axis=1)  # first index on ties
    z_q = embeddings[idx].reshape(z.shape)
    # The reference's straight-through form z + (z_q - z); kept for bitwise fidelity.
    z_q = z + (z_q - z)
    return z_q, idx.reshape(z.shape[:-1]).astype(jnp.int32)


# ----------------------------------------------------------------------------
# public pure API


@partial(jax.jit, static_argnums=1)
def encode(params: Params, cfg: VQGANConfig, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encode frames to quantized latents and code indices.

    Args:
        params: the reference's VQGAN parameter tree.
        cfg: the config (static).
        frames: [N, R, R, 3] float in [-1, 1] (R = cfg.resolution).

    Returns:
        (quantized [N, g, g, E] float32, codes [N, g, g] int32), g = cfg.grid.
    """
    if frames.shape[1:] != (cfg.resolution, cfg.resolution, cfg.num_channels):
        raise ValueError(
            f"frames must be [N, {cfg.resolution}, {cfg.resolution}, {cfg.num_channels}], got {frames.shape}"
        )
    h = _encoder(params["encoder"], cfg, frames.astype(jnp.float32))
    h = _conv(params["quant_conv"], h)
    return _quantize(params["quantize"]["embeddings"], h)


@partial(jax.jit, static_argnums=1)
def decode(params: Params, cfg: VQGANConfig, codes: jax.Array) -> jax.Array:
    """Decode code indices to pixels.

    Args:
        params: the reference's VQGAN parameter tree.
        cfg: the config (static).
        codes: [N, g, g] integer code indices in [0, num_embeddings).

    Returns:
        pixels [N, R, R, 3] float32, clipped to [-1, 1].
    """
    if codes.shape[1:] != (cfg.grid, cfg.grid):
        raise ValueError(f"codes must be [N, {cfg.grid}, {cfg.grid}], got {codes.shape}")
    z = params["quantize"]["embeddings"][codes]  # [N, g, g, E]
    h = _conv(params["post_quant_conv"], z)
    return jnp.clip(_decoder(params["decoder"], cfg, h), -1, 1)


# ----------------------------------------------------------------------------
# batched, optionally data-parallel wrapper


class VQGAN:
    """Params + config, with chunked (and optionally dp-sharded) batching.

    Every call pads its last chunk to a power of two (to `batch_size` when
    sharded), so encode/decode compile once per such size. With `shard=True` a chunk is split over all local
    devices along a `dp` mesh axis when `batch_size` divides by their count
    (params replicated); otherwise it runs on one device. `tune_encode` replaces the
    given `batch_size` by the measured best one for this device and, from then on,
    splits each encode call into the measured sizes of least total time
    (`tokenizers.vqgan_batch`).
    """

    def __init__(self, params: Params, cfg: VQGANConfig, batch_size: int = 8, shard: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_params(params, cfg)
        self.cfg = cfg
        self.batch_size = batch_size
        devices = jax.local_devices()
        self.mesh: Mesh | None = None
        if shard and len(devices) > 1 and batch_size % len(devices) == 0:
            # Only model/sharding.py names mesh axes; imported here so that the
            # tokenizers import without the model package's sharding rules.
            from lwm_serve.model import sharding

            self.mesh = sharding.batch_mesh(devices)
            self._in_sharding: Any = sharding.batch_sharding(self.mesh)
            params = jax.device_put(params, sharding.replicated(self.mesh))
        else:
            if shard:
                logger.info("VQGAN: batch %d does not divide over %d devices; not sharding", batch_size, len(devices))
            self._in_sharding = None
            params = jax.device_put(params)
        self.params = params
        self.encode_seconds: dict[int, float] | None = None  # measured per batch size (tune_encode)
        self._encoders: dict[int, Any] = {}  # batch -> encode compiled ahead of time (compile_encode)

    @property
    def platform(self) -> str:
        """The device kind the VQGAN runs on (cpu, gpu, tpu)."""
        return jax.local_devices()[0].platform

    def tune_encode(self, candidates: Sequence[int] | None = None, compiled: Sequence[int] = ()) -> "EncodeTimes":
        """Measure the encode batch sizes on this device, keep the best (`vqgan_batch.measure_encode`).

        Leaves every measured size compiled (the server calls it before it says it is ready).
        `compiled`: sizes already compiled (`vqgan_batch.compile_encode`), only timed here.
        Sharded wrappers keep their batch (it must divide over the devices).
        """
        from lwm_serve.tokenizers import vqgan_batch

        if self.mesh is not None:
            raise ValueError("a sharded VQGAN keeps its batch_size (it must divide over the devices)")
        times = vqgan_batch.measure_encode(self, candidates or vqgan_batch.CANDIDATES, compiled)
        self.batch_size, self.encode_seconds = times.batch, dict(times.seconds)
        return times

    @classmethod
    def from_pickle(cls, path: str | Path, cfg: VQGANConfig | None = None, **kwargs: Any) -> VQGAN:
        """Load the reference's pickled params (restricted unpickler) and build the wrapper."""
        # Imported here so this module imports before/without the checkpoint module.
        from lwm_serve.model.checkpoint import load_pickle_params

        params = load_pickle_params(path)
        return cls(params, cfg or VQGANConfig(), **kwargs)

    @cached_property
    def identity(self) -> str:
        """Stable hash of config + params, for cache keys."""
        return params_identity(jax.device_get(self.params), self.cfg)

    def _sizes(self, n: int, measured: dict[int, float] | None) -> list[int]:
        """The call sizes for n items: the measured split, else full batches and a short last chunk
        padded to the next power of two, not to the full batch (at most log2(batch) extra compiled
        shapes; a 2-frame ask costs 2 frames of compute, not 8). Sharded chunks keep the full batch
        so they still divide over the devices."""
        if measured and self.mesh is None:
            from lwm_serve.tokenizers.vqgan_batch import split_frames

            return split_frames(n, measured)
        full, rest = divmod(n, self.batch_size)
        sizes = [self.batch_size] * full
        if rest:
            sizes.append(self.batch_size if self.mesh is not None else min(self.batch_size, 1 << (rest - 1).bit_length()))
        return sizes

    def _chunks(self, x: np.ndarray, measured: dict[int, float] | None = None) -> list[tuple[np.ndarray, int]]:
        out = []
        i = 0
        for target in self._sizes(len(x), measured):
            chunk = x[i : i + target]
            n = len(chunk)
            i += n
            if n < target:
                pad = np.zeros((target - n, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out.append((chunk, n))
        return out

    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, self._in_sharding) if self._in_sharding is not None else jnp.asarray(x)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Encode preprocessed frames.

        Args:
            frames: [N, R, R, 3] float32 in [-1, 1].

        Returns:
            codes [N, g, g] int32 (numpy).
        """
        return self.start_encode(frames)()

    def start_encode(self, frames: np.ndarray) -> Callable[[], np.ndarray]:
        """`encode_frames` without waiting: dispatches every chunk and returns the function
        that waits for the codes (the caller decodes the next frames meanwhile)."""
        frames = np.asarray(frames, np.float32)
        g = self.cfg.grid
        if len(frames) == 0:
            return lambda: np.zeros((0, g, g), np.int32)
        results = [
            (self._encode_chunk(chunk), n) for chunk, n in self._chunks(frames, self.encode_seconds)
        ]  # dispatch every chunk before waiting on any
        return lambda: np.concatenate([np.asarray(c)[:n] for c, n in results])

    def compile_encode(self, batch: int) -> None:
        """Compile the encode of `batch` frames now, running nothing (start-up warm-up); calls
        of that size then use it. A sharded wrapper compiles on first use instead."""
        if batch in self._encoders or self.mesh is not None:
            return
        frames = jax.ShapeDtypeStruct((batch, self.cfg.resolution, self.cfg.resolution, self.cfg.num_channels),
                                      jnp.float32)
        self._encoders[batch] = encode.lower(self.params, self.cfg, frames).compile()

    def _encode_chunk(self, chunk: np.ndarray) -> jax.Array:
        compiled = self._encoders.get(len(chunk))
        x = self._put(chunk)
        return (compiled(self.params, x) if compiled is not None else encode(self.params, self.cfg, x))[1]

    def encode_batch(self, frames: np.ndarray) -> np.ndarray:
        """Encode exactly these frames in one call (one compiled shape; probes and warm-up)."""
        return np.asarray(self._encode_chunk(np.asarray(frames, np.float32)))

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Decode codes [N, g, g] to pixels [N, R, R, 3] float32 in [-1, 1]."""
        codes = np.asarray(codes, np.int32)
        r = self.cfg.resolution
        if len(codes) == 0:
            return np.zeros((0, r, r, self.cfg.num_channels), np.float32)
        if codes.min() < 0 or codes.max() >= self.cfg.num_embeddings:
            raise ValueError(f"codes must lie in [0, {self.cfg.num_embeddings}), got [{codes.min()}, {codes.max()}]")
        results = [(decode(self.params, self.cfg, self._put(chunk)), n) for chunk, n in self._chunks(codes)]
        return np.concatenate([np.asarray(p)[:n] for p, n in results])
