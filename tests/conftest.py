"""Shared test setup: 8 simulated CPU devices, fixture paths, tiny models, real media.

XLA_FLAGS must be set before jax is first imported, so it is done here at
collection time: every test run (CI included) sees 8 CPU devices, and the
dense paths simply use the first one.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# Servers started by the tests (in this process or as subprocesses) share one compilation
# cache, fresh for each run and removed after it: the same demo model compiles once per
# run, not once per server, and nothing carries over from an earlier run (or ~/.cache).
_COMPILE_CACHE = tempfile.mkdtemp(prefix="lwm-test-compile-cache-")
os.environ["LWM_SERVE_COMPILE_CACHE_DIR"] = _COMPILE_CACHE
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
LWM_REFERENCE = FIXTURES / "lwm_reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The copied LWM reference fixture set (byte-identical to the shared one)."""
    return LWM_REFERENCE


# ----------------------------------------------------------------------------
# Real media made with PyAV / Pillow (nothing downloaded), for the tokenizers and
# server tests alike, through the `media_kit` fixture (test modules cannot import
# conftest). Every synthetic video frame i is a flat grey of level
# `frame_level(i)` with a white 8x8 marker in its top-left corner, so a test can
# tell which frame came back (by level) and which way up it is (by the marker).

W, H = 64, 48  # coded size of the synthetic clips (landscape)
MARK = 8


def frame_level(i: int) -> int:
    """Grey level of synthetic frame i (distinct for i < 40)."""
    return 20 + 5 * i


def make_frame(i: int, w: int = W, h: int = H):  # -> np.ndarray [h, w, 3] uint8
    import numpy as np

    frame = np.full((h, w, 3), frame_level(i), np.uint8)
    frame[:MARK, :MARK] = 255
    return frame


def write_video(
    path: Path,
    n_frames: int,
    fps: int = 10,
    codec: str = "libx264",
    fmt: str | None = None,
    pts_ms=None,
    rotation: int = 0,
    gop: int | None = None,
    size: tuple[int, int] = (W, H),
    bframes: int = 0,
    frames=None,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Write a clip of `make_frame(i)` frames (or of the given `frames`).

    Args:
        pts_ms: explicit presentation times in ms (variable frame rate); default i / fps.
        rotation: display-matrix rotation, degrees counter-clockwise (phone clips).
        gop: keyframe interval in frames (x264); None = encoder default.
        bframes: x264 B-frames (reordered decode order: pts != dts).
        frames: uint8 [h, w, 3] frames to write instead of the synthetic ones
            (with a lossless codec, e.g. codec="png", pix_fmt="rgb24", they survive exactly).
        pix_fmt: the stream's pixel format.
    """
    from fractions import Fraction

    import av

    if frames is not None:
        n_frames, size = len(frames), (frames[0].shape[1], frames[0].shape[0])
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
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
            image = frames[i] if frames is not None else make_frame(i, *size)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    import av
    import numpy as np

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


def image_bytes(frame, fmt: str, **kwargs) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


VFR_MS = [0, 100, 150, 400, 1000, 1100, 1500, 2500]
# name -> (presentation time of each frame, written in the tokenizers' media_dir)
CLIPS: dict[str, list[float]] = {
    "h264.mp4": [i / 10 for i in range(30)],
    "h264_bframes.mp4": [i / 12 for i in range(24)],
    "vfr.mp4": [ms / 1000 for ms in VFR_MS],
    "vp9.webm": [i / 10 for i in range(20)],
    "rotated.mp4": [i / 10 for i in range(6)],
}


@pytest.fixture(scope="session")
def media_kit():
    """The media builders above, for test modules (which cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        W=W, H=H, MARK=MARK, frame_level=frame_level, make_frame=make_frame, write_video=write_video,
        write_audio_only=write_audio_only, image_bytes=image_bytes, CLIPS=CLIPS, VFR_MS=VFR_MS,
    )


# ----------------------------------------------------------------------------
# A VQGAN stand-in for pipeline tests (the real one is tested on the fixtures).


class FakeVQGAN:
    """Codes from each frame's mean pixel; records batch sizes; can hold a batch until released."""

    identity = "fake-vqgan"

    def __init__(self, batch_size: int, resolution: int = 256) -> None:
        import threading

        self.batch_size = batch_size
        self.cfg = type("Cfg", (), {"resolution": resolution, "grid": 16})()
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.release = None  # a threading.Event: encode_frames waits for it when set

    def encode_frames(self, pixels):
        import numpy as np

        self.batches.append(len(pixels))
        self.entered.set()
        if self.release is not None:
            assert self.release.wait(30), "the test never released the VQGAN"
        level = np.round((pixels.mean(axis=(1, 2, 3)) + 1) * 1000).astype(np.int32)  # [N]
        return np.broadcast_to(level[:, None, None], (len(pixels), 16, 16)).copy()

    def start_encode(self, pixels):
        codes = self.encode_frames(pixels)
        return lambda: codes


@pytest.fixture(scope="session")
def fake_vqgan() -> type[FakeVQGAN]:
    """The FakeVQGAN class, for test modules (which cannot import conftest)."""
    return FakeVQGAN
