"""POST /v1/video/questions: a video (upload or file id) and a question, for curl users."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_files_handler, get_video_handler
from lwm_serve.server.errors import InvalidRequestError, validation_error
from lwm_serve.server.handlers.files import FilesHandler
from lwm_serve.server.handlers.video_questions import VideoQuestionHandler
from lwm_serve.server.media_sources import MediaSource, save_upload
from lwm_serve.server.multipart import FilePart, MultipartReader
from lwm_serve.server.routes._docs import MEDIA_ERRORS
from lwm_serve.server.routes.files import check_content_length
from lwm_serve.server.schemas.common import dump
from lwm_serve.server.schemas.video import (VIDEO_QUESTION_DOC, VideoAnswer, VideoPlan, VideoPlanRequest,
                                            VideoQuestionForm)
from lwm_serve.server.streaming import sse_response, unless_disconnected

URLENCODED_MAX = 16 << 20  # a data URL in a url-encoded form
router = APIRouter(tags=["video"], dependencies=[Depends(require_api_key)], responses=MEDIA_ERRORS)


@router.post("/v1/video/questions", response_model=None, openapi_extra=VIDEO_QUESTION_DOC, responses={
    200: {"model": VideoAnswer,
          "content": {"text/event-stream": {"description": "progress events, video.answer.chunk events, [DONE]"}}}})
async def ask_video_question(request: Request, handler: Annotated[VideoQuestionHandler, Depends(get_video_handler)],
                             files: Annotated[FilesHandler, Depends(get_files_handler)]) -> Response:
    """Answers a question about a video or image: multipart `file` (or `file_id` / `url`),
    `question`, sampling (`fps`, `max_frames`, `start`, `end`, `auto_fps`) and generation
    options (`max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stream`, `store`)."""
    vision = handler.require_vision()  # before reading a possibly huge body
    fields: dict[str, str] = {}
    upload: MediaSource | None = None
    stored: str | None = None
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return await _answer(request, handler, await _urlencoded(request), None)  # file_id / url, no upload
    check_content_length(request, files.store.max_bytes)
    reader = MultipartReader(request.stream(), request.headers.get("content-type"))
    try:
        filename, content_type = "upload", None
        async for part in reader.parts():
            if isinstance(part, FilePart):
                if part.name != "file" or upload is not None:
                    raise InvalidRequestError("send one file, as the multipart field 'file'", param=part.name)
                dest = vision.sources.temp.new_path()
                sha = await save_upload(part.chunks, dest, files.store.max_bytes)
                filename, content_type = part.filename or "upload", part.content_type
                upload = MediaSource(dest, sha, f"upload ({filename})", temp=dest)
            else:
                fields[part.name] = part.value
        form = _form(fields)
        if upload is not None and (form.file_id or form.url):
            raise InvalidRequestError("send either an uploaded 'file' or 'file_id'/'url', not both", param="file_id")
        if upload is not None and form.store:
            stored = await _adopt(files, upload, filename, content_type)
            upload = vision.sources.stored(stored)
    except BaseException:
        if upload is not None:
            upload.close()
        raise
    try:
        return await _answer(request, handler, form, upload)
    except BaseException:
        if stored is not None:  # a question refused (bad media, too long) keeps nothing
            await asyncio.to_thread(files.store.delete, stored)
        raise


async def _answer(request: Request, handler: VideoQuestionHandler, form: VideoQuestionForm,
                  upload: MediaSource | None) -> Response:
    if form.stream:
        return sse_response(await handler.answer(form, upload))  # type: ignore[arg-type]
    result = await unless_disconnected(request, handler.answer(form, upload))
    if isinstance(result, Response):
        return result
    return JSONResponse(dump(result))  # type: ignore[arg-type]


def _form(fields: dict[str, str]) -> VideoQuestionForm:
    try:
        return VideoQuestionForm.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None


async def _urlencoded(request: Request) -> VideoQuestionForm:
    """A form without an upload (`curl -d question=... -d file_id=...`): small, read at once."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > URLENCODED_MAX:
        raise InvalidRequestError(f"a url-encoded form is limited to {URLENCODED_MAX} bytes; upload media as "
                                  "multipart/form-data", code="form_too_large")
    async with request.form() as form:
        return _form({k: v for k, v in form.items() if isinstance(v, str)})


async def _adopt(files: FilesHandler, upload: MediaSource, filename: str, content_type: str | None) -> str:
    assert upload.temp is not None
    record = await asyncio.to_thread(files.store.adopt, upload.temp, filename, "user_data", upload.sha256,
                                     content_type)
    upload.temp = None  # moved into the store
    return record.id


@router.post("/v1/video/plan", response_model=VideoPlan)
async def plan_video_question(body: VideoPlanRequest,
                              handler: Annotated[VideoQuestionHandler, Depends(get_video_handler)]) -> VideoPlan:
    """How many frames and tokens a question about a stored file (or URL) would take with
    the given sampling, whether it fits the context, and the largest sampling that does."""
    return await handler.plan(body)
