"""POST /v1/images/generations and GET /v1/images/files/{name} (the `url` responses)."""

from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_services
from lwm_serve.server.errors import NotFoundError
from lwm_serve.server.handlers.images import ImagesHandler
from lwm_serve.server.routes._docs import ERRORS
from lwm_serve.server.schemas.common import dump
from lwm_serve.server.schemas.images import ImageGenerationRequest, ImagesResponse
from lwm_serve.server.stores.outputs import MEDIA_TYPES, OutputNotFound
from lwm_serve.server.streaming import SSEEvent, sse_response, unless_disconnected

router = APIRouter(tags=["images"])


def get_images_handler(request: Request) -> ImagesHandler:
    return get_services(request).images


@router.post("/v1/images/generations", response_model=None, dependencies=[Depends(require_api_key)], responses={
    200: {"model": ImagesResponse,
          "content": {"text/event-stream": {"description": "image_generation.partial_image events, "
                                            "image_generation.completed, then [DONE]"}}},
    **ERRORS})
async def create_image(body: ImageGenerationRequest, request: Request,
                       handler: Annotated[ImagesHandler, Depends(get_images_handler)]) -> Response:
    """Draws images with LWM (OpenAI-compatible); `stream: true` + `partial_images` shows
    the image filling in row by row."""
    base = str(request.base_url)
    if body.stream:
        events = await handler.generate(body, base)
        return sse_response(_named(events))  # type: ignore[arg-type]
    result = await unless_disconnected(request, handler.generate(body, base))
    if isinstance(result, Response):
        return result
    return JSONResponse(dump(result))  # type: ignore[arg-type]


async def _named(events: AsyncIterator) -> AsyncIterator[SSEEvent]:
    """OpenAI names each event after its type (`event: image_generation.partial_image`)."""
    try:
        async for event in events:
            yield SSEEvent(event.type, dump(event))
    finally:
        await events.aclose()


@router.get("/v1/images/files/{name}", response_class=FileResponse, responses={404: ERRORS[404]})
async def image_file(name: str, request: Request) -> FileResponse:
    """A generated image (`response_format: "url"`): the unguessable name is the
    capability, so no API key is needed; it expires (see --image-url-ttl-s)."""
    services = get_services(request)
    try:
        path = services.images.outputs.path(name)
    except OutputNotFound as exc:
        raise NotFoundError(str(exc), param="name") from None
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lstrip(".")])
