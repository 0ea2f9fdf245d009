"""Checkpoint loading: expected shapes, shard-on-load, `params::` and Hugging Face files.

Two sources give the same parameter tree (nested dicts, reference names, no leading
"params"; see `expected_param_shapes`):

- the reference's `params::` streaming msgpack file (format in `params_file.py`);
- Hugging Face LLaMA safetensors (LWM-Text models), renamed and re-laid out here.

Pickled params trees (the VQGAN) load through `unpickle.py`, re-exported here.

Either way tensors are read one at a time, checked against the config as soon as
their header is known, cast, and put on their target sharding before the next one is
read, so host RAM never holds more than one tensor (plus its cast) at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path as FsPath
from typing import Any, Callable, Mapping, Union

import jax
import numpy as np
from tqdm import tqdm

from lwm_serve.model.config import ModelConfig
from lwm_serve.model.params import LAYERS_KEY, SCAN_KEY, is_scanned, param_shapes
from lwm_serve.model.params_file import (
    MAX_CHUNK_SIZE,
    SPEC_PREFIX,
    CheckpointError,
    Path,
    Params,
    flatten_params,
    is_float_dtype,
    parse_spec,
    unflatten_params,
)
from lwm_serve.model.params_reader import ParamsReader, iter_params_file
from lwm_serve.model.params_writer import save_params
from lwm_serve.model.unpickle import load_pickle_params

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError", "MAX_CHUNK_SIZE", "SPEC_PREFIX", "ParamsReader", "expected_param_shapes",
    "flatten_params", "iter_params_file", "load_checkpoint", "load_hf_llama",
    "load_params", "load_pickle_params", "parse_spec", "save_hf_llama", "save_params", "unflatten_params",
]

ShardingSpec = Union[
    Callable[[Path], "jax.sharding.Sharding | None"], Mapping[str, Any],
    jax.sharding.Sharding, None]
DTypeLike = Union[str, np.dtype, type, None]

def expected_param_shapes(cfg: ModelConfig, *, scan_layers: bool | None = None
                          ) -> dict[Path, tuple[int, ...]]:
    """Every parameter path and shape for `cfg` (layer layout: `scan_layers`, default
    `cfg.scan_layers`), in the reference's file order (sorted keys)."""
    return dict(sorted(param_shapes(cfg, scan_layers=scan_layers).items()))


def _join(path: Path) -> str:
    return "/".join(path)


def _layer_layout(path: Path) -> bool | None:
    """True for a scanned layer parameter, False for a per-layer one, None otherwise."""
    if len(path) > 2 and path[:2] == LAYERS_KEY:
        return path[2] == SCAN_KEY
    return None


def _layout_name(scanned: bool) -> str:
    return "scanned" if scanned else "per-layer"


