"""Frames (uint8 RGB) to image or video bytes: PNG / WebP (Pillow), MP4 H.264 (PyAV).

Everything is encoded in memory; no temporary file is ever written.
"""

from __future__ import annotations

import io
import logging
from fractions import Fraction
from typing import Literal, Sequence

import av
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

ImageFormat = Literal["png", "webp", "jpeg"]


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    return np.ascontiguousarray(frame)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """VQGAN output in [-1, 1] to uint8, as the reference: ((x + 1) * 127.5).astype(uint8)."""
    return ((np.asarray(pixels, np.float32) + 1) * 127.5).astype(np.uint8)


def encode_image(frame: np.ndarray, fmt: ImageFormat = "png", quality: int = 90) -> bytes:
    """Encode one frame.

    Args:
        frame: [H, W, 3] uint8 RGB.
        fmt: "png" (lossless), "webp" (lossy at `quality`, or lossless with quality=100)
            or "jpeg".
        quality: 1..100 for the lossy formats.

    Returns:
        The encoded bytes.
    """
    img = Image.fromarray(_check_frame(frame), "RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, lossless=quality >= 100)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use png, webp or jpeg")
    return buf.getvalue()


def encode_mp4(
    frames: Sequence[np.ndarray],
    fps: float = 8.0,
    crf: int = 18,
    preset: str = "medium",
    gop_seconds: float | None = None,
) -> bytes:
    """Encode frames as an H.264 (yuv420p) MP4 that browsers play.

    Args:
        frames: N frames [H, W, 3] uint8, all the same size. yuv420p needs even
            sides, so odd sizes are padded by one edge pixel row/column.
        fps: frame rate (may be fractional, e.g. 29.97).
        crf: x264 constant rate factor (0 lossless .. 51 worst).
        preset: x264 preset (ultrafast .. veryslow).
        gop_seconds: keyframe interval in seconds (None: x264's default).

    Returns:
        MP4 bytes. The index (moov) is at the end: "faststart" would need the
        muxer to re-open a named file, and we never write one.
    """
    if len(frames) == 0:
        raise ValueError("encode_mp4 needs at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    first = _check_frame(frames[0])
    h, w = first.shape[:2]
    eh, ew = h + h % 2, w + w % 2
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = ew, eh, "yuv420p"
        opts = {"crf": str(crf), "preset": preset}
        if gop_seconds is not None:
            g = max(1, round(gop_seconds * fps))
            opts.update({"g": str(g), "keyint_min": str(g), "sc_threshold": "0"})
        stream.options = opts
        for i, frame in enumerate(frames):
            frame = _check_frame(frame)
            if frame.shape[:2] != (h, w):
                raise ValueError(f"frame {i} is {frame.shape[:2]}, frame 0 is {(h, w)}")
            if (eh, ew) != (h, w):
                frame = np.pad(frame, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
