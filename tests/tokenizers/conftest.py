"""The tokenizers tests' media folder (built with the shared `media_kit` fixture of
tests/conftest.py: real media made with PyAV / Pillow, nothing downloaded), the
reference VQGAN case and a test-only pickle loader."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import numpy as np
import pytest

@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory, media_kit) -> Path:
    """A folder of real test media, built once per session."""
    d = tmp_path_factory.mktemp("media")
    write_video, vfr_ms = media_kit.write_video, media_kit.VFR_MS
    write_video(d / "h264.mp4", 30, fps=10, gop=10)
    write_video(d / "h264_bframes.mp4", 24, fps=12, gop=8, bframes=3)
    write_video(d / "rotated.mp4", 6, fps=10, rotation=90)
    # variable frame rate: irregular gaps (ms)
    write_video(d / "vfr.mp4", len(vfr_ms), pts_ms=vfr_ms)
    if "libvpx-vp9" in av.codecs_available:
        write_video(d / "vp9.webm", 20, fps=10, codec="libvpx-vp9", gop=5)
    media_kit.write_audio_only(d / "audio.m4a")
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


