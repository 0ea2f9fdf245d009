"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_chat_handler
from lwm_serve.server.handlers.chat import ChatHandler
from lwm_serve.server.routes._docs import ERRORS
from lwm_serve.server.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from lwm_serve.server.streaming import respond

router = APIRouter(tags=["chat"], dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions", response_model=None, responses={
    200: {"model": ChatCompletionResponse,
          "content": {"text/event-stream": {"description": "chat.completion.chunk events, then [DONE]"}}},
    **ERRORS})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 handler: Annotated[ChatHandler, Depends(get_chat_handler)]) -> Response:
    """Creates a chat completion (OpenAI-compatible); `stream: true` answers with SSE."""
    return await respond(request, handler.create(body), body.stream)
