"""GET /health (process up), /ready (model loaded and warm), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from lwm_serve.server import metrics
from lwm_serve.server.errors import ServiceUnavailableError, error_response

router = APIRouter(tags=["health"])


def is_ready(request: Request) -> bool:
    services = getattr(request.app.state, "services", None)
    return bool(getattr(request.app.state, "ready", False) and services is not None and services.engine.alive
                and not services.engine.draining)


@router.get("/health")
async def health() -> JSONResponse:
    """The process is up (says nothing about the model)."""
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 (OpenAI error body) before."""
    if not is_ready(request):
        return error_response(ServiceUnavailableError("the model is not ready yet", code="model_loading",
                                                      headers={"Retry-After": "5"}))
    return JSONResponse({"status": "ready", "model": request.app.state.services.model_name})


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition (see server/metrics.py for the names)."""
    return Response(request.app.state.metrics.render(), media_type=metrics.CONTENT_TYPE)
