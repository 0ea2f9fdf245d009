"""/v1/files: upload (multipart, streamed), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_files_handler
from lwm_serve.server.handlers.files import FilesHandler
from lwm_serve.server.multipart import RequestBody
from lwm_serve.server.routes._docs import MEDIA_ERRORS
from lwm_serve.server.schemas.files import MULTIPART_UPLOAD_DOC, FileDeleted, FileList, FileObject, ListOrder

router = APIRouter(tags=["files"], dependencies=[Depends(require_api_key)], responses=MEDIA_ERRORS)


@router.post("/v1/files", response_model=FileObject, openapi_extra=MULTIPART_UPLOAD_DOC)
async def upload_file(request: Request, handler: Annotated[FilesHandler, Depends(get_files_handler)]) -> FileObject:
    """Uploads a file (multipart `file` + `purpose`), streamed to disk; 413 past the size limit."""
    return await handler.upload(RequestBody(request.headers.get("content-type", ""),
                                            request.headers.get("content-length"), request.stream()))


@router.get("/v1/files", response_model=FileList)
async def list_files(handler: Annotated[FilesHandler, Depends(get_files_handler)],
                     purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                     order: ListOrder = "desc", after: str | None = None) -> FileList:
    """Stored files, newest first by default (cursor pagination with `after`)."""
    return await handler.list(purpose=purpose, limit=limit, order=order, after=after)


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, handler: Annotated[FilesHandler, Depends(get_files_handler)]) -> FileObject:
    """One file's metadata; 404 for an unknown id."""
    return await handler.get(file_id)


@router.get("/v1/files/{file_id}/content", response_class=FileResponse)
async def retrieve_file_content(file_id: str,
                                handler: Annotated[FilesHandler, Depends(get_files_handler)]) -> FileResponse:
    """The file's bytes, as uploaded."""
    path, record = await handler.content(file_id)
    return FileResponse(path, media_type=record.content_type or "application/octet-stream",
                        filename=record.filename)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, handler: Annotated[FilesHandler, Depends(get_files_handler)]) -> FileDeleted:
    """Deletes the file's bytes and metadata."""
    return await handler.delete(file_id)
