"""Model configuration: the reference's VideoLLaMAConfig fields, presets, loaders.

Field names follow LWM's `VideoLLaMAConfig` / `LLaMAConfig` so that a reference
`config.json` loads unchanged. Serving-only knobs (dtypes, attention block sizes)
live beside them with defaults that keep the reference's numerics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]

# Sizes from LWM's LLAMA_STANDARD_CONFIGS (llama.py), plus bench-150m (the
# benchmark model of DESIGN.md) and `demo` (the embedded offline demo model).
_PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(vocab_size=32000, hidden_size=256, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=2, max_sequence_length=2048),
    "200m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048,
                 num_hidden_layers=14, num_attention_heads=8, max_sequence_length=2048),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
               num_hidden_layers=22, num_attention_heads=16, max_sequence_length=2048),
    "3b": dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640,
               num_hidden_layers=26, num_attention_heads=32, max_sequence_length=2048),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, max_sequence_length=4096),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                num_hidden_layers=40, num_attention_heads=40, max_sequence_length=2048),
    "30b": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                num_hidden_layers=60, num_attention_heads=52, max_sequence_length=2048),
    "65b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                num_hidden_layers=80, num_attention_heads=64, max_sequence_length=2048,
                rms_norm_eps=1e-5),
    # LWM-Chat-1M / LWM-Text-1M: the 7B body with the 1M-context RoPE theta.
    "7b-1m": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32,
                  max_sequence_length=1048576, theta=50_000_000.0),
    "bench-150m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12,
                       max_sequence_length=32768, theta=10_000_000.0),
    # LWM-Nano (nano/): the shipped default model, trained here on a synthetic world.
    "nano": dict(vocab_size=512, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4,
                 max_sequence_length=4096, theta=10000.0),
    "demo": dict(vocab_size=512, hidden_size=128, intermediate_size=344,
                 num_hidden_layers=2, num_attention_heads=4,
                 max_sequence_length=32768, theta=10_000_000.0),
}

# Keys of the reference config that describe training or flax internals only.
_IGNORED_REFERENCE_KEYS = {
    "use_cache", "resid_pdrop", "embd_pdrop", "attn_pdrop", "scan_attention",
    "scan_mlp", "scan_mlp_chunk_size", "mesh_dim", "sample_mode", "remat_block",
    "remat_attention", "remat_mlp", "fcm_min_ratio", "fcm_max_ratio",
    "transformers_version", "architectures", "model_type", "torch_dtype",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of an LWM (VideoLLaMA) model.

    Attributes mirror the reference's config names. `num_key_value_heads` is
    None for LWM (plain multi-head attention); Hugging Face LLaMA checkpoints may
    set it (grouped-query attention).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_sequence_length: int = 4096
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    theta: float = 10000.0
    # Vision vocabulary: 8192 VQGAN codes + delimiters/extras.
    vision_vocab_size: int = 8448
    tie_vision_embeddings: bool = False
    # Parameter layout: scanned (one stacked subtree) or one subtree per layer.
    scan_layers: bool = True
    param_scan_axis: int = 0
    # Attention block sizes (the reference's scan_query/key_chunk_size).
    scan_query_chunk_size: int = 128
    scan_key_chunk_size: int = 128
    # Numerics: parameters are cast to `param_dtype` on load; matmuls run in `dtype`.
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.kv_heads <= 0 or self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.param_scan_axis not in (0, 1):
            raise ValueError(f"param_scan_axis must be 0 or 1, got {self.param_scan_axis}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (both embeddings and both heads)."""
        h, m, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h
        emb = (self.vocab_size + self.vision_vocab_size) * h
        heads = 0 if self.tie_word_embeddings else self.vocab_size * h
        heads += 0 if self.tie_vision_embeddings else self.vision_vocab_size * h
        return layers * per_layer + emb + heads + h


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named size preset (the reference's LLAMA_STANDARD_CONFIGS and ours)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def from_reference_dict(raw: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Build from the reference's VideoLLaMAConfig fields (a `json::` config)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(raw) - fields - _IGNORED_REFERENCE_KEYS
    if unknown:
        logger.warning("ignoring unknown config keys: %s", sorted(unknown))
    kwargs = {k: v for k, v in raw.items() if k in fields}
    return ModelConfig(**{**kwargs, **overrides})


def from_reference_json(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    with open(path) as f:
        return from_reference_dict(json.load(f), **overrides)


def from_hf_dict(raw: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Build from a Hugging Face LLaMA `config.json` (LWM-Text models).

    HF LLaMA checkpoints have no vision tables; the converted tree uses the
    per-layer layout (`scan_layers=False`).
    """
    if raw.get("model_type", "llama") != "llama":
        raise ValueError(f"expected a LLaMA config, got model_type={raw.get('model_type')!r}")
    if raw.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported (LWM uses plain RoPE with a large theta)")
    kwargs = dict(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads"),
        max_sequence_length=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        theta=float(raw.get("rope_theta", 10000.0)),
        vision_vocab_size=0,
        scan_layers=False,
    )
    if kwargs["num_key_value_heads"] == kwargs["num_attention_heads"]:
        kwargs["num_key_value_heads"] = None
    return ModelConfig(**{**kwargs, **overrides})


def from_hf_json(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    with open(path) as f:
        return from_hf_dict(json.load(f), **overrides)


def to_reference_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config as reference-style JSON (what `from_reference_dict` reads)."""
    return dataclasses.asdict(cfg)
