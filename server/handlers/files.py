"""/v1/files semantics: uploads streamed into the file store, list/get/delete as OpenAI shapes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.multipart import FilePart, MultipartReader, RequestBody, check_content_length
from lwm_serve.server.schemas.files import PURPOSES, FileDeleted, FileList, FileObject, ListOrder
from lwm_serve.server.stores.files import FileStore, StoredFile

logger = logging.getLogger(__name__)

_PENDING = "user_data"  # label of a file whose purpose field comes after its bytes


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise InvalidRequestError("'purpose' is a required property", param="purpose")
    if purpose not in PURPOSES:
        raise InvalidRequestError(f"purpose {purpose!r} is not one of {list(PURPOSES)}", param="purpose")
    return purpose


class FilesHandler:
    """Built once at startup over the file store."""

    def __init__(self, store: FileStore) -> None:
        self.store = store

    async def upload(self, body: RequestBody) -> FileObject:
        """Streams the `file` part into the store (413 past the limit); `purpose` may come
        before or after it. Nothing is kept when the request fails."""
        check_content_length(body.content_length, self.store.max_bytes)
        reader = MultipartReader(body.chunks, body.content_type)
        purpose: str | None = None
        stored: StoredFile | None = None
        try:
            async for part in reader.parts():
                if isinstance(part, FilePart):
                    if part.name != "file":
                        raise InvalidRequestError(f"unexpected file field {part.name!r}; send the file as 'file'",
                                                  param=part.name)
                    if stored is not None:
                        raise InvalidRequestError("one file per upload", param="file")
                    stored = await self.store.save_stream(part.chunks, part.filename, purpose or _PENDING,
                                                          part.content_type)
                elif part.name == "purpose":
                    purpose = check_purpose(part.value)
                else:
                    logger.info("upload: ignoring form field %r", part.name)
            if stored is None:
                raise InvalidRequestError("'file' is a required property (multipart field 'file')", param="file")
            purpose = check_purpose(purpose)
            if stored.purpose != purpose:
                stored = await asyncio.to_thread(self.store.set_purpose, stored.id, purpose)
        except BaseException:
            if stored is not None:
                await asyncio.to_thread(self.store.delete, stored.id)
            raise
        return FileObject.from_stored(stored)

    async def list(self, *, purpose: str | None, limit: int, order: ListOrder, after: str | None) -> FileList:
        files = await asyncio.to_thread(self.store.list, purpose, 1_000_000, order)
        if after:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        page = [FileObject.from_stored(f) for f in files[:limit]]
        return FileList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                        has_more=len(files) > limit)

    async def get(self, file_id: str) -> FileObject:
        return FileObject.from_stored(await asyncio.to_thread(self.store.get, file_id))

    async def content(self, file_id: str) -> tuple[Path, StoredFile]:
        record = await asyncio.to_thread(self.store.get, file_id)
        return await asyncio.to_thread(self.store.path, file_id), record

    async def delete(self, file_id: str) -> FileDeleted:
        record = await asyncio.to_thread(self.store.delete, file_id)
        return FileDeleted(id=record.id)
