"""The objects built once at startup from a loaded runtime: engine, stores and handlers.

Files live under `<data_dir>/files` (FileStore: blobs + SQLite), VQGAN codes under
`<data_dir>/vision_cache`, media temp files under `<data_dir>/tmp` (emptied at start),
video jobs under `<data_dir>/jobs` (JobStore), images served by URL under `<data_dir>/images`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from lwm_serve.model.config import ModelConfig
from lwm_serve.model.generation import Generator
from lwm_serve.server.config import ServerSettings
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.handlers.chat import ChatHandler
from lwm_serve.server.handlers.common import HandlerLimits
from lwm_serve.server.handlers.completions import CompletionHandler
from lwm_serve.server.handlers.files import FilesHandler
from lwm_serve.server.handlers.frame_generation import FrameDrawer
from lwm_serve.server.handlers.images import ImagesHandler
from lwm_serve.server.handlers.models import ModelsHandler
from lwm_serve.server.handlers.video_questions import VideoQuestionHandler
from lwm_serve.server.handlers.videos import VideosHandler
from lwm_serve.server.media_sources import SourceResolver, TempFiles
from lwm_serve.server.stores.files import FileStore
from lwm_serve.server.media_service import MediaService
from lwm_serve.server.stores.jobs import JobStore
from lwm_serve.server.stores.outputs import ExpiringOutputs
from lwm_serve.tokenizers.vision_cache import VisionCache
from lwm_serve.tokenizers.text import TextTokenizer

logger = logging.getLogger(__name__)


class RuntimeLike(Protocol):
    """What the server needs from `server.runtime.Runtime`."""

    generator: Generator
    tokenizer: TextTokenizer
    model_name: str
    cfg: ModelConfig
    vqgan: Any


class RuntimeMismatchError(ValueError):
    """The tokenizer and the model do not belong together."""


def check_runtime(runtime: RuntimeLike) -> None:
    """Refuses a tokenizer that does not fit the model (clear message at start)."""
    tok, cfg = runtime.tokenizer, runtime.cfg
    if tok.vocab_size > cfg.vocab_size:
        raise RuntimeMismatchError(
            f"vocab size mismatch: the tokenizer has {tok.vocab_size} pieces but the model's text "
            f"vocabulary has {cfg.vocab_size} rows; use the tokenizer the checkpoint was trained with")
    for name in ("bos_id", "eos_id"):
        if getattr(tok, name) >= cfg.vocab_size:
            raise RuntimeMismatchError(f"tokenizer {name} {getattr(tok, name)} is outside the model's "
                                       f"vocabulary of {cfg.vocab_size}")


@dataclass
class Services:
    runtime: RuntimeLike
    engine: Engine
    chat: ChatHandler
    completions: CompletionHandler
    models: ModelsHandler
    model_name: str
    files: FilesHandler
    video: VideoQuestionHandler
    images: ImagesHandler
    videos: VideosHandler
    vision: MediaService | None = None

    def close(self) -> None:
        """Releases what the engine does not own (call after the engine stopped)."""
        if self.vision is not None:
            self.vision.close()
        self.files.store.close()
        self.videos.store.close()


def build_services(settings: ServerSettings, runtime: RuntimeLike, observer: Any = None) -> Services:
    """Engine, stores and handlers for a loaded runtime (the engine is not started yet)."""
    check_runtime(runtime)
    name = settings.served_model_name or runtime.model_name
    engine = Engine(runtime.generator, max_queue=settings.max_queue, retry_after_s=settings.retry_after_s,
                    max_num_seqs=settings.max_num_seqs, kv_cache_bytes=settings.kv_cache_bytes,
                    prefix_cache_bytes=settings.prefix_cache_bytes,
                    request_timeout_s=settings.request_timeout_s, max_sessions=settings.max_sessions,
                    observer=observer,
                    step_hook=getattr(runtime, "step_hook", None), replica=getattr(runtime, "replica", None))
    limits = HandlerLimits(default_max_tokens=settings.default_max_tokens, max_batch=settings.max_batch)
    data = settings.resolved_data_dir()
    store = FileStore(data / "files", settings.max_upload_bytes)
    vision = None
    if runtime.vqgan is not None:
        sources = SourceResolver(store, TempFiles(data / "tmp"), settings.media_url_allowlist,
                                 settings.max_upload_bytes, settings.media_fetch_timeout_s)
        vision = MediaService(runtime.vqgan, runtime.tokenizer,
                               VisionCache(data / "vision_cache", settings.vision_cache_bytes), sources,
                               layout=settings.frame_layout, context_limit=engine.context_limit,
                               max_video_seconds=settings.max_video_seconds, auto_fps=settings.auto_fps,
                               max_pixels=settings.max_media_pixels, observer=observer,
                               vqgan_batch=settings.vqgan_batch)
        vision.ingester.busy = engine.defer_idle_work
    logger.info("data dir %s (files, vision cache); VQGAN %s, frame layout %s", data,
                "loaded" if vision is not None else "absent (image/video requests get 400)", settings.frame_layout)
    drawer = FrameDrawer(engine, runtime.tokenizer, runtime.vqgan)
    return Services(
        runtime=runtime,
        engine=engine,
        chat=ChatHandler(engine, runtime.tokenizer, name, limits, vision),
        completions=CompletionHandler(engine, runtime.tokenizer, name, runtime.cfg.vocab_size, limits),
        models=ModelsHandler(name, int(time.time())),
        model_name=name,
        files=FilesHandler(store),
        video=VideoQuestionHandler(engine, runtime.tokenizer, name, vision, limits),
        images=ImagesHandler(drawer, ExpiringOutputs(data / "images", settings.image_url_ttl_s), name),
        videos=VideosHandler(drawer, JobStore(data / "jobs"), vision, name),
        vision=vision,
    )
