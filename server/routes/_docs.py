"""OpenAPI `responses=` entries shared by the routes (the error statuses)."""

from __future__ import annotations

from typing import Any

from lwm_serve.server.schemas.common import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    429: {"model": ErrorResponse, "description": "a new `session` name beyond --max-sessions"},
    503: {"model": ErrorResponse, "description": "queue full or model loading (see Retry-After)"},
}

MEDIA_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "unknown model or file id"},
    413: {"model": ErrorResponse, "description": "upload larger than the server's limit"},
    415: {"model": ErrorResponse, "description": "not a supported image or video format"},
}
