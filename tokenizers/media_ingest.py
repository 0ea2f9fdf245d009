"""Media to VQGAN codes: THE ingestion pipeline (offline tools and the server alike).

Cache lookup first (`vision_cache`, key = content sha256 + sampling + VQGAN
identity); on a miss, decode -> preprocess -> VQGAN streamed a VQGAN batch at a
time, keeping only the int codes (memory O(batch) frames, whatever the video's
length), with progress callbacks that may raise to cancel; then store.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from typing import TYPE_CHECKING, Callable, Literal, Union

import numpy as np

from lwm_serve.tokenizers import vision_cache
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.vision_cache import VisionCache

if TYPE_CHECKING:
    from lwm_serve.tokenizers.vqgan import VQGAN

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, bytes]
Stage = Literal["cached", "decode", "encode"]
IngestProgress = Callable[[Stage, int, int], None]  # (stage, done, total) frames


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
    key: str | None = None,
    timings: dict[str, float] | None = None,
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
        key: the entry's cache key when the caller has computed it already (the
            server's planner has: the key is computed once per request).
        timings: on a miss, filled with the seconds the pipeline spent in each stage
            ("decode", "preprocess", "vqgan"; they add up to its wall time). VQGAN
            calls run while the next frames decode, so "vqgan" is the time the pipeline
            waited for the VQGAN (its dispatch and what did not overlap with decoding).

    Returns:
        (codes [N, g, g] int32, timestamps [N] float64 seconds). N = 0 (the
        sampling picks no frame) is returned but not stored.
    """
    if cache is not None and key is None:
        key = vision_cache.cache_key(content_sha256 or vision_cache.media_sha256(src), spec, vqgan.identity)
    if cache is not None and key is not None:
        hit = cache.get_entry(key)
        if hit is not None:
            if progress is not None:
                progress("cached", len(hit[0]), len(hit[0]))
            return hit
    codes, timestamps = _encode_stream(src, spec, vqgan, strategy, max_duration_s, progress, label, max_pixels,
                                       timings)
    if cache is not None and key is not None and len(codes):
        cache.put(key, codes, timestamps)
    return codes, timestamps


def _encode_stream(src: Source, spec: SamplingSpec, vqgan: "VQGAN", strategy: str, max_duration_s: float | None,
                   progress: IngestProgress | None, label: str | None,
                   max_pixels: int | None = None, timings: dict[str, float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Decode -> preprocess -> VQGAN, `vqgan.batch_size` frames at a time (see `encode_media`).

    A batch's VQGAN call is dispatched and its codes collected only after the next batch
    is decoded: decoding (PyAV's threads) overlaps the VQGAN (XLA's), and at most one
    batch is in flight, so memory stays O(batch).
    """
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
    pending: list[Callable[[], np.ndarray]] = []  # the VQGAN call in flight (at most one)

    def collect() -> None:
        nonlocal done
        if not pending:
            return
        t0 = time.perf_counter()
        codes.append(np.asarray(pending.pop()(), np.int32))  # [B, g, g]: waits for the call
        seconds["vqgan"] += time.perf_counter() - t0
        done += len(codes[-1])
        if progress is not None:
            progress("encode", done, max(wanted, done))

    def flush() -> None:
        t0 = time.perf_counter()
        pixels = preprocess_frames(batch, vqgan.cfg.resolution)  # [B, R, R, 3] float32
        batch.clear()  # the decoded frames go as soon as their pixels exist
        t1 = time.perf_counter()
        started = vqgan.start_encode(pixels)
        del pixels
        seconds["preprocess"] += t1 - t0
        seconds["vqgan"] += time.perf_counter() - t1
        collect()  # the previous batch's codes; this one's computes while the next decodes
        pending.append(started)

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
        collect()
    total_s = time.perf_counter() - start
    seconds["decode"] = total_s - seconds["preprocess"] - seconds["vqgan"]
    n = len(timestamps)
    g = vqgan.cfg.grid
    out = np.concatenate(codes) if codes else np.zeros((0, g, g), np.int32)
    if timings is not None:
        timings.update(seconds)
    if n:
        name = label or ("<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src))
        logger.info("encoded %s: %d frames in %.2f s (%.1f frames/s); %s", name, n, total_s, n / max(total_s, 1e-9),
                    ", ".join(f"{k} {v:.2f} s ({n / max(v, 1e-9):.1f} frames/s)" for k, v in seconds.items()))
    return out, np.asarray(timestamps, np.float64)
