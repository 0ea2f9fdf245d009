"""Generated images served by URL (`response_format: "url"`): files that expire.

Each image is one file `<token>.<ext>` under the store's directory; the token
(128 random bits) is the whole capability, like a signed URL, so the URL works
without the API key (a browser can open it) and cannot be guessed. A file older
than `ttl_s` is gone: lookups refuse it and every write sweeps expired ones.
Names are checked against a strict pattern before they touch the file system.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^img-[0-9a-f]{32}\.(png|webp|jpeg)$")
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


class OutputNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no generated image {name!r} (unknown, or its URL has expired)")


class ExpiringOutputs:
    def __init__(self, root: str | os.PathLike, ttl_s: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        for partial in self.root.glob(".*.part"):  # a crash mid-write: nothing refers to it
            partial.unlink(missing_ok=True)

    def put(self, data: bytes, ext: str) -> tuple[str, int]:
        """Stores the bytes; returns (file name, expiry unix time)."""
        self.sweep()
        name = f"img-{secrets.token_hex(16)}.{ext}"
        tmp = self.root / f".{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
        return name, int(time.time() + self.ttl_s)

    def path(self, name: str) -> Path:
        """The file behind a name (OutputNotFound when unknown or expired)."""
        if not _NAME.match(name):
            raise OutputNotFound(name)
        path = self.root / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            raise OutputNotFound(name) from None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            raise OutputNotFound(name)
        return path

    def sweep(self) -> int:
        """Removes expired files; returns how many."""
        now, removed = time.time(), 0
        for path in self.root.iterdir():
            if path.name.startswith("."):
                continue  # a write in progress
            try:
                stale = now - path.stat().st_mtime > self.ttl_s
            except FileNotFoundError:
                continue
            if stale:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
