"""The parameter tree: names and shapes exactly as the reference's, and random init.

Trees are nested dicts WITHOUT the reference's leading "params" key:

    lm_head/kernel                              [H, V]
    vision_head/kernel                          [H, VV]
    transformer/wte/embedding                   [V, H]
    transformer/vte/embedding                   [VV, H]
    transformer/ln_f/kernel                     [H]
    transformer/h/scan_decoder/<layer params>   stacked: layer axis at `param_scan_axis`
    transformer/h/<i>/<layer params>            per-layer layout (scan_layers=False)

with layer params attention/{wq,wk,wv,wo}/kernel, feed_forward/{w1,w2,w3}/kernel,
attention_norm/kernel, ffn_norm/kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lwm_serve.model.config import ModelConfig
from lwm_serve.model.params_file import flatten_params, unflatten_params

Path = tuple[str, ...]
Params = dict[str, Any]

SCAN_KEY = "scan_decoder"


def layer_param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shapes of one decoder layer's parameters."""
    h, m = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.kv_heads * cfg.head_dim
    return {
        ("attention", "wq", "kernel"): (h, h),
        ("attention", "wk", "kernel"): (h, kv),
        ("attention", "wv", "kernel"): (h, kv),
        ("attention", "wo", "kernel"): (h, h),
        ("feed_forward", "w1", "kernel"): (h, m),
        ("feed_forward", "w2", "kernel"): (m, h),
        ("feed_forward", "w3", "kernel"): (h, m),
        ("attention_norm", "kernel"): (h,),
        ("ffn_norm", "kernel"): (h,),
    }


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Every parameter's path and shape for this config and layout.

    Tied heads have no kernel of their own; a text-only config
    (`vision_vocab_size == 0`, Hugging Face LWM-Text) has no vte/vision_head.
    """
    h = cfg.hidden_size
    shapes: dict[Path, tuple[int, ...]] = {
        ("transformer", "wte", "embedding"): (cfg.vocab_size, h),
        ("transformer", "ln_f", "kernel"): (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes[("lm_head", "kernel")] = (h, cfg.vocab_size)
    if cfg.vision_vocab_size:
        shapes[("transformer", "vte", "embedding")] = (cfg.vision_vocab_size, h)
        if not cfg.tie_vision_embeddings:
            shapes[("vision_head", "kernel")] = (h, cfg.vision_vocab_size)
    layers = cfg.num_hidden_layers
    for path, shape in layer_param_shapes(cfg).items():
        if cfg.scan_layers:
            stacked = list(shape)
            stacked.insert(cfg.param_scan_axis, layers)
            shapes[("transformer", "h", SCAN_KEY, *path)] = tuple(stacked)
        else:
            for i in range(layers):
                shapes[("transformer", "h", str(i), *path)] = shape
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random weights as the reference initialises them: normal(0, initializer_range)
    for matrices and embeddings, ones for the norms. Stored in `cfg.param_dtype`."""
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    dtype = jnp.dtype(cfg.param_dtype)
    items = {}
    for k, (path, shape) in zip(keys, sorted(shapes.items())):
        if path[-2].endswith("norm") or path[-2] == "ln_f":
            items[path] = jnp.ones(shape, dtype)
        else:
            items[path] = (cfg.initializer_range * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    return unflatten_params(items)


def unstack_layers(params: Params, cfg: ModelConfig, *, consume: bool = False
                   ) -> tuple[Params, ModelConfig]:
    """The same weights in the reference's per-layer layout (`transformer/h/<i>`).

    Serving computes from per-layer arrays: XLA (on CPU at least) copies a
    layer's weights out of a stacked [L, ...] array on every use, which made a
    bench-150m decode step 7x slower. With `consume=True` the scanned subtree
    is taken apart leaf by leaf (popped from `params`, which must not be used
    afterwards), so at most one stacked tensor is ever held twice: what
    loading a real checkpoint needs.

    Returns:
      (per-layer params, cfg with scan_layers=False). A per-layer tree is returned as is.
    """
    if not cfg.scan_layers:
        return params, cfg
    if not consume:
        params = jax.tree_util.tree_map(lambda x: x, params)  # new dicts, same arrays
    stacked = params["transformer"]["h"].pop(SCAN_KEY)
    axis = cfg.param_scan_axis
    layers: dict[str, Params] = {str(i): {} for i in range(cfg.num_hidden_layers)}
    for path, _ in list(flatten_params(stacked)):
        node = stacked
        for key in path[:-1]:
            node = node[key]
        array = node.pop(path[-1])
        for i in range(cfg.num_hidden_layers):
            dest = layers[str(i)]
            for key in path[:-1]:
                dest = dest.setdefault(key, {})
            dest[path[-1]] = jax.lax.index_in_dim(array, i, axis, keepdims=False)
        del array
    params["transformer"]["h"] = layers
    return params, cfg.replace(scan_layers=False)
