"""Where a request's image/video bytes come from: data URL, file id, upload, remote URL.

Every source becomes a `MediaSource`: the bytes (in memory for a data URL,
a local path otherwise), their sha256 (the vision cache key; a stored file's
comes from its metadata, so a 2 GB upload is never re-read to be hashed), and
a label that error messages use instead of server paths.

Remote http(s) URLs are refused unless their host is on the operator's
allowlist (a listed domain also allows its subdomains; redirects are checked
too). Allowed ones are fetched with the stdlib, streamed to a temporary file in
the server's own temp folder under the upload size limit; the temp file is
removed when the source is closed, whatever happened. Uploads to
/v1/video/questions that the client does not ask to keep go the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import logging
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.stores.files import EmptyFile, FileStore, FileTooLarge, write_hashed, write_hashed_async

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]+$")


@dataclass
class MediaSource:
    """Media bytes ready to decode.

    Attributes:
        data: the bytes (data URL) or a local file (stored upload, temp file).
        sha256: hex digest of the bytes.
        label: how messages name it (a file id, "data URL", the URL).
        file_id: the stored file, when it is one.
        temp: a temp file to remove on `close()` (None: nothing to remove).
        discard: undoes keeping it (a `store=true` upload): called by
            `discard_unless_answered` when the question was not answered.
    """

    data: bytes | Path
    sha256: str
    label: str
    file_id: str | None = None
    temp: Path | None = field(default=None, repr=False)
    discard: Callable[[], Any] | None = field(default=None, repr=False)

    def answered(self) -> None:
        """The client has what it asked for (the stored file's id): keep it."""
        self.discard = None

    def discard_unless_answered(self) -> None:
        """Removes a kept upload whose question failed or whose client left first."""
        undo, self.discard = self.discard, None
        if undo is not None:
            undo()

    def close(self) -> None:
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
            self.temp = None

    def clean_message(self, message: str) -> str:
        """A media error message with server paths and '<bytes>' replaced by the label."""
        if isinstance(self.data, Path):
            message = message.replace(os.fspath(self.data), self.label)
        return message.replace("<bytes>", self.label)


class TempFiles:
    """The server's temp folder for media (data_dir/tmp); emptied at startup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():  # left by a crash: nothing refers to them
            if stale.is_file():
                stale.unlink(missing_ok=True)

    def new_path(self, suffix: str = "") -> Path:
        return self.root / f"media-{secrets.token_hex(8)}{suffix}.part"


def parse_data_url(url: str, max_bytes: int, param: str) -> bytes:
    """The bytes of a `data:[<type>][;base64],<data>` URL.

    Raises:
        InvalidRequestError: malformed URL or base64.
        FileTooLarge: more than `max_bytes` once decoded.
    """
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise InvalidRequestError("a data URL must look like data:<type>;base64,<data>", param=param,
                                  code="invalid_data_url")
    if header.endswith(";base64"):
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise FileTooLarge(max_bytes)
        data = _base64_payload(payload, param)
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise FileTooLarge(max_bytes)
    if not data:
        raise EmptyFile()
    return data


def _base64_payload(payload: str, param: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet; whitespace and missing padding
    tolerated): a payload with any other character is refused, never half-decoded."""
    text = re.sub(r"\s+", "", urllib.parse.unquote(payload))
    altchars = b"-_" if ("-" in text or "_" in text) else None
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"the data URL's base64 payload is not valid base64 ({exc})", param=param,
                                  code="invalid_data_url") from None


