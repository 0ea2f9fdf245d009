"""Wire types of /v1/files (OpenAI's file object, list and delete shapes)."""

from __future__ import annotations

from typing import Literal

from lwm_serve.server.schemas.common import ResponseModel
from lwm_serve.server.stores.files import StoredFile

# Upload purposes that OpenAI's file object can report (its CreateFileRequest also
# lists "evals", which the OpenAIFile schema does not).
PURPOSES: tuple[str, ...] = ("assistants", "batch", "fine-tune", "vision", "user_data")


class FileObject(ResponseModel):
    """OpenAI's `OpenAIFile`. `status` is always "processed": bytes are stored on upload."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"

    @classmethod
    def from_stored(cls, f: StoredFile) -> "FileObject":
        return cls(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose)


class FileList(ResponseModel):
    """OpenAI's `ListFilesResponse` (cursor pagination with `after`). For an empty
    page `first_id`/`last_id` are null (OpenAI's spec types them as strings)."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(ResponseModel):
    """OpenAI's `DeleteFileResponse`."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


MULTIPART_UPLOAD_DOC = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}

ListOrder = Literal["asc", "desc"]
