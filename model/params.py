"""The parameter tree: each parameter declared once, with its shape and logical axes.

Trees are nested dicts WITHOUT the reference's leading "params" key:

    lm_head/kernel                              [H, V]     (embed, vocab)
    vision_head/kernel                          [H, VV]    (embed, vocab)
    transformer/wte/embedding                   [V, H]     (vocab, embed)
    transformer/vte/embedding                   [VV, H]    (vocab, embed)
    transformer/ln_f/kernel                     [H]        (norm,)
    transformer/h/scan_decoder/<layer params>   stacked: layer axis at `param_scan_axis`
    transformer/h/<i>/<layer params>            per-layer layout (scan_layers=False)

with layer params attention/{wq,wk,wv,wo}/kernel, feed_forward/{w1,w2,w3}/kernel,
attention_norm/kernel, ffn_norm/kernel.

`param_infos` is the one declaration (like jax-llm-examples' `ArrayInfo`): the
abstract shapes (`abstract_params`), the expected checkpoint keys
(`param_shapes`, checkpoint.py), the sharding rules (model/sharding.py), the
planner's byte counts (model/planner.py) and the random init all derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lwm_serve.model import logical_axes as ax
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.params_file import flatten_params, unflatten_params

Path = tuple[str, ...]
Params = dict[str, Any]

SCAN_KEY = "scan_decoder"
LAYERS_KEY = ("transformer", "h")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: its shape, the logical name of each dimension, its init."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: Literal["normal", "ones"] = "normal"

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")

    def stacked(self, layers: int, axis: int) -> "ParamInfo":
        """The same parameter with the layer axis of a scanned tree inserted at `axis`."""
        shape, axes = list(self.shape), list(self.axes)
        shape.insert(axis, layers)
        axes.insert(axis, ax.LAYERS)
        return ParamInfo(tuple(shape), tuple(axes), self.init)


def layer_param_infos(cfg: ModelConfig) -> dict[Path, ParamInfo]:
    """One decoder layer's parameters (paths under the layer subtree)."""
    h, m = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.kv_heads * cfg.head_dim
    return {
        ("attention", "wq", "kernel"): ParamInfo((h, h), (ax.EMBED, ax.HEADS)),
        ("attention", "wk", "kernel"): ParamInfo((h, kv), (ax.EMBED, ax.KV_HEADS)),
        ("attention", "wv", "kernel"): ParamInfo((h, kv), (ax.EMBED, ax.KV_HEADS)),
        ("attention", "wo", "kernel"): ParamInfo((h, h), (ax.HEADS, ax.EMBED)),
        ("feed_forward", "w1", "kernel"): ParamInfo((h, m), (ax.EMBED, ax.MLP)),
        ("feed_forward", "w2", "kernel"): ParamInfo((m, h), (ax.MLP, ax.EMBED)),
        ("feed_forward", "w3", "kernel"): ParamInfo((h, m), (ax.EMBED, ax.MLP)),
        ("attention_norm", "kernel"): ParamInfo((h,), (ax.NORM,), "ones"),
        ("ffn_norm", "kernel"): ParamInfo((h,), (ax.NORM,), "ones"),
    }


def param_infos(cfg: ModelConfig, *, scan_layers: bool | None = None) -> dict[Path, ParamInfo]:
    """Every parameter of `cfg` in one layer layout (default: `cfg.scan_layers`).

    Tied heads have no kernel of their own; a text-only config
    (`vision_vocab_size == 0`, Hugging Face LWM-Text) has no vte/vision_head.
    """
    h = cfg.hidden_size
    scan = cfg.scan_layers if scan_layers is None else scan_layers
    infos: dict[Path, ParamInfo] = {
        ("transformer", "wte", "embedding"): ParamInfo((cfg.vocab_size, h), (ax.VOCAB, ax.EMBED)),
        ("transformer", "ln_f", "kernel"): ParamInfo((h,), (ax.NORM,), "ones"),
    }
    if not cfg.tie_word_embeddings:
        infos[("lm_head", "kernel")] = ParamInfo((h, cfg.vocab_size), (ax.EMBED, ax.VOCAB))
    if cfg.vision_vocab_size:
        infos[("transformer", "vte", "embedding")] = ParamInfo(
            (cfg.vision_vocab_size, h), (ax.VOCAB, ax.EMBED))
        if not cfg.tie_vision_embeddings:
            infos[("vision_head", "kernel")] = ParamInfo(
                (h, cfg.vision_vocab_size), (ax.EMBED, ax.VOCAB))
    layers = cfg.num_hidden_layers
    for path, info in layer_param_infos(cfg).items():
        if scan:
            infos[(*LAYERS_KEY, SCAN_KEY, *path)] = info.stacked(layers, cfg.param_scan_axis)
        else:
            for i in range(layers):
                infos[(*LAYERS_KEY, str(i), *path)] = info
    return infos


def param_info(cfg: ModelConfig, path: tuple[str, ...]) -> ParamInfo | None:
    """The declaration of one path in either layer layout (None: not a parameter of `cfg`)."""
    scanned = len(path) > 2 and path[:2] == LAYERS_KEY and path[2] == SCAN_KEY
    return param_infos(cfg, scan_layers=scanned).get(tuple(path))


def layer_param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shapes of one decoder layer's parameters."""
    return {path: info.shape for path, info in layer_param_infos(cfg).items()}


def param_shapes(cfg: ModelConfig, *, scan_layers: bool | None = None
                 ) -> dict[Path, tuple[int, ...]]:
    """Every parameter's path and shape for this config and layout."""
    return {path: info.shape for path, info in param_infos(cfg, scan_layers=scan_layers).items()}


def abstract_params(cfg: ModelConfig, dtype: Any = None) -> Params:
    """The tree as `jax.ShapeDtypeStruct`s (in `cfg.param_dtype` unless `dtype` is given)."""
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    return unflatten_params({path: jax.ShapeDtypeStruct(info.shape, dtype)
                             for path, info in param_infos(cfg).items()})


def is_scanned(params: Params) -> bool | None:
    """Which layer layout a tree is in: True scanned, False per-layer, None no layers."""
    layers = params.get("transformer", {}).get("h")
    if not layers:
        return None
    return SCAN_KEY in layers


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random weights as the reference initialises them: normal(0, initializer_range)
    for matrices and embeddings, ones for the norms. Stored in `cfg.param_dtype`."""
    infos = param_infos(cfg)
    keys = jax.random.split(key, len(infos))
    dtype = jnp.dtype(cfg.param_dtype)
    items = {}
    for k, (path, info) in zip(keys, sorted(infos.items())):
        if info.init == "ones":
            items[path] = jnp.ones(info.shape, dtype)
        else:
            items[path] = (cfg.initializer_range
                           * jax.random.normal(k, info.shape, jnp.float32)).astype(dtype)
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

    The tree's own structure says which layout it is in (a checkpoint may be
    in either, whatever `cfg.scan_layers` says); `cfg.param_scan_axis` says
    where a stacked tree keeps its layer axis.

    Returns:
      (per-layer params, cfg with scan_layers=False). A per-layer tree is returned as is.
    """
    if not is_scanned(params):
        return params, cfg.replace(scan_layers=False)
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
