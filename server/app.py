"""build_app(): wiring only (lifespan, routers, middleware, error handlers).

The runtime (weights + tokenizer) is loaded in the lifespan, never at import,
unless the caller passes one (the CLI loads it first to fail fast with a clear
message; tests pass a tiny one). After the engine starts, a tiny warm-up request
compiles the common shapes in the background; `/ready` says yes when it is done,
while `/health` answers from the first moment.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lwm_serve.server.config import ServerSettings
from lwm_serve.server.errors import install_error_handlers
from lwm_serve.server.metrics import MetricsMiddleware, ServerMetrics
from lwm_serve.server.routes import chat, completions, files, health, images, models, sessions, video, videos
from lwm_serve.server.routes.playground import install_playground
from lwm_serve.server.schemas.chat import ChatCompletionRequest, ChatMessage
from lwm_serve.server.services import RuntimeLike, Services, build_services

logger = logging.getLogger(__name__)


def load_runtime_for(settings: ServerSettings, *, progress: bool = True) -> RuntimeLike:
    """Loads the runtime the settings describe (imported lazily: heavy).

    A mesh of one device ("1,1,1,1", the default) means no mesh: plain
    single-device arrays.
    """
    from lwm_serve.server.runtime import load_runtime

    use_compile_cache(settings.resolved_compile_cache_dir())
    mesh = None
    if settings.mesh_size != 1:
        from lwm_serve.model.mesh import make_mesh

        mesh = make_mesh(settings.mesh)
    return load_runtime(settings.model, model_config_spec=settings.model_config_path,
                        tokenizer=settings.tokenizer, vqgan=settings.vqgan,
                        served_model_name=settings.served_model_name, dtype=settings.dtype,
                        max_model_len=settings.max_model_len, prefill_chunk=settings.prefill_chunk,
                        mesh=mesh, progress=progress, load_format=settings.load_format)


def use_compile_cache(path: Path | None) -> None:
    """Keeps every compiled XLA program in `path` (JAX's persistent compilation cache, for
    the whole process): a restart, or another server of the same model in this process,
    loads the warm-up's programs instead of compiling them again (demo model: 23 s of
    compiles became 4 s of loads in a measurement on the 2-core CPU host)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if path is None or jax.config.jax_compilation_cache_dir == str(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    # JAX decides once per process, at its first compile, whether a cache is used: start over.
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the warm-up's many small ones too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # however small


async def warm_up(services: Services) -> None:
    """One tiny greedy chat request through the whole stack (compiles a prefill; it
    waits behind the engine's precompile of the decode steps and short prompts' shapes) while the VQGAN hashes
    its parameters and compiles its first encode sizes (`MediaService.prepare`: XLA
    compiles are mostly one thread, the machine has more); then, with the engine idle
    (its idle-time warm-up held off), the encode sizes are timed and the fastest kept (`MediaService.warm_up`): the
    timings are the VQGAN's own, and no first video pays a compile."""
    vision = services.vision
    prepared = asyncio.ensure_future(asyncio.to_thread(vision.prepare)) if vision is not None else None
    try:
        req = ChatCompletionRequest(messages=[ChatMessage(role="user", content="Hi")], max_tokens=2, temperature=0)
        await services.chat.create(req)
    finally:
        if prepared is not None:
            await prepared
    if vision is not None:
        def timed_warm_up() -> None:
            with services.engine.defer_idle_work():  # the encode sizes are timed alone
                vision.warm_up()

        await asyncio.to_thread(timed_warm_up)


def build_app(settings: ServerSettings, runtime: RuntimeLike | None = None) -> FastAPI:
    """The ASGI app.

    Args:
        settings: server settings.
        runtime: an already loaded runtime; None loads one in the lifespan.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime
        if rt is None:
            logger.info("loading model %s", settings.model)
            rt = await asyncio.to_thread(load_runtime_for, settings)
        services = build_services(settings, rt, observer=app.state.metrics)
        services.engine.start(precompile=settings.warmup)
        app.state.services = services
        warm = asyncio.create_task(_warm_then_ready(app, services, settings.warmup))
        logger.info("serving %r", services.model_name)
        try:
            yield
        finally:
            app.state.ready = False
            warm.cancel()
            await services.videos.close()
            await asyncio.to_thread(services.engine.stop)
            services.close()
            logger.info("engine stopped")

    app = FastAPI(title="lwm-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for the Large World Model (LWM).")
    app.state.settings = settings
    app.state.services = None
    app.state.ready = False
    app.state.metrics = ServerMetrics(app.state)
    for router in (health.router, models.router, chat.router, completions.router, files.router,
                   video.router, images.router, videos.router, sessions.router):
        app.include_router(router)
    if settings.playground:
        install_playground(app)
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    return app


async def _warm_then_ready(app: FastAPI, services: Services, warmup: bool) -> None:
    if warmup:
        try:
            await warm_up(services)
            logger.info("warm-up done")
        except asyncio.CancelledError:
            raise
        except Exception:  # the server can still serve; the first request compiles instead
            logger.exception("warm-up failed")
    app.state.ready = True
