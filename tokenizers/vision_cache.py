"""On-disk cache of VQGAN frame codes, so asking about the same video twice is cheap.

Key = sha256 over (media content sha256, SamplingSpec.key(), VQGAN identity):
the same bytes sampled the same way by the same VQGAN give the same codes.
Entries are `.npz` files (codes [N, g, g] int32, timestamps [N] float64) under
`root/<key[:2]>/<key>.npz`. Writes are atomic: a temp file in the same folder,
then `os.replace`, so a crash never leaves a half-written entry under a real
name, and a reader never sees one. With `max_bytes` set, the least recently
used entries (by mtime, refreshed on every hit) are evicted after each `put`.

`encode_media` is THE ingestion pipeline (the server calls it too): cache
lookup, then decode -> preprocess -> VQGAN streamed a batch at a time, with
progress callbacks (which may raise to cancel), then store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import zipfile
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Union

import numpy as np

from lwm_serve.tokenizers.frame_sampling import SamplingSpec

if TYPE_CHECKING:
    from lwm_serve.tokenizers.vqgan import VQGAN

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes]
Stage = Literal["cached", "decode", "encode"]
IngestProgress = Callable[[Stage, int, int], None]  # (stage, done, total) frames
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


def encode_media(
    src: Source,
    spec: SamplingSpec,
    vqgan: "VQGAN",
    cache: VisionCache | None = None,
    strategy: str = "auto",
    max_duration_s: float | None = None,
    *,
    progress: IngestProgress | None = None,
    content_sha256: str | None = None,
    label: str | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Media to VQGAN codes through the cache; on a miss, a streamed pipeline.

    On a miss, frames are decoded `vqgan.batch_size` at a time, preprocessed and
    VQGAN-encoded, and only their int codes are kept: memory is O(batch) frames
    whatever the video's length (an hour at 1 frame/s keeps 3600 x 1 KiB of codes,
    never 3600 decoded frames or their float32 pixels).

    Args:
        src: image or video, path or bytes.
        spec: frame sampling (ignored for a still image, which is one frame; it
            is still part of the key).
        vqgan: the VQGAN wrapper (its `identity` is part of the key; `batch_size`
            frames are decoded and encoded at a time).
        cache: where to look first and store after; None = no caching.
        strategy, max_duration_s: passed to `media_decode.iter_media_frames`.
        progress: called as progress(stage, done, total) on this thread:
            ("cached", n, n) on a hit; ("decode", kept, wanted) per decoded frame;
            ("encode", encoded, wanted) per VQGAN batch. An exception it raises
            stops the work (nothing is stored) and propagates: the cancellation hook.
        content_sha256: the media's sha256 hex when already known (an upload
            store has it): skips re-reading the file to hash it. Must be the hash
            of exactly these bytes, or the cache key is wrong.
        label: how the log line names the media (default: its path, or "<bytes>").
        max_pixels: images / video frames of more pixels are refused before decoding.

    Returns:
        (codes [N, g, g] int32, timestamps [N] float64 seconds). N = 0 (the
        sampling picks no frame) is returned but not stored.
    """
    key = None
    if cache is not None:
        key = cache_key(content_sha256 or media_sha256(src), spec, vqgan.identity)
        hit = cache.get_entry(key)
        if hit is not None:
            if progress is not None:
                progress("cached", len(hit[0]), len(hit[0]))
            return hit
    codes, timestamps = _encode_stream(src, spec, vqgan, strategy, max_duration_s, progress, label, max_pixels)
    if cache is not None and key is not None and len(codes):
        cache.put(key, codes, timestamps)
    return codes, timestamps


def _encode_stream(src: Source, spec: SamplingSpec, vqgan: "VQGAN", strategy: str, max_duration_s: float | None,
                   progress: IngestProgress | None, label: str | None,
                   max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode -> preprocess -> VQGAN, `vqgan.batch_size` frames at a time (see `encode_media`)."""
    # Imported here: the cache itself needs neither PyAV nor JAX.
    from lwm_serve.tokenizers.media_decode import iter_media_frames, preprocess_frames

    wanted = 0
    seconds = {"decode": 0.0, "preprocess": 0.0, "vqgan": 0.0}

    def on_decode(kept: int, total: int) -> None:
        nonlocal wanted
        wanted = total
        if progress is not None:
            progress("decode", kept, total)

    timestamps: list[float] = []
    codes: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    done = 0

    def flush() -> None:
        nonlocal done
        t0 = time.perf_counter()
        pixels = preprocess_frames(batch, vqgan.cfg.resolution)  # [B, R, R, 3] float32
        batch.clear()  # the decoded frames go as soon as their pixels exist
        t1 = time.perf_counter()
        codes.append(np.asarray(vqgan.encode_frames(pixels), np.int32))  # [B, g, g]
        del pixels
        seconds["preprocess"] += t1 - t0
        seconds["vqgan"] += time.perf_counter() - t1
        done += len(codes[-1])
        if progress is not None:
            progress("encode", done, max(wanted, done))

    start = time.perf_counter()
    frames = iter_media_frames(src, spec, strategy=strategy, max_duration_s=max_duration_s,  # type: ignore[arg-type]
                               progress=on_decode, max_pixels=max_pixels)
    with closing(frames):  # a cancel or error closes the container now, not at garbage collection
        for t, frame in frames:
            timestamps.append(t)
            batch.append(frame)
            del frame
            if len(batch) >= vqgan.batch_size:
                flush()
        if batch:
            flush()
    total_s = time.perf_counter() - start
    seconds["decode"] = total_s - seconds["preprocess"] - seconds["vqgan"]
    n = len(timestamps)
    g = vqgan.cfg.grid
    out = np.concatenate(codes) if codes else np.zeros((0, g, g), np.int32)
    if n:
        name = label or ("<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src))
        logger.info("encoded %s: %d frames in %.2f s (%.1f frames/s); %s", name, n, total_s, n / max(total_s, 1e-9),
                    ", ".join(f"{k} {v:.2f} s ({n / max(v, 1e-9):.1f} frames/s)" for k, v in seconds.items()))
    return out, np.asarray(timestamps, np.float64)
