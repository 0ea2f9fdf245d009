"""The VQGAN's parameter tree as data: its shapes per config, checks, random init, identity hash.

Separate from the forward pass (`tokenizers.vqgan`, which re-exports these names):
they read the config and the arrays, never run the model.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from lwm_serve.tokenizers.vqgan import VQGANConfig

Params = dict[str, Any]


def param_shapes(cfg: VQGANConfig) -> Params:
    """The parameter tree's shapes (nested dict of tuples), mirroring the forward pass."""

    def conv(k: int, cin: int, cout: int) -> Params:
        return {"kernel": (k, k, cin, cout), "bias": (cout,)}

    def norm(c: int) -> Params:
        return {"scale": (c,), "bias": (c,)}

    def resnet(cin: int, cout: int) -> Params:
        p = {"GroupNorm_0": norm(cin), "Conv_0": conv(3, cin, cout), "GroupNorm_1": norm(cout),
             "Conv_1": conv(3, cout, cout)}
        if cin != cout:
            p["Conv_2"] = conv(1, cin, cout)
        return p

    chans = [cfg.hidden_channels * m for m in cfg.channel_mult]
    enc: Params = {"Conv_0": conv(3, cfg.num_channels, cfg.hidden_channels)}
    c = cfg.hidden_channels
    for level, out in enumerate(chans):
        blk: Params = {}
        for j in range(cfg.num_res_blocks):
            blk[f"ResnetBlock_{j}"] = resnet(c, out)
            c = out
        if level != cfg.num_resolutions - 1:
            blk["Downsample_0"] = {"Conv_0": conv(3, c, c)}
        enc[f"DownsamplingBlock_{level}"] = blk
    enc["MidBlock_0"] = {"ResnetBlock_0": resnet(c, c), "ResnetBlock_1": resnet(c, c)}
    enc["GroupNorm_0"] = norm(c)
    enc["Conv_1"] = conv(3, c, cfg.z_channels)

    c = chans[-1]
    dec: Params = {"Conv_0": conv(3, cfg.z_channels, c),
                   "MidBlock_0": {"ResnetBlock_0": resnet(c, c), "ResnetBlock_1": resnet(c, c)}}
    for k, level in enumerate(reversed(range(cfg.num_resolutions))):
        blk = {}
        for j in range(cfg.num_res_blocks + 1):
            blk[f"ResnetBlock_{j}"] = resnet(c, chans[level])
            c = chans[level]
        if level != 0:
            blk["Upsample_0"] = {"Conv_0": conv(3, c, c)}
        dec[f"UpsamplingBlock_{k}"] = blk
    dec["GroupNorm_0"] = norm(c)
    dec["Conv_1"] = conv(3, c, cfg.num_channels)

    return {
        "encoder": enc,
        "decoder": dec,
        "quant_conv": conv(1, cfg.z_channels, cfg.quantized_embed_dim),
        "post_quant_conv": conv(1, cfg.quantized_embed_dim, cfg.z_channels),
        "quantize": {"embeddings": (cfg.num_embeddings, cfg.quantized_embed_dim)},
    }


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def check_params(params: Params, cfg: VQGANConfig) -> None:
    """Raise ValueError naming the first missing, extra or mis-shaped parameter."""
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)[0]
    want = {jax.tree_util.keystr(k): s for k, s in expected}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"VQGAN params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, s in want.items():
        if got[k] != s:
            raise ValueError(f"VQGAN param {k} has shape {got[k]}, the config needs {s}")


def init_params(cfg: VQGANConfig, seed: int = 0) -> Params:
    """Random params (fan-in scaled normal convs, unit norms) for tests and benchmarks.

    numpy's generator, not jax.random: ~150 leaves would be ~150 device dispatches.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)
    out = []
    for path, shape in leaves:
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            out.append(np.ones(shape, np.float32))
        elif name.endswith("['bias']"):
            out.append(np.zeros(shape, np.float32))
        elif name.endswith("['embeddings']"):
            lim = 1.0 / shape[0]
            out.append(rng.uniform(-lim, lim, shape).astype(np.float32))
        else:
            fan_in = math.prod(shape[:-1])
            out.append((rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def params_identity(params: Params, cfg: VQGANConfig) -> str:
    """sha256 hex of the config and every parameter's name, shape and bytes (cache keys)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for path, leaf in sorted(
        ((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0])
    ):
        arr = np.ascontiguousarray(np.asarray(leaf, dtype=np.float32))
        h.update(f"{path}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
