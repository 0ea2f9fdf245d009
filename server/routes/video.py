"""POST /v1/video/questions (a video or image and a question, for curl users) and /v1/video/plan."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_video_handler
from lwm_serve.server.multipart import RequestBody
from lwm_serve.server.handlers.video_questions import VideoQuestionHandler
from lwm_serve.server.routes._docs import MEDIA_ERRORS
from lwm_serve.server.schemas.video import VIDEO_QUESTION_DOC, VideoAnswer, VideoPlan, VideoPlanRequest
from lwm_serve.server.streaming import respond

router = APIRouter(tags=["video"], dependencies=[Depends(require_api_key)], responses=MEDIA_ERRORS)


@router.post("/v1/video/questions", response_model=None, openapi_extra=VIDEO_QUESTION_DOC, responses={
    200: {"model": VideoAnswer,
          "content": {"text/event-stream": {"description": "progress events, video.answer.chunk events, [DONE]"}}}})
async def ask_video_question(request: Request,
                             handler: Annotated[VideoQuestionHandler, Depends(get_video_handler)]) -> Response:
    """Answers a question about a video or image: multipart `file` (or `file_id` / `url`),
    `question`, sampling (`fps`, `max_frames`, `start`, `end`, `auto_fps`) and generation
    options (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stream`, `store`)."""
    form, upload = await handler.read(RequestBody(request.headers.get("content-type", ""),
                                                  request.headers.get("content-length"), request.stream()))
    return await respond(request, handler.answer(form, upload), form.stream)


@router.post("/v1/video/plan", response_model=VideoPlan)
async def plan_video_question(body: VideoPlanRequest,
                              handler: Annotated[VideoQuestionHandler, Depends(get_video_handler)]) -> VideoPlan:
    """How many frames and tokens a question about a stored file (or URL) would take with
    the given sampling, whether it fits the context, and the largest sampling that does."""
    return await handler.plan(body)