def check_remote_url(url: str, param: str) -> None:
    """A well-formed http(s) URL (host present, numeric port in range), else a 400."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidRequestError(f"the media URL {url!r} is malformed ({exc})", param=param,
                                  code="invalid_media_url") from None
    if not parts.hostname:
        raise InvalidRequestError(f"the media URL {url!r} has no host", param=param, code="invalid_media_url")


def host_allowed(url: str, allowlist: Sequence[str]) -> bool:
    """True when the URL's host is a listed domain or one of its subdomains."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower().rstrip(".")
    return bool(host) and any(host == d or host.endswith("." + d) for d in allowlist)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowlist: Sequence[str], param: str | None = None) -> None:
        self.allowlist, self.param = allowlist, param

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - stdlib API
        if not host_allowed(newurl, self.allowlist) or not newurl.lower().startswith(("http://", "https://")):
            raise InvalidRequestError(f"the media URL redirects to {newurl!r}, whose host is not on this "
                                      "server's media_url_allowlist", param=self.param, code="url_not_allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, *, allowlist: Sequence[str], max_bytes: int, dest: Path, timeout_s: float,
              param: str) -> str:
    """Download an allowed http(s) URL to `dest` (blocking; run off the event loop).

    Returns:
        The sha256 of the bytes. `dest` is removed on any failure.

    Raises:
        InvalidRequestError (host not allowed, HTTP error, unreachable), FileTooLarge, EmptyFile.
    """
    opener = urllib.request.build_opener(_CheckedRedirects(allowlist, param))
    request = urllib.request.Request(url, headers={"User-Agent": "lwm-serve"})
    try:
        with opener.open(request, timeout=timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FileTooLarge(max_bytes)
            sha, size = write_hashed(iter(lambda: resp.read(_CHUNK), b""), dest, max_bytes)
    except urllib.error.HTTPError as exc:
        dest.unlink(missing_ok=True)
        raise InvalidRequestError(f"fetching {url} failed: HTTP {exc.code} {exc.reason}", param=param,
                                  code="media_fetch_failed") from exc
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        dest.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise InvalidRequestError(f"could not fetch {url} ({reason})", param=param,
                                  code="media_fetch_failed") from exc
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    logger.info("fetched %s (%d bytes)", url, size)
    return sha


async def save_upload(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int) -> str:
    """Stream an upload to `dest` under the size limit; returns its sha256 (dest removed on failure)."""
    sha, _ = await write_hashed_async(chunks, dest, max_bytes)
    return sha


@dataclass
class SourceResolver:
    """Turns a part's URL string into a MediaSource (see the module docstring).

    Args:
        files: the file store (file ids).
        temp: the server's media temp folder.
        allowlist: domains remote URLs may come from (empty: none).
        max_bytes: size limit of data URLs and fetched media.
        timeout_s: remote fetch timeout.
    """

    files: FileStore
    temp: TempFiles
    allowlist: Sequence[str]
    max_bytes: int
    timeout_s: float = 30.0

    def stored(self, file_id: str) -> MediaSource:
        """A stored upload (FileNotFound -> 404)."""
        record = self.files.get(file_id)
        return MediaSource(self.files.path(file_id), record.sha256, f"{record.id} ({record.filename})",
                           file_id=record.id)

    async def resolve(self, url: str, param: str) -> MediaSource:
        import asyncio

        url = (url or "").strip()
        if url.startswith("data:"):
            data = parse_data_url(url, self.max_bytes, param)
            return MediaSource(data, hashlib.sha256(data).hexdigest(), "data URL")
        if _FILE_ID.match(url):
            return await asyncio.to_thread(self.stored, url)
        if url.lower().startswith(("http://", "https://")):
            check_remote_url(url, param)
            if not host_allowed(url, self.allowlist):
                hint = ("this server fetches no remote media (its media_url_allowlist is empty)"
                        if not self.allowlist else "its host is not on this server's media_url_allowlist")
                raise InvalidRequestError(
                    f"remote media URLs are refused: {hint}; upload the file with POST /v1/files and "
                    "pass its id, or send a data URL", param=param, code="url_not_allowed")
            dest = self.temp.new_path()
            fetch = asyncio.get_running_loop().run_in_executor(None, lambda: fetch_url(
                url, allowlist=self.allowlist, max_bytes=self.max_bytes, dest=dest, timeout_s=self.timeout_s,
                param=param))
            try:
                sha = await asyncio.shield(fetch)
            except asyncio.CancelledError:
                # The client left mid-download: the thread runs on; remove its file when it ends.
                fetch.add_done_callback(lambda _: dest.unlink(missing_ok=True))
                raise
            return MediaSource(dest, sha, url, temp=dest)
        raise InvalidRequestError("a media url must be a data URL (data:...;base64,...), a file id "
                                  "(file-...) from POST /v1/files, or an allowed http(s) URL",
                                  param=param, code="invalid_media_url")
