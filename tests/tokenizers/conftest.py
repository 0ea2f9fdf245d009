"""Real media made with PyAV / Pillow for the tokenizers tests (nothing downloaded).

Every synthetic video frame i is a flat grey of level `frame_level(i)` with a
white 8x8 marker in its top-left corner, so a test can tell which frame came
back (by level) and which way up it is (by the marker).
"""

from __future__ import annotations

import io
import pickle
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import pytest
from PIL import Image

W, H = 64, 48  # coded size of the synthetic clips (landscape)
MARK = 8


def frame_level(i: int) -> int:
    """Grey level of synthetic frame i (distinct for i < 40)."""
    return 20 + 5 * i


def make_frame(i: int, w: int = W, h: int = H) -> np.ndarray:
    frame = np.full((h, w, 3), frame_level(i), np.uint8)
    frame[:MARK, :MARK] = 255
    return frame


def write_video(
    path: Path,
    n_frames: int,
    fps: int = 10,
    codec: str = "libx264",
    fmt: str | None = None,
    pts_ms: Sequence[int] | None = None,
    rotation: int = 0,
    gop: int | None = None,
    size: tuple[int, int] = (W, H),
    bframes: int = 0,
) -> Path:
    """Write a clip of `make_frame(i)` frames.

    Args:
        pts_ms: explicit presentation times in ms (variable frame rate); default i / fps.
        rotation: display-matrix rotation, degrees counter-clockwise (phone clips).
        gop: keyframe interval in frames (x264); None = encoder default.
        bframes: x264 B-frames (reordered decode order: pts != dts).
    """
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        opts = {}
        if codec == "libx264":
            opts = {"crf": "10", "preset": "ultrafast", "bf": str(bframes)}
            if gop is not None:
                opts.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
        elif codec.startswith("libvpx"):
            opts = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"}
            if gop is not None:
                opts["g"] = str(gop)
        stream.options = opts
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(i, *size), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def image_bytes(frame: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


VFR_MS = [0, 100, 150, 400, 1000, 1100, 1500, 2500]
# name -> (presentation time of each frame, written in media_dir)
CLIPS: dict[str, list[float]] = {
    "h264.mp4": [i / 10 for i in range(30)],
    "h264_bframes.mp4": [i / 12 for i in range(24)],
    "vfr.mp4": [ms / 1000 for ms in VFR_MS],
    "vp9.webm": [i / 10 for i in range(20)],
    "rotated.mp4": [i / 10 for i in range(6)],
}


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real test media, built once per session."""
    d = tmp_path_factory.mktemp("media")
    write_video(d / "h264.mp4", 30, fps=10, gop=10)
    write_video(d / "h264_bframes.mp4", 24, fps=12, gop=8, bframes=3)
    write_video(d / "rotated.mp4", 6, fps=10, rotation=90)
    # variable frame rate: irregular gaps (ms)
    write_video(d / "vfr.mp4", len(VFR_MS), pts_ms=VFR_MS)
    if "libvpx-vp9" in av.codecs_available:
        write_video(d / "vp9.webm", 20, fps=10, codec="libvpx-vp9", gop=5)
    write_audio_only(d / "audio.m4a")
    full = (d / "h264.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notmedia.bin").write_bytes(b"this is plainly not a media file\n" * 8)
    return d


@pytest.fixture(scope="session")
def vp9_path(media_dir: Path) -> Path:
    p = media_dir / "vp9.webm"
    assert "libvpx-vp9" in av.codecs_available and p.exists(), "this PyAV wheel has no libvpx-vp9 encoder"
    return p


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Test-only stand-in for the checkpoint module's restricted unpickler."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle_params(path: Path) -> dict:
    """Load a pickled VQGAN params tree, allowing only numpy arrays."""
    with open(path, "rb") as f:
        return _ArrayOnlyUnpickler(f).load()


@pytest.fixture(scope="session")
def pickle_loader():
    """`load_pickle_params` (test modules cannot import conftest)."""
    return load_pickle_params


@pytest.fixture(scope="session")
def vqgan_case(reference_dir: Path) -> dict:
    """The reference VQGAN case: config, params, arrays (from data.npz), case.json, folder."""
    import json

    from lwm_serve.tokenizers.vqgan import VQGANConfig

    case_dir = reference_dir / "cases" / "vqgan"
    case = json.loads((case_dir / "case.json").read_text())
    with np.load(case_dir / "data.npz") as data:
        arrays = dict(data)
    return {
        "cfg": VQGANConfig.from_json(reference_dir / case["vqgan_config"]),
        "params": load_pickle_params(reference_dir / case["vqgan_checkpoint"]),
        "arrays": arrays,
        "case": case,
        "dir": case_dir,
    }


@pytest.fixture(scope="session")
def media_kit():
    """The builders above, for test modules (which cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        W=W, H=H, MARK=MARK, frame_level=frame_level, make_frame=make_frame, write_video=write_video,
        write_audio_only=write_audio_only, image_bytes=image_bytes, CLIPS=CLIPS,
    )
