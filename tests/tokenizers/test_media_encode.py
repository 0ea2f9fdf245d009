"""Frames to PNG / WebP / MP4 bytes, read back with Pillow and our own decoder."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from lwm_serve.tokenizers import media_decode as md
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.media_encode import encode_image, encode_mp4, to_uint8


def _frames(n: int, media_kit, w: int = 64, h: int = 48) -> list[np.ndarray]:
    return [media_kit.make_frame(i, w, h) for i in range(n)]


def test_png_round_trips_exactly():
    frame = np.random.default_rng(0).integers(0, 256, (17, 23, 3), np.uint8)
    data = encode_image(frame, "png")
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(md.load_image(data), frame)


def test_webp_lossless_and_lossy():
    frame = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
    lossless = encode_image(frame, "webp", quality=100)
    with Image.open(io.BytesIO(lossless)) as img:
        assert img.format == "WEBP"
    np.testing.assert_array_equal(md.load_image(lossless), frame)
    smooth = np.full((32, 32, 3), 120, np.uint8)
    lossy = encode_image(smooth, "webp", quality=80)
    assert np.abs(md.load_image(lossy).astype(int) - 120).max() <= 3


def test_jpeg_and_bad_inputs():
    frame = np.full((8, 8, 3), 200, np.uint8)
    with Image.open(io.BytesIO(encode_image(frame, "jpeg"))) as img:
        assert img.format == "JPEG"
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(frame, "bmp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        encode_image(frame.astype(np.float32), "png")


@pytest.mark.parametrize("fps", [8.0, 29.97])
def test_mp4_is_h264_yuv420p_at_the_given_rate(fps, media_kit):
    frames = _frames(12, media_kit)
    data = encode_mp4(frames, fps=fps, crf=10, preset="ultrafast")
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        assert c.format.name.startswith("mov,mp4")
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert float(s.average_rate) == pytest.approx(fps, rel=1e-3)
    got = md.decode_video(data, SamplingSpec(max_frames=None))
    assert len(got) == len(frames)
    np.testing.assert_allclose([t for t, _ in got], [i / fps for i in range(len(frames))], atol=1e-3)
    for i, (_, frame) in enumerate(got):
        assert np.abs(frame.astype(int) - frames[i].astype(int)).mean() < 3


def test_mp4_keyframe_interval_and_odd_size(media_kit):
    frames = _frames(20, media_kit, w=33, h=21)
    data = encode_mp4(frames, fps=10, preset="ultrafast", gop_seconds=0.5)
    timeline = md.frame_timeline(data)
    assert [i for i, k in enumerate(timeline.keyframe) if k] == list(range(0, 20, 5))
    got = md.decode_video(data, SamplingSpec(max_frames=1))
    assert got[0][1].shape == (22, 34, 3)  # padded to even sides for yuv420p


def test_mp4_rejects_bad_input(media_kit):
    with pytest.raises(ValueError, match="at least one frame"):
        encode_mp4([])
    with pytest.raises(ValueError, match="frame 1"):
        encode_mp4([media_kit.make_frame(0), media_kit.make_frame(1, 32, 32)])
    with pytest.raises(ValueError, match="fps"):
        encode_mp4([media_kit.make_frame(0)], fps=0)


def test_to_uint8_matches_the_reference_formula():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(x), ((x + 1) * 127.5).astype(np.uint8))
