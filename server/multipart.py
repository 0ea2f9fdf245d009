"""Streaming multipart/form-data: parts read straight off the request body.

Starlette's `request.form()` spools every uploaded file to a temporary file
before the endpoint runs, so a 2 GB upload is written twice and the size limit
is only checked once everything has arrived. Here the body is parsed as it
arrives (python-multipart's push parser) and a file part is handed to the
caller as an async iterator of its bytes, which the caller streams where it
belongs (the file store, a temp file), enforcing its limit on the way: no
spooling, no temp file of ours, and an oversized upload is refused as soon as
it crosses the limit.

Parts come in body order: a file part's bytes must be consumed (or are skipped)
before the next part is read, so fields sent after the file (curl
`-F file=@x -F purpose=vision`) are seen after it.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from lwm_serve.server.errors import InvalidRequestError, PayloadTooLargeError

logger = logging.getLogger(__name__)

MAX_FIELD_BYTES = 64 * 1024  # a text field (question, purpose, numbers)
MAX_PARTS = 64
FORM_OVERHEAD = 1 << 20  # multipart headers and small fields around the file


def check_content_length(declared: str | None, max_bytes: int) -> None:
    """Refuse at once a body that announces more than the limit allows (413)."""
    declared = declared or ""
    if declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD:
        raise PayloadTooLargeError(f"the upload is {int(declared)} bytes; the limit is {max_bytes} bytes",
                                   param="file")


@dataclass
class RequestBody:
    """What an upload route hands its handler: the headers that matter and the raw body stream."""

    content_type: str
    content_length: str | None
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class FormField:
    name: str
    value: str


@dataclass
class FilePart:
    """An uploaded file; `chunks` yields its bytes (consume before asking for the next part)."""

    name: str
    filename: str
    content_type: str | None
    chunks: AsyncIterator[bytes]


class MultipartReader:
    """Parses one multipart body from an async byte stream.

    Args:
        stream: the raw body (`request.stream()`).
        content_type: the request's Content-Type header (must carry a boundary).

    Raises:
        InvalidRequestError: not multipart/form-data, no boundary, malformed body.
    """

    def __init__(self, stream: AsyncIterator[bytes], content_type: str | None) -> None:
        kind, options = parse_options_header(content_type or "")
        if kind != b"multipart/form-data":
            raise InvalidRequestError("this endpoint takes multipart/form-data (e.g. curl -F file=@clip.mp4)",
                                      code="invalid_content_type")
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidRequestError("multipart body without a boundary", code="invalid_multipart")
        self._stream = stream.__aiter__()
        self._events: collections.deque[tuple] = collections.deque()
        self._eof = False
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._content_type: bytes | None = None
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        })

    # ------------------------------------------------------------------ parser callbacks

    def _on_part_begin(self) -> None:
        self._disposition, self._content_type = b"", None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_name.strip().lower()
        if name == b"content-disposition":
            self._disposition = self._header_value
        elif name == b"content-type":
            self._content_type = self._header_value.strip()
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise InvalidRequestError("a multipart part has no name (Content-Disposition)",
                                      code="invalid_multipart")
        filename = options.get(b"filename")
        self._events.append(("part", _text(name), None if filename is None else _text(filename),
                             None if self._content_type is None else _text(self._content_type)))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(("data", bytes(data[start:end])))

    def _on_part_end(self) -> None:
        self._events.append(("end",))

    # ------------------------------------------------------------------ reading

    async def _next(self) -> tuple | None:
        while not self._events:
            if self._eof:
                return None
            try:
                data = await self._stream.__anext__()
            except StopAsyncIteration:
                self._eof = True
                self._feed(None)
                continue
            if data:
                self._feed(data)
        return self._events.popleft()

    def _feed(self, data: bytes | None) -> None:
        try:
            if data is None:
                self._parser.finalize()
            else:
                self._parser.write(data)
        except MultipartParseError as exc:
            raise InvalidRequestError(f"malformed multipart body ({exc})", code="invalid_multipart") from exc

    async def _file_bytes(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next()
            if event is None or event[0] == "end":
                return
            if event[0] == "data":
                yield event[1]

    async def parts(self) -> AsyncIterator[FormField | FilePart]:
        """The body's parts in order (fields decoded as UTF-8)."""
        count = 0
        while True:
            event = await self._next()
            if event is None:
                return
            if event[0] != "part":
                continue
            count += 1
            if count > MAX_PARTS:
                raise InvalidRequestError(f"too many multipart parts (at most {MAX_PARTS})",
                                          code="invalid_multipart")
            _, name, filename, content_type = event
            if filename is None:
                value = bytearray()
                async for chunk in self._file_bytes():
                    value += chunk
                    if len(value) > MAX_FIELD_BYTES:
                        raise InvalidRequestError(f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes",
                                                  param=name)
                yield FormField(name, value.decode("utf-8", errors="replace"))
            else:
                chunks = self._file_bytes()
                yield FilePart(name, filename, content_type, chunks)
                async for _ in chunks:  # whatever the caller left unread
                    pass


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")
