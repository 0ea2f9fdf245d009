"""Loading what the server runs: model weights, tokenizer, VQGAN, and the demo.

`load_runtime` resolves a model spec into a ready `Runtime`:

* ``demo`` (the default): a small seeded LWM-shaped model with a tokenizer
  trained on text shipped in the repo and a tiny VQGAN, built on first use and
  cached on disk, then loaded through the same checkpoint readers as a real
  model. It runs offline; its words are not meaningful.
* ``nano``: LWM-Nano, the trained model shipped with the package
  (`lwm_serve/nano/weights`, made by ``lwm-serve train-nano``): it answers
  questions about videos and images of its synthetic world of moving shapes.
* a model directory in the demo's layout (``params``, ``config.json``,
  ``tokenizer/``, optional ``vqgan/``), e.g. what ``lwm-serve train-nano`` writes.
* ``params::PATH`` or a params file: an LWM JAX checkpoint (LWM-Chat / LWM-Text
  JAX releases), with its config from ``model_config`` (a reference config
  JSON or a preset name such as ``7b-1m``) or a ``config.json`` beside it.
* a directory with ``config.json`` and safetensors: a Hugging Face LWM-Text model.

Everything that is inconsistent (missing files, vocabulary mismatches) fails
here, before the server accepts a request.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lwm_serve.model import checkpoint
from lwm_serve.model import config as model_config
from lwm_serve.model.config import ModelConfig
from lwm_serve.model.generation import Generator
from lwm_serve.model.params import init_params, unstack_layers
from lwm_serve.tokenizers import vqgan as vq
from lwm_serve.tokenizers.demo_tokenizer import build_demo_tokenizer
from lwm_serve.tokenizers.text import TextTokenizer

logger = logging.getLogger(__name__)

DEMO = "demo"
NANO = "nano"
# Bump when the demo's recipe changes, so stale caches are rebuilt.
DEMO_VERSION = "v1"
DEMO_SEED = 20240213
# A VQGAN of the reference's structure, shrunk like the fixture's, so image and
# video features run on the demo at interactive speed.
DEMO_VQGAN = dict(hidden_channels=32, channel_mult=(1, 1, 1, 1, 2), num_res_blocks=1,
                  z_channels=8, quantized_embed_dim=8)


class LoadError(ValueError):
    """The model, tokenizer or VQGAN cannot be loaded as configured."""


@dataclass
class Runtime:
    generator: Generator
    tokenizer: TextTokenizer
    model_name: str
    cfg: ModelConfig
    vqgan: vq.VQGAN | None = None
    mesh: Any = None
    step_hook: Any = None  # called by the engine worker before each step (tests pace it)
    replica: Any = None    # process 0 of a multi-host run: server/engine/replica.py's Leader

    @property
    def max_context(self) -> int:
        return self.generator.context_limit


def cache_home() -> Path:
    """Where built assets (the demo) are cached: $LWM_SERVE_HOME or ~/.cache/lwm-serve."""
    root = os.environ.get("LWM_SERVE_HOME") or Path.home() / ".cache" / "lwm-serve"
    return Path(root)


def ensure_demo(root: Path | None = None) -> Path:
    """Build the demo model's files once; return their directory.

    Layout: tokenizer/ (SentencePiece), config.json (reference fields),
    params (the reference's params:: format), vqgan/{config.json,vqgan_params.pkl}.
    """
    out = (root or cache_home()) / f"demo-{DEMO_VERSION}"
    done = out / ".complete"
    if done.exists():
        return out
    logger.info("building the embedded demo model in %s (first run only)", out)
    out.mkdir(parents=True, exist_ok=True)
    build_demo_tokenizer(out / "tokenizer")
    cfg = model_config.from_preset(DEMO)
    (out / "config.json").write_text(json.dumps(model_config.to_reference_dict(cfg), indent=1))
    params = init_params(cfg, jax.random.PRNGKey(DEMO_SEED))
    tmp = out / "params.tmp"
    checkpoint.save_params(tmp, params)
    os.replace(tmp, out / "params")
    vq_cfg = vq.VQGANConfig(**DEMO_VQGAN)
    (out / "vqgan").mkdir(exist_ok=True)
    (out / "vqgan" / "config.json").write_text(json.dumps(vq_cfg.to_dict(), indent=1))
    vq_params = jax.tree_util.tree_map(np.asarray, vq.init_params(vq_cfg, seed=DEMO_SEED))
    with open(out / "vqgan" / "vqgan_params.tmp", "wb") as f:
        pickle.dump(vq_params, f, protocol=4)
    os.replace(out / "vqgan" / "vqgan_params.tmp", out / "vqgan" / "vqgan_params.pkl")
    done.write_text("ok\n")
    return out


def nano_dir() -> Path:
    """The shipped LWM-Nano weights (a directory in the demo's layout inside the package)."""
    from lwm_serve import nano

    root = Path(nano.__file__).parent / "weights"
    if bundle_dir(str(root)) is None:
        raise LoadError(f"LWM-Nano's weights are not in this installation ({root}): "
                        "reinstall lwm-serve, or train them with `lwm-serve train-nano --out DIR` "
                        "and serve DIR")
    return root


def bundle_dir(model: str) -> Path | None:
    """`model` as a directory in the demo's layout (params + config.json + tokenizer/), else None."""
    path = Path(model)
    if path.is_dir() and (path / "params").is_file() and (path / "config.json").is_file():
        return path
    return None


def resolve_model_config(model: str, config_spec: str | None) -> ModelConfig:
    """A preset name, a reference config JSON, a HF config.json, or one found beside the weights."""
    if config_spec:
        if config_spec in model_config.preset_names():
            return model_config.from_preset(config_spec)
        path = Path(config_spec)
        if not path.is_file():
            raise LoadError(f"model config {config_spec!r} is neither a preset "
                                f"({', '.join(model_config.preset_names())}) nor a file")
        return _config_from_file(path)
    weights = Path(checkpoint.parse_spec(model))
    candidates = [weights / "config.json"] if weights.is_dir() else [weights.parent / "config.json"]
    for path in candidates:
        if path.is_file():
            return _config_from_file(path)
    raise LoadError(f"no model config for {model!r}: pass --model-config (a preset name or the "
                        "reference's config JSON), or put config.json beside the weights")


def _config_from_file(path: Path) -> ModelConfig:
    raw = json.loads(path.read_text())
    if "model_type" in raw or "max_position_embeddings" in raw:
        return model_config.from_hf_dict(raw)
    return model_config.from_reference_dict(raw)


def _check_vocab(tokenizer: TextTokenizer, cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LoadError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's text "
                            f"vocabulary has only {cfg.vocab_size}: wrong tokenizer for this model")
    if tokenizer.vocab_size < cfg.vocab_size:
        logger.warning("tokenizer has %d tokens, model vocabulary %d (padded vocabulary?)",
                       tokenizer.vocab_size, cfg.vocab_size)


def _check_capacity(cfg: ModelConfig, mesh: Any, dtype: str, context: int, prefill_chunk: int,
                    device_memory: int | None) -> None:
    from lwm_serve.model import planner

    shape = planner.MeshShape.of(mesh) if mesh is not None else planner.MeshShape()
    try:
        fit = planner.check_fits(cfg, shape, dtype=dtype, context=context,
                                 prefill_chunk=prefill_chunk, device_memory=device_memory)
    except planner.CapacityError as exc:
        raise LoadError(f"the configured context does not fit: {exc} "
                        "(lower --max-model-len or change --mesh)") from exc
    logger.info("capacity: %.2f GiB per device of %.2f GiB usable (mesh %s, context %d)",
                fit.total_bytes / 2**30, fit.usable_bytes / 2**30, shape, context)


def resolve_prefill_chunk(cfg: ModelConfig, mesh: Any, prefill_chunk: int | None) -> int:
    """The prefill chunk to serve with: the one asked for, else the measured choice for
    this model and mesh (`chunking.choose_prefill_chunk`)."""
    if prefill_chunk is not None:
        logger.info("prefill chunk: %d tokens (--prefill-chunk)", prefill_chunk)
        return prefill_chunk
    from lwm_serve.model import chunking
    from lwm_serve.model import sharding

    sp = 1 if mesh is None else sharding.axis_size(mesh, sharding.LENGTH)
    chunk = chunking.choose_prefill_chunk(cfg, sp)
    logger.info("prefill chunk: %d tokens (chosen for this model on %d sequence shard%s; "
                "--prefill-chunk overrides)", chunk, sp, "" if sp == 1 else "s")
    return chunk


def load_vqgan(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> vq.VQGAN:
    """The reference's VQGAN params pickle (restricted unpickler) + its config JSON
    (default: config.json beside it, else the real LWM VQGAN's shape)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"no VQGAN params at {path}")
    if config_path:
        cfg = vq.VQGANConfig.from_json(config_path)
    else:
        # LWM releases ship the VQGAN pickle beside the *model's* config.json:
        # only a JSON with VQGAN fields describes the VQGAN.
        beside = path.parent / "config.json"
        is_vqgan = beside.is_file() and "channel_mult" in json.loads(beside.read_text())
        cfg = vq.VQGANConfig.from_json(beside) if is_vqgan else vq.VQGANConfig()
    return vq.VQGAN.from_pickle(path, cfg)


def load_runtime(model: str = DEMO, *, model_config_spec: str | None = None,
                 tokenizer: str | None = None, vqgan: str | None = None,
                 served_model_name: str | None = None, dtype: str = "float32",
                 max_model_len: int | None = None, prefill_chunk: int | None = None,
                 mesh: Any = None, device_memory: int | None = None,
                 progress: bool = True, load_format: str = "auto") -> Runtime:
    """Load weights, tokenizer and (optionally) the VQGAN; validate they fit together.

    Before any weight is read, the capacity planner checks that parameters, the
    KV cache of `max_model_len` tokens and the prefill peak fit each device
    (`device_memory` bytes; default: what the accelerator reports, else 32 GiB).
    `prefill_chunk` None: chosen for the model and mesh (`resolve_prefill_chunk`).
    """
    name = served_model_name
    if load_format == "dummy":
        return _dummy_runtime(model_config_spec, tokenizer=tokenizer, vqgan=vqgan, name=name, dtype=dtype,
                              max_model_len=max_model_len, prefill_chunk=prefill_chunk, mesh=mesh,
                              device_memory=device_memory)
    if load_format != "auto":
        raise LoadError(f"unknown load format {load_format!r} (auto, dummy)")
    root = ensure_demo() if model == DEMO else nano_dir() if model == NANO else bundle_dir(model)
    if root is not None:
        weights, model_config_spec = str(root / "params"), model_config_spec or str(root / "config.json")
        tokenizer = tokenizer or str(root / "tokenizer")
        if vqgan is None and (root / "vqgan" / "vqgan_params.pkl").is_file():
            vqgan = str(root / "vqgan" / "vqgan_params.pkl")
        name = name or {DEMO: "lwm-demo", NANO: "lwm-nano"}.get(model) or root.resolve().name
    else:
        weights = model
    if not Path(checkpoint.parse_spec(weights)).exists():
        raise LoadError(f"checkpoint not found: {checkpoint.parse_spec(weights)}")
    cfg = resolve_model_config(weights, model_config_spec)
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    if max_model_len is not None:
        if max_model_len > cfg.max_sequence_length:
            raise LoadError(f"max model length {max_model_len} exceeds the model's "
                                f"max_sequence_length {cfg.max_sequence_length}")
    if tokenizer is None:
        local = Path(checkpoint.parse_spec(weights))
        local = local if local.is_dir() else local.parent
        if (local / "tokenizer.model").is_file():
            tokenizer = str(local)
        else:
            raise LoadError("no tokenizer: pass --tokenizer (a directory with tokenizer.model)")
    tok = TextTokenizer(tokenizer)
    _check_vocab(tok, cfg)
    prefill_chunk = resolve_prefill_chunk(cfg, mesh, prefill_chunk)
    _check_capacity(cfg, mesh, dtype, max_model_len or cfg.max_sequence_length, prefill_chunk,
                    device_memory)
    shardings = None
    if mesh is not None:
        from lwm_serve.model import sharding
        shardings = sharding.param_shardings(cfg, mesh)
    params = checkpoint.load_checkpoint(weights, cfg, dtype=dtype, shardings=shardings,
                                        progress=progress)
    # The Generator computes from per-layer arrays; converting here, consuming
    # the loaded tree tensor by tensor, keeps the peak at one extra tensor.
    params, compute_cfg = unstack_layers(params, cfg, consume=True)
    generator = Generator(params, compute_cfg, prefill_chunk=prefill_chunk, max_context=max_model_len,
                          **({"mesh": mesh} if mesh is not None else {}))
    vq_model = load_vqgan(vqgan) if vqgan else None
    name = name or Path(checkpoint.parse_spec(weights)).name
    logger.info("model %s ready: %d layers, hidden %d, context %d, dtype %s", name,
                cfg.num_hidden_layers, cfg.hidden_size, generator.context_limit, dtype)
    return Runtime(generator=generator, tokenizer=tok, model_name=name, cfg=cfg,
                   vqgan=vq_model, mesh=mesh)


UNKNOWN_ID_TEXT = " <id:{id}>"


def _dummy_runtime(config_spec: str | None, *, tokenizer: str | None, vqgan: str | None, name: str | None,
                   dtype: str, max_model_len: int | None, prefill_chunk: int | None, mesh: Any,
                   device_memory: int | None) -> Runtime:
    """Random weights of a preset (vLLM's `--load-format dummy`): benchmarks at a real
    model's shape with no checkpoint. Tokenizer and VQGAN default to the demo's; ids
    the tokenizer does not know decode as `UNKNOWN_ID_TEXT`, and read back as those ids
    when a client sends them again (the assistant's turn of a conversation)."""
    if not config_spec:
        raise LoadError("--load-format dummy needs --model-config (a preset name or a config JSON)")
    root = ensure_demo()
    cfg = resolve_model_config(str(root / "params"), config_spec).replace(dtype=dtype, param_dtype=dtype)
    if max_model_len is not None and max_model_len > cfg.max_sequence_length:
        raise LoadError(f"max model length {max_model_len} exceeds the model's "
                        f"max_sequence_length {cfg.max_sequence_length}")
    tok = TextTokenizer(tokenizer or root / "tokenizer")
    tok.unknown_id_text, tok.unknown_id_limit = UNKNOWN_ID_TEXT, cfg.vocab_size
    _check_vocab(tok, cfg)
    prefill_chunk = resolve_prefill_chunk(cfg, mesh, prefill_chunk)
    _check_capacity(cfg, mesh, dtype, max_model_len or cfg.max_sequence_length, prefill_chunk, device_memory)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    params, compute_cfg = unstack_layers(params, cfg, consume=True)
    generator = Generator(params, compute_cfg, prefill_chunk=prefill_chunk, max_context=max_model_len,
                          **({"mesh": mesh} if mesh is not None else {}))
    vq_model = load_vqgan(vqgan or root / "vqgan" / "vqgan_params.pkl")
    label = config_spec if config_spec in model_config.preset_names() else Path(config_spec).stem
    logger.info("dummy weights: %s (%d layers, hidden %d), context %d", label, cfg.num_hidden_layers,
                cfg.hidden_size, generator.context_limit)
    return Runtime(generator=generator, tokenizer=tok, model_name=name or f"dummy-{label}", cfg=cfg,
                   vqgan=vq_model, mesh=mesh)
