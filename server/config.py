"""Server settings: every CLI flag is also an environment variable (`LWM_SERVE_*`).

Precedence (pydantic-settings): explicit values (the CLI) > environment > defaults.
Bad combinations fail here, at start, with a message naming the setting, before
anything heavy is loaded.

Note on names: pydantic reserves `model_config`, so the reference config JSON is
`model_config_path` (flag `--model-config`, env `LWM_SERVE_MODEL_CONFIG_PATH`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lwm_serve.tokenizers.vision_layout import END_OF_FRAME, END_OF_VISION

logger = logging.getLogger(__name__)

ENV_PREFIX = "LWM_SERVE_"
DEMO_MODEL = "demo"
NANO_MODEL = "nano"  # LWM-Nano, shipped in the package (runtime.nano_dir); `./nano` names a folder
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


def mesh_size(spec: str) -> int | None:
    """Devices a `dp,fsdp,tp,sp` mesh spec needs (None: one axis is -1, i.e. all).

    Syntax is checked by the model's own parser (`model.mesh.parse_mesh_dim`);
    whether the devices exist is checked when the mesh is built.

    Raises:
        ValueError: a malformed spec.
    """
    from lwm_serve.model.mesh import parse_mesh_dim

    text = spec.strip().lstrip("!")
    try:
        sizes = [int(p.split(":")[-1]) for p in text.split(",") if p.strip()]
    except ValueError:
        sizes = []
    fixed = 1
    for size in sizes:
        fixed *= size if size > 0 else 1
    dims, _ = parse_mesh_dim(spec, max(fixed, 1))
    return None if -1 in sizes else int(math.prod(dims))


def _split_keys(value: Any) -> Any:
    # Env values arrive as one string: accept "k1,k2" as well as a JSON list.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [k.strip() for k in text.split(",") if k.strip()]
    return value


def _missing_vqgan(path: Path) -> str:
    """Why `--vqgan PATH` is no VQGAN pickle, naming what is missing."""
    if path.is_dir():
        pickles = sorted(p.name for p in path.glob("*.pkl"))
        found = f"it holds {', '.join(pickles)}" if pickles else "it holds no .pkl file"
        return (f"--vqgan {os.fspath(path)!r} is a directory; pass the VQGAN params pickle itself "
                f"(e.g. {os.fspath(path / 'vqgan_params.pkl')!r}); {found}")
    return f"VQGAN params {os.fspath(path)!r} do not exist"


class ServerSettings(BaseSettings):
    """Everything `lwm-serve` needs to start (see `lwm-serve serve --help`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- what to serve
    model: str = Field(DEMO_MODEL, description=(
        "checkpoint: 'demo' (embedded random demo model), 'nano' (LWM-Nano, the small model "
        "shipped with the package, trained on a world of moving shapes), a model directory "
        "(params + config.json + tokenizer/, e.g. from train-nano), 'params::PATH' (LWM JAX "
        "checkpoint, with --model-config), or a Hugging Face LWM-Text folder"))
    model_config_path: str | None = Field(None, description=(
        "model config: a reference config JSON (VideoLLaMAConfig fields), a HF config.json or a "
        "preset name (e.g. 7b-1m); default: config.json beside the weights"))
    tokenizer: str | None = Field(None, description=(
        "tokenizer directory (tokenizer.model); default: the demo's, or the one beside the weights"))
    vqgan: str | None = Field(None, description="VQGAN params (pickle); optional, needed for images/video")
    served_model_name: str | None = Field(None, description="model id in the API (default: derived from --model)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute/parameter dtype")
    mesh: str = Field("1,1,1,1", description="device mesh dp,fsdp,tp,sp (one axis may be -1)")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + completion (default: the model's)")
    prefill_chunk: int | None = Field(None, ge=1, description=(
        "longest prompt piece prefilled in one step; default: the smallest chunk that fills the "
        "matmuls on this mesh (model.chunking.choose_prefill_chunk: 512 tokens per sequence shard)"))
    load_format: Literal["auto", "dummy"] = Field("auto", description=(
        "'auto': read the weights of --model; 'dummy': random weights of the --model-config preset "
        "(benchmarks and capacity tests; vLLM's name), served with the demo tokenizer"))
    # --- accelerator and multi-host (JAX multi-controller)
    accelerator: Literal["auto", "cpu", "gpu", "tpu"] = Field("auto", description=(
        "platform JAX must run on; 'tpu'/'gpu' refuse to start when JAX fell back to CPU (a "
        "container started without --privileged or its GPUs); 'auto': whatever JAX finds, with "
        "a loud warning when an accelerator plugin is installed but JAX runs on CPU"))
    coordinator: str | None = Field(None, description=(
        "HOST:PORT of process 0's jax.distributed coordinator (multi-host; with --num-processes "
        "and --process-id). Absent: detected from the JAX/TPU/SLURM environment"))
    num_processes: int | None = Field(None, ge=1, description="processes (hosts) in the multi-host run")
    process_id: int | None = Field(None, ge=0, description="this process's index, 0 .. num_processes-1")
    distributed: bool | None = Field(None, description=(
        "initialise jax.distributed: true always (a TPU VM pod slice, where JAX reads the "
        "topology from the TPU metadata), false never; unset: when --coordinator or the "
        "environment asks for it"))
    heartbeat_timeout_s: int = Field(30, ge=1, description=(
        "multi-host: a process silent this long counts as dead (jax.distributed heartbeats); "
        "process 0 then answers 503 on /ready and every request"))
    # --- HTTP
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0: any free port)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "accepted bearer keys (comma-separated in the env); empty: no auth. LWM_SERVE_API_KEY adds one"))
    api_key: str | None = Field(None, description="one more accepted key (env LWM_SERVE_API_KEY)")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"], description="CORS allowed origins")
    log_level: LogLevel = Field("info", description="log level")
    playground: bool = Field(True, description=(
        "serve the web playground (static page) at / and /playground; --no-playground for API-only deployments"))
    # --- engine
    max_queue: int = Field(64, ge=1, description="requests waiting for the model beyond which 503 is returned")
    max_batch: int = Field(16, ge=1, description="most rows (prompts x n) one request may ask for")
    default_max_tokens: int = Field(512, ge=1, description=(
        "chat completion length when the request sets none (capped by the free context)"))
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 queue-full answers")
    max_num_seqs: int = Field(16, ge=1, le=4096, description=(
        "decode slots: most sequences (requests x n) generating at once; the KV pool has one row each"))
    kv_cache_bytes: int | None = Field(None, ge=1, description=(
        "bound on the KV pool's bytes: fewer decode slots when --max-num-seqs rows would not fit"))
    prefix_cache_bytes: int = Field(1 << 30, ge=0, description=(
        "bytes of finished prompt prefills kept for reuse by prompts with the same start "
        "(multi-turn chats, follow-up questions on a video); 0 disables"))
    max_sessions: int = Field(16, ge=0, le=4096, description=(
        "most `session` names keeping prompt prefills pinned in the prefix cache at once (a request "
        "naming a new one beyond gets 429 until DELETE /v1/sessions/{session} releases one)"))
    request_timeout_s: float | None = Field(None, gt=0, le=7 * 24 * 3600, description=(
        "a request still running after this many seconds fails with 504; unset: no limit"))
    warmup: bool = Field(True, description=(
        "compile the decode steps and the prefill and copy shapes of prompts up to 4 chunks before "
        "/ready says yes, and every longer prefill shape in idle time after"))
    compile_cache_dir: Path | None = Field(None, description=(
        "where compiled XLA programs are kept across restarts (JAX's persistent compilation cache: a "
        "restart loads the warm-up's programs instead of compiling them again). Default: "
        "$LWM_SERVE_HOME/compile-cache or ~/.cache/lwm-serve/compile-cache"))
    compile_cache: bool = Field(True, description="keep compiled programs in compile_cache_dir")
    # --- files and media (images / video)
    data_dir: Path | None = Field(None, description=(
        "where uploaded files (files/) and the VQGAN code cache (vision_cache/) live; survives "
        "restarts. Default: $LWM_SERVE_HOME/data or ~/.cache/lwm-serve/data"))
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description=(
        "largest accepted upload / data URL / fetched media, in bytes (413 beyond)"))
    max_video_seconds: float | None = Field(4 * 3600.0, gt=0, description=(
        "longest accepted video in seconds (400 beyond); unset: no limit"))
    max_media_pixels: int | None = Field(8192 * 8192, ge=1, description=(
        "most pixels of an image or video frame (width x height, read from its header); larger "
        "ones are refused (413) before anything is decoded; unset: no limit beyond Pillow's own"))
    vision_cache_bytes: int | None = Field(None, ge=1, description=(
        "size cap of the VQGAN code cache (least recently used entries evicted); unset: no cap"))
    media_url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "domains from which image_url/video_url may fetch http(s) media (comma-separated in the "
        "env; a domain also allows its subdomains); empty: remote URLs are refused"))
    media_fetch_timeout_s: float = Field(30.0, gt=0, description="timeout of one remote media fetch read")
    frame_layout: Literal["standard", "vision_chat"] = Field("standard", description=(
        f"frame delimiters in the prompt. 'standard': {END_OF_FRAME} after every frame but the last, "
        f"{END_OF_VISION} after the last; the layout LWM was trained on (lwm/data.py, DESIGN.md). "
        f"'vision_chat': {END_OF_VISION} after EVERY frame; exactly what the reference vision_chat script "
        f"feeds (it VQGAN-encodes one frame per batch and ends each batch with {END_OF_VISION}). One image: "
        "both agree"))
    vqgan_batch: int | None = Field(None, ge=1, le=64, description=(
        "frames per VQGAN encode call; unset: measured at start-up (batch 1, 2, 4, 8 until one is not "
        "faster per frame) and each request's frames split into the measured sizes of least time"))
    image_url_ttl_s: float = Field(3600.0, gt=0, description=(
        "how long a generated image's URL (response_format 'url') stays valid"))
    auto_fps: bool = Field(False, description=(
        "when a video's frames do not fit the context, sample fewer (lower fps / max_frames) "
        "instead of answering 400; a request can also ask with the extra 'auto_fps': true"))

    @field_validator("api_keys", "cors_origins", "media_url_allowlist", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return _split_keys(value)

    @field_validator("mesh")
    @classmethod
    def _check_mesh(cls, value: str) -> str:
        mesh_size(value)  # raises MeshSpecError (a ValueError) with the reason
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, value: list[str]) -> list[str]:
        if any(not k for k in value):
            raise ValueError("API keys must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "ServerSettings":
        # Only what can be checked without loading anything; the runtime loader
        # checks that the files fit together (config vs weights vs tokenizer).
        if self.model_config_path is not None and not Path(self.model_config_path).is_file():
            from lwm_serve.model.config import preset_names

            if self.model_config_path not in preset_names():
                raise ValueError(f"--model-config {self.model_config_path!r} is neither a file nor a "
                                 f"preset name ({', '.join(preset_names())})")
        if self.model.startswith("params::"):
            path = self.model[len("params::"):]
            if not Path(path).is_file():
                raise ValueError(f"checkpoint file {path!r} does not exist")
        elif self.model not in (DEMO_MODEL, NANO_MODEL) and not Path(self.model).exists():
            raise ValueError(f"--model {self.model!r} is neither 'demo', 'nano', a 'params::PATH' spec nor an "
                             "existing checkpoint file or Hugging Face model folder")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ValueError(f"tokenizer {self.tokenizer!r} does not exist")
        if self.vqgan is not None and not Path(self.vqgan).is_file():
            raise ValueError(_missing_vqgan(Path(self.vqgan)))
        self._check_distributed()
        return self

    def _check_distributed(self) -> None:
        given = {"--coordinator": self.coordinator, "--num-processes": self.num_processes,
                 "--process-id": self.process_id}
        if any(v is not None for v in given.values()):
            missing = [flag for flag, v in given.items() if v is None]
            if missing:
                raise ValueError(f"multi-host flags go together: also pass {', '.join(missing)} "
                                 "(or none of them, to detect them from the environment)")
            if self.distributed is False:
                raise ValueError("--coordinator contradicts --no-distributed")
            host, _, port = str(self.coordinator).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--coordinator {self.coordinator!r} is not HOST:PORT")
            assert self.process_id is not None and self.num_processes is not None
            if self.process_id >= self.num_processes:
                raise ValueError(f"--process-id {self.process_id} must be below --num-processes "
                                 f"{self.num_processes}")

    @field_validator("media_url_allowlist")
    @classmethod
    def _clean_domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            d = domain.strip().lower().rstrip(".")
            if not d or any(c in d for c in "/:@?# "):
                raise ValueError(f"media_url_allowlist entries are bare domains (e.g. example.com), got {domain!r}")
            out.append(d)
        return out

    def resolved_data_dir(self) -> Path:
        """`data_dir`, or its default under $LWM_SERVE_HOME (~/.cache/lwm-serve)."""
        if self.data_dir is not None:
            return Path(self.data_dir)
        return _home() / "data"

    def resolved_compile_cache_dir(self) -> Path | None:
        """Where compiled programs are kept (None: `compile_cache` is off)."""
        if not self.compile_cache:
            return None
        return Path(self.compile_cache_dir) if self.compile_cache_dir is not None else _home() / "compile-cache"

    @property
    def mesh_size(self) -> int | None:
        """Devices the mesh needs (None: all of them, one axis is -1)."""
        return mesh_size(self.mesh)

    @property
    def accepted_keys(self) -> frozenset[str]:
        """Every accepted bearer key (empty: authentication is off)."""
        keys = set(self.api_keys)
        if self.api_key:
            keys.add(self.api_key)
        return frozenset(keys)


def _home() -> Path:
    import os

    return Path(os.environ.get("LWM_SERVE_HOME") or Path.home() / ".cache" / "lwm-serve")
