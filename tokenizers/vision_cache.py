"""On-disk cache of VQGAN frame codes, so asking about the same video twice is cheap.

Key = sha256 over (media content sha256, SamplingSpec.key(), VQGAN identity):
the same bytes sampled the same way by the same VQGAN give the same codes.
Entries are `.npz` files (codes [N, g, g] int32, timestamps [N] float64) under
`root/<key[:2]>/<key>.npz`. Writes are atomic: a temp file in the same folder,
then `os.replace`, so a crash never leaves a half-written entry under a real
name, and a reader never sees one. With `max_bytes` set, the least recently
used entries (by mtime, refreshed on every hit) are evicted after each `put`.

The ingestion pipeline that fills it is `media_ingest.encode_media`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Union

import numpy as np

from lwm_serve.tokenizers.frame_sampling import SamplingSpec

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes]
_CHUNK = 1 << 20
_SUFFIX = ".npz"
_TMP_PREFIX = ".tmp-"


def media_sha256(src: Source) -> str:
    """sha256 hex of the media bytes (files are hashed in 1 MiB chunks, never read whole)."""
    h = hashlib.sha256()
    if isinstance(src, (bytes, bytearray, memoryview)):
        h.update(src)
    else:
        with open(src, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def cache_key(content_sha256: str, spec: SamplingSpec, vqgan_identity: str) -> str:
    """The cache key (hex) for media content sampled by `spec` through one VQGAN."""
    text = f"lwm-vision-cache-v1\n{content_sha256}\n{spec.key()}\n{vqgan_identity}"
    return hashlib.sha256(text.encode()).hexdigest()


class VisionCache:
    """Frame codes on disk, keyed by `cache_key`; survives restarts."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lowercase hex strings, got {key!r}")
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def get_entry(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(codes [N, g, g] int32, timestamps [N] float64), or None on a miss."""
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                codes, timestamps = data["codes"], data["timestamps"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            # A damaged entry is a miss, and is removed so it gets rewritten.
            logger.warning("vision cache: dropping unreadable entry %s (%s)", path.name, e)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # LRU: a hit makes the entry recent
        except OSError:
            pass
        return codes, timestamps

    def get(self, key: str) -> np.ndarray | None:
        """Codes [N, g, g] int32, or None on a miss."""
        entry = self.get_entry(key)
        return None if entry is None else entry[0]

    def put(self, key: str, codes: np.ndarray, timestamps: np.ndarray) -> None:
        """Store codes [N, g, g] and their timestamps [N] atomically."""
        codes = np.asarray(codes, np.int32)
        timestamps = np.asarray(timestamps, np.float64)
        if codes.ndim != 3 or timestamps.shape != (len(codes),):
            raise ValueError(f"codes must be [N, g, g] with N timestamps; got {codes.shape} and {timestamps.shape}")
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, codes=codes, timestamps=timestamps)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.max_bytes is not None:
            self._evict(keep=path)

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.root.glob(f"??/*{_SUFFIX}"):
            if p.name.startswith(_TMP_PREFIX):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _evict(self, keep: Path) -> None:
        entries = sorted(self._entries())  # oldest first
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            logger.debug("vision cache: evicted %s", p.name)