class ShapeValidator:
    """Checks each (key, shape) against the config's expected tree as it streams.

    The file's own records say which layer layout it uses (the first
    `transformer/h/...` key): either is accepted, whatever `cfg.scan_layers`
    says, and `scanned` records which one was found.
    """

    def __init__(self, cfg: ModelConfig, source: str):
        self.cfg, self.source = cfg, source
        self._expected = {scan: expected_param_shapes(cfg, scan_layers=scan)
                          for scan in (True, False)}
        self.scanned: bool | None = None
        self.seen: set[Path] = set()

    @property
    def expected(self) -> dict[Path, tuple[int, ...]]:
        """The expected tree in the layout found so far (the config's until then)."""
        return self._expected[self.cfg.scan_layers if self.scanned is None else self.scanned]

    def __call__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if path in self.seen:
            raise CheckpointError(f"{self.source}: parameter {_join(path)} appears twice")
        layout = _layer_layout(path)
        if layout is not None and self.scanned is None and path in self._expected[layout]:
            self.scanned = layout
            logger.info("%s: %s layer layout (config scan_layers=%s)", self.source,
                        _layout_name(layout), self.cfg.scan_layers)
        if path not in self.expected:
            raise CheckpointError(
                f"{self.source}: unexpected parameter {_join(path)} with shape "
                f"{tuple(shape)} for this config{self._layout_hint(path)}")
        want = self.expected[path]
        if tuple(shape) != want:
            raise CheckpointError(
                f"{self.source}: parameter {_join(path)} has shape {tuple(shape)}, the "
                f"config expects {want}")
        self.seen.add(path)

    def _layout_hint(self, path: Path) -> str:
        layout = _layer_layout(path)
        if layout is not None and self.scanned is not None and layout != self.scanned:
            return (f" (the file mixes layer layouts: earlier records are "
                    f"{_layout_name(self.scanned)})")
        return ""

    def finish(self) -> None:
        missing = [p for p in self.expected if p not in self.seen]
        if missing:
            names = ", ".join(_join(p) for p in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise CheckpointError(
                f"{self.source}: missing {len(missing)} parameter(s) (file truncated at a "
                f"record boundary, or written for another config?): {names}{more}")


# --------------------------------------------------------------------------- placement


def _resolve_sharding(shardings: ShardingSpec, path: Path) -> jax.sharding.Sharding | None:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if isinstance(shardings, Mapping):
        node: Any = shardings
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                raise CheckpointError(f"no sharding given for parameter {_join(path)}")
            node = node[key]
        return node
    return shardings(path)


def _target_dtype(dtype: DTypeLike, cfg: ModelConfig | None) -> np.dtype | None:
    if dtype is None and cfg is not None:
        dtype = cfg.param_dtype
    return None if dtype is None else np.dtype(dtype)


def place_array(array: np.ndarray, path: Path, *, dtype: np.dtype | None,
                shardings: ShardingSpec) -> jax.Array:
    """Cast a floating array to `dtype` and put it on its sharding, synchronously.

    Waiting for the transfer lets the host copy be freed before the next tensor is
    read, so loading never holds two copies of the model in host RAM.
    """
    if dtype is not None and is_float_dtype(array.dtype) and array.dtype != dtype:
        array = array.astype(dtype)
    sharding = _resolve_sharding(shardings, path)
    placed = jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    return placed.block_until_ready()


class _Progress:
    """A byte-count tqdm bar (hidden off a TTY) plus a log line every 10%."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.done, self.next_log = 0, 0.1
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                        disable=None if enabled else True)

    def update(self, done: int, tensors: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        fraction = done / self.total
        if self.enabled and fraction >= self.next_log:
            logger.info("%s: %.0f%% (%.1f of %.1f MB, %d tensors)", self.desc,
                        100 * fraction, done / 1e6, self.total / 1e6, tensors)
            while self.next_log <= fraction:
                self.next_log += 0.1

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------- params::


def load_params(spec_or_path: str | os.PathLike, cfg: ModelConfig | None = None, *,
                dtype: DTypeLike = None, shardings: ShardingSpec = None,
                progress: bool = True) -> Params:
    """Load a `params::` checkpoint into a nested dict of `jax.Array`s.

    Args:
        spec_or_path: `params::PATH` (the reference's --load_checkpoint) or a path.
        cfg: if given, every key and shape is checked against
            `expected_param_shapes(cfg)` as soon as its header is read (before its
            data), and missing keys are reported at the end. The file's records say
            whether it is scanned or per-layer; either is accepted whatever
            `cfg.scan_layers` says (`params.unstack_layers` converts a scanned tree
            for serving) and the layout found is logged.
        dtype: floating tensors are cast to it (the reference casts everything to
            --dtype after loading); None means `cfg.param_dtype`, or the file's dtypes
            when there is no cfg.
        shardings: where each tensor goes: a callable `path -> Sharding`, a nested dict
            of Shardings matching the tree, one Sharding for all, or None (default
            device). Each tensor is placed right after it is read.
        progress: show a tqdm bar by bytes (only on a TTY) and log every 10%.

    Returns:
        The parameter tree WITHOUT the leading "params" key, in the file's layout
        (`params.is_scanned` tells which).

    Raises:
        CheckpointError: unreadable/corrupt file, or a mismatch with `cfg`.
    """
    path = parse_spec(spec_or_path)
    target = _target_dtype(dtype, cfg)
    check = ShapeValidator(cfg, path) if cfg is not None else None
    items: dict[Path, jax.Array] = {}
    with ParamsReader(path, check) as reader:
        bar = _Progress(reader.size, f"loading {os.path.basename(path)}", progress)
        try:
            for key, array in reader:
                if key in items:
                    raise CheckpointError(f"{path}: parameter {_join(key)} appears twice")
                items[key] = place_array(array, key, dtype=target, shardings=shardings)
                del array  # free the host copy before the next read
                bar.update(reader.offset, len(items))
        finally:
            bar.close()
    if check is not None:
        check.finish()
    if not items:
        raise CheckpointError(f"{path}: no parameters in the file (empty checkpoint)")
    tree = unflatten_params(items)
    scanned = is_scanned(tree)
    logger.info("loaded %d tensors (%.1f MB, %s) from %s", len(items), reader.size / 1e6,
                "no layers" if scanned is None else f"{_layout_name(scanned)} layout", path)
    return tree


# --------------------------------------------------------------------------- Hugging Face

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_HF_LAYER_NAMES: dict[str, Path] = {
    "self_attn.q_proj": ("attention", "wq", "kernel"),
    "self_attn.k_proj": ("attention", "wk", "kernel"),
    "self_attn.v_proj": ("attention", "wv", "kernel"),
    "self_attn.o_proj": ("attention", "wo", "kernel"),
    "mlp.gate_proj": ("feed_forward", "w1", "kernel"),
    "mlp.down_proj": ("feed_forward", "w2", "kernel"),
    "mlp.up_proj": ("feed_forward", "w3", "kernel"),
    "input_layernorm": ("attention_norm", "kernel"),
    "post_attention_layernorm": ("ffn_norm", "kernel"),
}
_HF_GLOBAL_NAMES: dict[str, Path] = {
    "model.embed_tokens.weight": ("transformer", "wte", "embedding"),
    "model.norm.weight": ("transformer", "ln_f", "kernel"),
    "lm_head.weight": ("lm_head", "kernel"),
}
# Buffers some exports carry; recomputed from cfg.theta, never read.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_name_to_path(name: str) -> Path | None:
    """Our tree path for a HF LLaMA tensor name (None: a buffer to skip)."""
    if name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[name]
    if _HF_IGNORED.fullmatch(name):
        return None
    match = _HF_LAYER.fullmatch(name)
    if match and match.group(2) in _HF_LAYER_NAMES:
        return ("transformer", "h", str(int(match.group(1))), *_HF_LAYER_NAMES[match.group(2)])
    raise CheckpointError(f"unexpected tensor {name!r} in a Hugging Face LLaMA checkpoint")


def path_to_hf_name(path: Path) -> str:
    """The HF LLaMA tensor name of one of our (per-layer layout) paths."""
    for name, ours in _HF_GLOBAL_NAMES.items():
        if ours == path:
            return name
    if path[:2] == ("transformer", "h") and len(path) > 3:
        for short, ours in _HF_LAYER_NAMES.items():
            if ours == path[3:]:
                return f"model.layers.{int(path[2])}.{short}.weight"
    raise CheckpointError(f"parameter {_join(path)} has no Hugging Face LLaMA name")


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo HF's q/k row permutation (rotate_half RoPE -> interleaved pairs).

    HF's conversion maps each head's rows (2i, 2i+1) to (i, i + head_dim/2):
    `w.view(n_heads, hd // 2, 2, in).transpose(1, 2)`. LWM rotates pairs (2i, 2i+1)
    (GPT-J/Meta style), so the rows go back to their interleaved order.

    Args:
        w: [n_heads * head_dim, in] (torch (out, in) layout).
    """
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's permutation of q/k rows (the inverse of `unpermute_rope`). w: [out, in]."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _hf_to_ours(path: Path, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """torch layout -> ours: Linear weights (out, in) become Dense kernels (in, out)."""
    leaf = path[-2]
    if leaf == "wq":
        w = unpermute_rope(w, cfg.num_attention_heads)
    elif leaf == "wk":
        w = unpermute_rope(w, cfg.kv_heads)
    if w.ndim == 2 and path[-1] == "kernel":
        w = np.ascontiguousarray(w.T)
    return w


def _ours_to_hf(path: Path, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if w.ndim == 2 and path[-1] == "kernel":
        w = w.T
    leaf = path[-2]
    if leaf == "wq":
        w = permute_rope(w, cfg.num_attention_heads)
    elif leaf == "wk":
        w = permute_rope(w, cfg.kv_heads)
    return np.ascontiguousarray(w)


def _hf_files(directory: FsPath) -> list[FsPath]:
    if directory.is_file() and directory.suffix == ".safetensors":
        return [directory]
    index = directory / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which does not exist")
        return files
    if (directory / HF_SINGLE).is_file():
        return [directory / HF_SINGLE]
    if any(directory.glob("*.bin")):
        raise CheckpointError(
            f"{directory}: only safetensors checkpoints are supported (PyTorch .bin files "
            f"are pickles that can run code); convert them to safetensors first")
    raise CheckpointError(f"{directory}: no {HF_SINGLE} or {HF_INDEX} found")


def load_hf_llama(directory: str | os.PathLike, cfg: ModelConfig, *,
                  dtype: DTypeLike = None, shardings: ShardingSpec = None,
                  progress: bool = True) -> Params:
    """Load a Hugging Face LLaMA checkpoint (LWM-Text) into our per-layer tree.

    Reads `model.safetensors` or the shards named by `model.safetensors.index.json`,
    one tensor at a time; renames, transposes Linear weights to (in, out), un-permutes
    q/k rows for interleaved RoPE, checks shapes against `cfg`, casts, and places.

    Args:
        directory: the checkpoint directory (or one .safetensors file).
        cfg: per-layer layout without vision tables (as `from_hf_json` builds it).
        dtype, shardings, progress: as in `load_params`.

    Returns:
        The tree WITHOUT the leading "params" (no `vte`/`vision_head`).
    """
    from safetensors import safe_open

    if cfg.scan_layers:
        raise CheckpointError("Hugging Face checkpoints load into the per-layer layout: "
                              "use a config with scan_layers=False (from_hf_json does)")
    if cfg.vision_vocab_size:
        raise CheckpointError("Hugging Face LLaMA checkpoints have no vision tables: use a "
                              "config with vision_vocab_size=0 (from_hf_json does)")
    root = FsPath(directory)
    files = _hf_files(root)
    target = _target_dtype(dtype, cfg)
    check = ShapeValidator(cfg, str(root))
    bar = _Progress(sum(f.stat().st_size for f in files), f"loading {root.name}", progress)
    items: dict[Path, jax.Array] = {}
    done = 0
    try:
        for file in files:
            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
            with handle as f:
                for name in f.keys():
                    path = hf_name_to_path(name)
                    if path is None or (path == ("lm_head", "kernel") and cfg.tie_word_embeddings):
                        logger.debug("skipping %s", name)
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if path[-1] == "kernel" and len(shape) == 2:
                        shape = shape[::-1]
                    check(path, shape, np.dtype("float32"))
                    raw = f.get_tensor(name)
                    done += raw.nbytes
                    items[path] = place_array(_hf_to_ours(path, raw, cfg), path,
                                              dtype=target, shardings=shardings)
                    del raw
                    bar.update(done, len(items))
    finally:
        bar.close()
    check.finish()
    logger.info("loaded %d tensors from %s", len(items), root)
    return unflatten_params(dict(sorted(items.items(), key=lambda kv: _sort_key(kv[0]))))


def _sort_key(path: Path) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in path)


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face LLaMA `config.json` for `cfg` (what `from_hf_json` reads)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_sequence_length,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.theta,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32",
    }


def save_hf_llama(directory: str | os.PathLike, params: Mapping[str, Any],
                  cfg: ModelConfig, *, num_shards: int = 1) -> None:
    """Write our per-layer tree as a HF LLaMA checkpoint (safetensors + config.json).

    Applies HF's q/k row permutation and (out, in) layout. With `num_shards > 1`
    writes `model-0000i-of-0000n.safetensors` files and their index. Vision tables, if
    any, are refused: HF LLaMA has none.
    """
    from safetensors.numpy import save_file

    root = FsPath(directory)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {path_to_hf_name(path): _ours_to_hf(path, np.asarray(value), cfg)
               for path, value in flatten_params(params)}
    (root / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=1))
    if num_shards <= 1:
        save_file(tensors, str(root / HF_SINGLE), metadata={"format": "pt"})
        return
    names = list(tensors)
    groups = [names[i::num_shards] for i in range(num_shards)]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / HF_INDEX).write_text(json.dumps(index, indent=1))


# --------------------------------------------------------------------------- dispatch


def load_checkpoint(spec: str | os.PathLike, cfg: ModelConfig, **kwargs: Any) -> Params:
    """`params::PATH` / a params file -> `load_params`; a HF directory -> `load_hf_llama`.

    `kwargs` are `dtype`, `shardings`, `progress`.
    """
    text = os.fspath(spec)
    if not text.startswith(SPEC_PREFIX) and os.path.isdir(text):
        return load_hf_llama(text, cfg, **kwargs)
    return load_params(text, cfg, **kwargs)
