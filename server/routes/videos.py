"""/v1/videos: create (JSON or multipart), list, retrieve, delete, content, extensions."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_services
from lwm_serve.server.errors import InvalidRequestError, validation_error
from lwm_serve.server.handlers.videos import VideosHandler
from lwm_serve.server.media_sources import MediaSource, save_upload
from lwm_serve.server.multipart import FilePart, MultipartReader, check_content_length
from lwm_serve.server.routes._docs import MEDIA_ERRORS
from lwm_serve.server.schemas.videos import (VideoCreateRequest, VideoDeleted, VideoExtendRequest, VideoList,
                                             VideoObject, body_doc, nest_form)

router = APIRouter(tags=["videos"], dependencies=[Depends(require_api_key)], responses=MEDIA_ERRORS)
M = TypeVar("M", bound=BaseModel)
JSON_MAX = 32 << 20  # a JSON body may carry a data URL reference image


def get_videos_handler(request: Request) -> VideosHandler:
    return get_services(request).videos


Handler = Annotated[VideosHandler, Depends(get_videos_handler)]


@router.post("/v1/videos", response_model=VideoObject,
             openapi_extra=body_doc(VideoCreateRequest, "input_reference"))
async def create_video(request: Request, handler: Handler) -> VideoObject:
    """Starts a video job: JSON or multipart (`prompt`, `seconds`, `size`, `input_reference`
    image as an upload or {image_url | file_id}; extras `n_frames`, `seed`, LWM's knobs)."""
    body, upload = await _read(request, handler, VideoCreateRequest, "input_reference")
    try:
        return await handler.create(body, upload)
    finally:
        if upload is not None:
            upload.close()


@router.post("/v1/videos/extensions", response_model=VideoObject,
             openapi_extra=body_doc(VideoExtendRequest, "video"))
async def extend_video(request: Request, handler: Handler) -> VideoObject:
    """Continues a completed video ({"video": {"id": "video_..."}}), an uploaded clip
    ({"video": {"id": "file-..."}}) or a clip sent as the multipart file `video`."""
    body, upload = await _read(request, handler, VideoExtendRequest, "video")
    try:
        return await handler.extend(body, upload)
    finally:
        if upload is not None:
            upload.close()


@router.get("/v1/videos", response_model=VideoList)
async def list_videos(handler: Handler, limit: Annotated[int, Query(ge=0, le=100)] = 20,
                      order: Literal["asc", "desc"] = "desc", after: str | None = None) -> VideoList:
    return await handler.list(limit=limit, order=order, after=after)


@router.get("/v1/videos/{video_id}", response_model=VideoObject)
async def retrieve_video(video_id: str, handler: Handler) -> VideoObject:
    return await handler.retrieve(video_id)


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
async def delete_video(video_id: str, handler: Handler) -> VideoDeleted:
    """Deletes the job and its files (a running job is stopped first)."""
    return await handler.delete(video_id)


@router.get("/v1/videos/{video_id}/content", response_class=FileResponse)
async def video_content(video_id: str, handler: Handler, variant: str = "video") -> FileResponse:
    """The MP4 (H.264), or with `variant=thumbnail` a WebP still of the first frame."""
    path, media_type = await handler.content(video_id, variant)
    return FileResponse(path, media_type=media_type)


async def _read(request: Request, handler: VideosHandler, model: type[M], file_field: str
                ) -> tuple[M, MediaSource | None]:
    """The body as `model` (JSON, or multipart whose one file part is `file_field`)."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > JSON_MAX:
            raise InvalidRequestError(f"a JSON body is limited to {JSON_MAX} bytes; upload media as "
                                      "multipart/form-data", code="body_too_large")
        try:
            return model.model_validate_json(await request.body()), None
        except ValidationError as exc:
            raise validation_error(RequestValidationError(exc.errors())) from None
    vision = handler.vision
    max_bytes = vision.sources.max_bytes if vision is not None else 0
    check_content_length(request.headers.get("content-length"), max_bytes or (1 << 20))
    fields: dict[str, str] = {}
    upload: MediaSource | None = None
    try:
        async for part in MultipartReader(request.stream(), kind).parts():
            if isinstance(part, FilePart):
                if part.name != file_field or upload is not None or vision is None:
                    raise InvalidRequestError(f"send at most one file, as the multipart field {file_field!r}",
                                              param=part.name)
                dest = vision.sources.temp.new_path()
                sha = await save_upload(part.chunks, dest, max_bytes)
                upload = MediaSource(dest, sha, f"upload ({part.filename or file_field})", temp=dest)
            else:
                fields[part.name] = part.value
        try:
            return model.model_validate(nest_form(fields)), upload
        except ValidationError as exc:
            raise validation_error(RequestValidationError(exc.errors())) from None
    except BaseException:
        if upload is not None:
            upload.close()
        raise
