"""Uploaded files: bytes on disk, metadata in an embedded SQLite database.

Uploads stream to a temporary file in the store's directory while their
sha256 and size are computed; past the size limit the upload is refused and
the partial file removed. A finished upload is renamed into place atomically
and only then recorded, so a crash never leaves a row without its bytes.
File ids are opaque (`file-` + random hex) and never used as paths directly:
every lookup goes through the database, so an id cannot traverse directories.
Metadata survives restarts: the database lives in the same directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable

logger = logging.getLogger(__name__)

_ID_PATTERN = re.compile(r"^file-[0-9a-f]{24}$")


class FileStoreError(Exception):
    """Base of the store's errors."""


class FileNotFound(FileStoreError):
    def __init__(self, file_id: str):
        self.file_id = file_id
        super().__init__(f"No such file: {file_id!r}")


class FileTooLarge(FileStoreError):
    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"file exceeds the upload limit of {limit} bytes")


class EmptyFile(FileStoreError):
    def __init__(self) -> None:
        super().__init__("the uploaded file is empty")


class _HashedFile:
    """A file being written chunk by chunk, hashed (sha256) on the way, refused past a size."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest, self.max_bytes = dest, max_bytes
        self.digest, self.size = hashlib.sha256(), 0
        self.out = open(dest, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise FileTooLarge(self.max_bytes)
        self.digest.update(chunk)
        self.out.write(chunk)

    def finish(self) -> tuple[str, int]:
        self.out.close()
        if self.size == 0:
            raise EmptyFile()
        return self.digest.hexdigest(), self.size


def write_hashed(chunks: Iterable[bytes], dest: Path, max_bytes: int) -> tuple[str, int]:
    """Writes `chunks` to `dest` under `max_bytes`; (sha256 hex, size). `dest` is removed on any failure.

    Raises:
        FileTooLarge: past `max_bytes` (refused as soon as it is crossed).
        EmptyFile: no bytes at all.
    """
    try:
        f = _HashedFile(dest, max_bytes)
        try:
            for chunk in chunks:
                f.write(chunk)
        finally:
            f.out.close()
        return f.finish()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


async def write_hashed_async(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int) -> tuple[str, int]:
    """`write_hashed` for an async stream (an upload); disk writes run off the event loop."""
    import asyncio

    try:
        f = await asyncio.to_thread(_HashedFile, dest, max_bytes)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(f.write, chunk)
        finally:
            await asyncio.to_thread(f.out.close)
        return f.finish()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    sha256: str
    content_type: str | None

    @property
    def object(self) -> str:
        return "file"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    content_type TEXT
)
"""


class FileStore:
    """Files under `root/blobs/`, metadata in `root/files.sqlite3`.

    Thread-safe; the async `save_stream` does its disk writes in the event
    loop's default executor so uploads never block the loop.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "files.sqlite3", check_same_thread=False)
        with self._db:
            self._db.execute(_SCHEMA)
        self._remove_stale_partials()

    def _remove_stale_partials(self) -> None:
        """Partial uploads left by a crash are garbage: nothing refers to them."""
        for tmp in self.blobs.glob("*.part"):
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes

    def _new_id(self) -> str:
        return "file-" + secrets.token_hex(12)

    def save_chunks(self, chunks: Iterable[bytes], filename: str, purpose: str,
                    content_type: str | None = None) -> StoredFile:
        """Store an upload given as an iterable of byte chunks (blocking I/O)."""
        file_id = self._new_id()
        tmp = self.blobs / f"{file_id}.part"
        try:
            sha, size = write_hashed(chunks, tmp, self.max_bytes)
            return self._commit(tmp, file_id, filename, purpose, size, sha, content_type)
        finally:
            tmp.unlink(missing_ok=True)

    async def save_stream(self, chunks: AsyncIterator[bytes], filename: str, purpose: str,
                          content_type: str | None = None) -> StoredFile:
        """Store an upload arriving as async chunks; disk writes run off the event loop."""
        import asyncio

        file_id = self._new_id()
        tmp = self.blobs / f"{file_id}.part"
        try:
            sha, size = await write_hashed_async(chunks, tmp, self.max_bytes)
            return await asyncio.to_thread(self._commit, tmp, file_id, filename, purpose, size, sha, content_type)
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(self, tmp: Path, file_id: str, filename: str, purpose: str, size: int,
                sha256: str, content_type: str | None) -> StoredFile:
        record = StoredFile(file_id, _clean_filename(filename), purpose, size, int(time.time()),
                            sha256, content_type)
        os.replace(tmp, self.blobs / file_id)
        with self._lock, self._db:
            self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (record.id, record.filename, record.purpose, record.bytes,
                              record.created_at, record.sha256, record.content_type))
        logger.info("stored %s (%d bytes, sha256 %s…)", file_id, size, sha256[:12])
        return record

    def adopt(self, path: Path, filename: str, purpose: str, sha256: str,
              content_type: str | None = None) -> StoredFile:
        """Take ownership of a finished file on the same filesystem (moved, not copied),
        e.g. a /v1/video/questions upload the client asked to keep."""
        size = path.stat().st_size
        if size > self.max_bytes:
            raise FileTooLarge(self.max_bytes)
        if size == 0:
            raise EmptyFile()
        file_id = self._new_id()
        tmp = self.blobs / f"{file_id}.part"
        os.replace(path, tmp)
        try:
            return self._commit(tmp, file_id, filename, purpose, size, sha256, content_type)
        finally:
            tmp.unlink(missing_ok=True)

    def set_purpose(self, file_id: str, purpose: str) -> StoredFile:
        """Relabel a stored file (multipart bodies may name the purpose after the bytes)."""
        self.get(file_id)
        with self._lock, self._db:
            self._db.execute("UPDATE files SET purpose = ? WHERE id = ?", (purpose, file_id))
        return self.get(file_id)

    def delete(self, file_id: str) -> StoredFile:
        record = self.get(file_id)
        with self._lock, self._db:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        (self.blobs / record.id).unlink(missing_ok=True)
        return record

    # ------------------------------------------------------------------ reads

    def get(self, file_id: str) -> StoredFile:
        if not _ID_PATTERN.match(file_id or ""):
            raise FileNotFound(file_id)
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise FileNotFound(file_id)
        return StoredFile(*row)

    def path(self, file_id: str) -> Path:
        """The bytes of a stored file (after checking it exists)."""
        record = self.get(file_id)
        path = self.blobs / record.id
        if not path.is_file():
            raise FileNotFound(file_id)
        return path

    def list(self, purpose: str | None = None, limit: int = 10000, order: str = "desc") -> list[StoredFile]:
        direction = "ASC" if order == "asc" else "DESC"
        query = "SELECT * FROM files"
        args: tuple = ()
        if purpose:
            query += " WHERE purpose = ?"
            args = (purpose,)
        query += f" ORDER BY created_at {direction}, rowid {direction} LIMIT ?"  # rowid: upload order
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [StoredFile(*r) for r in rows]


def _clean_filename(name: str) -> str:
    """Keep only the last path component: a client's name is a label, never a path."""
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:255] or "upload"
