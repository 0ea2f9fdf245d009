"""Reading a /v1/video/questions body: the form fields and the optional upload.

Two encodings: url-encoded (`curl -d question=... -d file_id=...`: small, read at
once) and multipart (an upload streamed to the server's media temp folder under
the size limit, hashed on the way). With `store=true` the finished upload moves
into the file store; the handler removes it again if the question is not
answered (`MediaSource.discard_unless_answered`). Whatever fails, no temp file is
left behind.
"""

from __future__ import annotations

import asyncio
import urllib.parse

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from lwm_serve.server.errors import InvalidRequestError, validation_error
from lwm_serve.server.media_sources import MediaSource, SourceResolver, save_upload
from lwm_serve.server.multipart import FilePart, MultipartReader, RequestBody, check_content_length
from lwm_serve.server.schemas.video import VideoQuestionForm

URLENCODED_MAX = 16 << 20  # a data URL in a url-encoded form


def parse_form(fields: dict[str, str]) -> VideoQuestionForm:
    try:
        return VideoQuestionForm.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None


async def read_question(body: RequestBody, sources: SourceResolver) -> tuple[VideoQuestionForm, MediaSource | None]:
    """The form and its upload (None: the media is named by `file_id` / `url`).

    Raises:
        APIError: a malformed body or form, too large (413), two media given.
    """
    if body.content_type.startswith("application/x-www-form-urlencoded"):
        return parse_form(await _urlencoded(body)), None
    store = sources.files
    check_content_length(body.content_length, store.max_bytes)
    reader = MultipartReader(body.chunks, body.content_type)
    fields: dict[str, str] = {}
    upload: MediaSource | None = None
    filename, content_type = "upload", None
    try:
        async for part in reader.parts():
            if isinstance(part, FilePart):
                if part.name != "file" or upload is not None:
                    raise InvalidRequestError("send one file, as the multipart field 'file'", param=part.name)
                dest = sources.temp.new_path()
                sha = await save_upload(part.chunks, dest, store.max_bytes)
                filename, content_type = part.filename or "upload", part.content_type
                upload = MediaSource(dest, sha, f"upload ({filename})", temp=dest)
            else:
                fields[part.name] = part.value
        form = parse_form(fields)
        if upload is not None and (form.file_id or form.url):
            raise InvalidRequestError("send either an uploaded 'file' or 'file_id'/'url', not both", param="file_id")
        if upload is not None and form.store:
            upload = await _keep(sources, upload, filename, content_type)
    except BaseException:
        if upload is not None:
            upload.close()
        raise
    return form, upload


async def _urlencoded(body: RequestBody) -> dict[str, str]:
    declared = body.content_length or ""
    if declared.isdigit() and int(declared) > URLENCODED_MAX:
        raise _form_too_large()
    data = bytearray()
    async for chunk in body.chunks:
        data += chunk
        if len(data) > URLENCODED_MAX:
            raise _form_too_large()
    try:
        pairs = urllib.parse.parse_qsl(data.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InvalidRequestError("the url-encoded form is not UTF-8", code="invalid_form") from None
    return dict(pairs)


def _form_too_large() -> InvalidRequestError:
    return InvalidRequestError(f"a url-encoded form is limited to {URLENCODED_MAX} bytes; upload media as "
                               "multipart/form-data", code="form_too_large")


async def _keep(sources: SourceResolver, upload: MediaSource, filename: str, content_type: str | None) -> MediaSource:
    """Moves the finished upload into the file store; the stored file is removed
    again unless the question is answered."""
    assert upload.temp is not None
    record = await asyncio.to_thread(sources.files.adopt, upload.temp, filename, "user_data", upload.sha256,
                                     content_type)
    upload.temp = None  # moved into the store
    kept = sources.stored(record.id)
    kept.discard = lambda: sources.files.delete(record.id)
    return kept
