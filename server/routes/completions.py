"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_completion_handler
from lwm_serve.server.handlers.completions import CompletionHandler
from lwm_serve.server.routes._docs import ERRORS
from lwm_serve.server.schemas.completions import CompletionRequest, CompletionResponse
from lwm_serve.server.streaming import respond

router = APIRouter(tags=["completions"], dependencies=[Depends(require_api_key)])


@router.post("/v1/completions", response_model=None, responses={
    200: {"model": CompletionResponse,
          "content": {"text/event-stream": {"description": "text_completion events, then [DONE]"}}},
    **ERRORS})
async def create_completion(body: CompletionRequest, request: Request,
                            handler: Annotated[CompletionHandler, Depends(get_completion_handler)]) -> Response:
    """Creates a text completion for a raw prompt (string or token ids)."""
    return await respond(request, handler.create(body), body.stream)
