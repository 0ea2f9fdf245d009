"""Media decoding on real files made by conftest: strategies, rotation, VFR, errors, images."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lwm_serve.tokenizers import media_decode as md
from lwm_serve.tokenizers.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaError,
    MediaTooLongError,
    NoVideoStreamError,
    UnsupportedMediaError,
)
from lwm_serve.tokenizers import decode_strategies as ds
from lwm_serve.tokenizers.frame_sampling import SamplingSpec, select_frames

SPECS = [
    SamplingSpec(),  # the reference default: 8 uniform frames
    SamplingSpec(max_frames=3),
    SamplingSpec(max_frames=None, fps=2.0),
    SamplingSpec(max_frames=None, fps=1.0, start=0.45, end=1.65),
    SamplingSpec(max_frames=2, start=1.0),
    SamplingSpec(max_frames=None),
]
VIDEOS = ["h264.mp4", "h264_bframes.mp4", "vfr.mp4", "vp9.webm"]


def _clip(name: str, media_dir: Path, request) -> Path:
    return request.getfixturevalue("vp9_path") if name == "vp9.webm" else media_dir / name


def _level(frame: np.ndarray, kit) -> float:
    """Mean grey away from the corner marker."""
    return float(frame[kit.MARK + 2 :, kit.MARK + 2 :].mean())


@pytest.mark.parametrize("name", VIDEOS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key())
def test_every_strategy_returns_the_specified_frames(name, spec, media_dir, media_kit, request):
    path = _clip(name, media_dir, request)
    times = media_kit.CLIPS[name]
    want = select_frames(times, spec)
    results = {s: md.decode_video(path, spec, strategy=s) for s in md.STRATEGIES}
    full = results["full"]
    np.testing.assert_allclose([t for t, _ in full], [times[i] for i in want], atol=1e-3)
    for idx, (_, frame) in zip(want, full):
        assert frame.shape == (media_kit.H, media_kit.W, 3) and frame.dtype == np.uint8
        assert abs(_level(frame, media_kit) - media_kit.frame_level(idx)) < 4
    for strategy, got in results.items():
        assert [t for t, _ in got] == [t for t, _ in full], strategy
        for (_, a), (_, b) in zip(got, full):
            np.testing.assert_array_equal(a, b, err_msg=strategy)


def test_reference_default_is_linspace_over_all_frames(media_dir, media_kit):
    times = media_kit.CLIPS["h264.mp4"]
    got = md.decode_video(media_dir / "h264.mp4")
    ids = np.linspace(0, len(times) - 1, SamplingSpec().max_frames, dtype=int)
    np.testing.assert_allclose([t for t, _ in got], [times[i] for i in ids], atol=1e-9)


def test_vfr_uses_real_timestamps(media_dir, media_kit):
    got = md.decode_video(media_dir / "vfr.mp4", SamplingSpec(max_frames=None), strategy="seek")
    np.testing.assert_allclose([t for t, _ in got], media_kit.CLIPS["vfr.mp4"], atol=1e-9)
    timeline = md.frame_timeline(media_dir / "vfr.mp4")
    np.testing.assert_allclose(timeline.seconds, media_kit.CLIPS["vfr.mp4"], atol=1e-9)


def test_rotated_phone_clip_comes_out_upright(media_dir, media_kit):
    path = media_dir / "rotated.mp4"
    info = md.probe_video(path)
    assert info.rotation == 90
    assert (info.width, info.height) == (media_kit.W, media_kit.H)  # coded size
    for strategy in md.STRATEGIES:
        frames = md.decode_video(path, SamplingSpec(max_frames=None), strategy=strategy)
        assert len(frames) == len(media_kit.CLIPS["rotated.mp4"])
        for _, frame in frames:
            # 90 degrees counter-clockwise: landscape -> portrait, top-left marker -> bottom-left
            assert frame.shape == (media_kit.W, media_kit.H, 3)
            m = media_kit.MARK
            assert frame[-m:, :m].mean() > 200 and frame[:m, :m].mean() < 200


def test_probe_reports_the_container_facts(media_dir, media_kit):
    info = md.probe_video(media_dir / "h264.mp4")
    times = media_kit.CLIPS["h264.mp4"]
    assert info.codec == "h264" and info.rotation == 0
    assert info.n_frames_estimate == len(times)
    assert info.fps == pytest.approx(1 / (times[1] - times[0]))
    assert info.duration_s == pytest.approx(times[-1] + times[1] - times[0])
    assert (info.width, info.height) == (media_kit.W, media_kit.H)


def test_bytes_and_path_give_the_same_frames(media_dir):
    path = media_dir / "h264_bframes.mp4"
    a = md.decode_video(path, SamplingSpec(max_frames=4))
    b = md.decode_video(path.read_bytes(), SamplingSpec(max_frames=4))
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_auto_strategy_and_bad_strategy(media_dir):
    assert md.choose_strategy(10, 36000) == "seek"
    assert md.choose_strategy(8, 30) == "full"
    auto = md.decode_video(media_dir / "h264.mp4", SamplingSpec(max_frames=2), strategy="auto")
    seek = md.decode_video(media_dir / "h264.mp4", SamplingSpec(max_frames=2), strategy="seek")
    assert [t for t, _ in auto] == [t for t, _ in seek]
    with pytest.raises(ValueError, match="strategy"):
        md.decode_video(media_dir / "h264.mp4", strategy="fastest")  # type: ignore[arg-type]


def test_range_past_the_end_gives_no_frames(media_dir):
    assert md.decode_video(media_dir / "h264.mp4", SamplingSpec(start=100.0)) == []


# ---------------------------------------------------------------------------- errors


def _truncated_webm(media_dir: Path, request) -> bytes:
    data = request.getfixturevalue("vp9_path").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda d, r: d / "empty.mp4", EmptyMediaError),
        (lambda d, r: b"", EmptyMediaError),
        (lambda d, r: d / "truncated.mp4", CorruptMediaError),
        (lambda d, r: (d / "h264.mp4").read_bytes()[:-1500], CorruptMediaError),
        (_truncated_webm, CorruptMediaError),
        (lambda d, r: d / "audio.m4a", NoVideoStreamError),
        (lambda d, r: d / "notmedia.bin", UnsupportedMediaError),
        (lambda d, r: d / "missing.mp4", MediaError),
    ],
    ids=["empty-file", "empty-bytes", "truncated-mp4", "cut-mp4-index", "truncated-webm", "audio-only",
         "not-media", "missing"],
)
def test_bad_media_raises_a_typed_error_naming_it(make, error, media_dir, request):
    src = make(media_dir, request)
    calls = [md.decode_media, md.decode_video]
    if request.node.callspec.id != "truncated-webm":
        # probe reads the header only: a WebM cut after its header probes fine
        calls.append(md.probe_video)
    for call in calls:
        with pytest.raises(error) as info:
            call(src)
        assert isinstance(info.value, ValueError)
        name = "<bytes>" if isinstance(src, bytes) else str(src)
        assert name in str(info.value)


def test_too_long_video_is_rejected_before_decoding(media_dir, media_kit):
    path = media_dir / "h264.mp4"
    limit = media_kit.CLIPS["h264.mp4"][-1] / 2
    with pytest.raises(MediaTooLongError, match="limit"):
        md.probe_video(path, max_duration_s=limit)
    with pytest.raises(MediaTooLongError, match="limit"):
        md.decode_video(path, max_duration_s=limit)
    assert md.decode_video(path, SamplingSpec(max_frames=1), max_duration_s=limit * 4)


def test_no_temp_file_is_left_behind(media_dir, request, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = sorted(p.name for p in media_dir.iterdir())
    srcs = [media_dir / n for n in before] + [(media_dir / "h264.mp4").read_bytes(), b""]
    for src in srcs:
        for call in (md.decode_media, md.probe_video):
            try:
                call(src)
            except MediaError:
                pass
    assert sorted(p.name for p in media_dir.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- images


def test_png_and_lossless_webp_round_trip_exactly(media_kit, tmp_path):
    frame = media_kit.make_frame(7, 40, 30)
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True})):
        data = media_kit.image_bytes(frame, fmt, **kwargs)
        np.testing.assert_array_equal(md.load_image(data), frame)
        path = tmp_path / f"x.{fmt.lower()}"
        path.write_bytes(data)
        got = md.decode_media(path)
        assert len(got) == 1 and got[0][0] == 0.0
        np.testing.assert_array_equal(got[0][1], frame)


def test_jpeg_exif_orientation_is_applied(media_kit):
    frame = media_kit.make_frame(20, 40, 24)  # landscape, marker top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    data = media_kit.image_bytes(frame, "JPEG", quality=95, exif=exif.tobytes())
    got = md.load_image(data)
    assert got.shape == (40, 24, 3)
    m = media_kit.MARK
    assert got[:m, -m:].mean() > 200 and got[:m, :m].mean() < 200  # marker now top-right


def test_gif_gives_its_first_frame(media_kit):
    a, b = media_kit.make_frame(2, 32, 32), media_kit.make_frame(30, 32, 32)
    data = media_kit.image_bytes(a, "GIF", save_all=True, append_images=[Image.fromarray(b)])
    got = md.decode_media(data)
    assert len(got) == 1
    assert abs(_level(got[0][1], media_kit) - media_kit.frame_level(2)) < 4


def test_rgba_and_palette_images_become_rgb(media_kit):
    rgba = np.dstack([media_kit.make_frame(3, 20, 20), np.full((20, 20), 128, np.uint8)])
    got = md.load_image(media_kit.image_bytes(rgba, "PNG"))
    np.testing.assert_array_equal(got, rgba[..., :3])  # alpha dropped like convert('RGB')


def test_truncated_image_is_corrupt(media_kit):
    data = media_kit.image_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), "PNG")
    with pytest.raises(CorruptMediaError, match="truncated or damaged"):
        md.decode_media(data[: len(data) // 2])


# ---------------------------------------------------------------------------- preprocessing


def test_preprocess_is_bit_exact_with_the_reference(vqgan_case):
    case, d, processed = vqgan_case["case"], vqgan_case["dir"], vqgan_case["arrays"]["processed"]
    for i, name in enumerate(case["inputs"]):
        with Image.open(d / name) as img:
            from_pil = md.preprocess_frame(img, case["target_size"])
        np.testing.assert_array_equal(from_pil, processed[i])
        np.testing.assert_array_equal(md.preprocess_frame(md.load_image(d / name), case["target_size"]), processed[i])


@pytest.mark.parametrize("wh", [(320, 240), (200, 300), (256, 256), (257, 1000)])
def test_preprocess_shape_and_range(wh):
    frame = np.random.default_rng(1).integers(0, 256, (wh[1], wh[0], 3), np.uint8)
    out = md.preprocess_frame(frame)
    assert out.shape == (md.FRAME_SIZE, md.FRAME_SIZE, 3) and out.dtype == np.float32
    assert out.min() >= -1 and out.max() <= 1


def test_preprocess_rejects_non_rgb_arrays():
    with pytest.raises(ValueError, match="uint8"):
        md.preprocess_frame(np.zeros((10, 10), np.uint8))


@pytest.mark.parametrize("strategy", md.STRATEGIES)
def test_progress_is_reported_per_kept_frame(strategy, media_dir):
    seen = []
    got = md.decode_video(
        media_dir / "h264.mp4", SamplingSpec(max_frames=4), strategy, progress=lambda k, n: seen.append((k, n))
    )
    assert seen == [(i + 1, len(got)) for i in range(len(got))]


@pytest.mark.parametrize("name", ["h264.mp4", "h264_bframes.mp4"])
@pytest.mark.parametrize("strategy", md.STRATEGIES)
def test_frames_stream_one_at_a_time(strategy, name, media_dir):
    """The iterator hands each frame out as it is decoded and keeps no reference to it."""
    import weakref

    path, spec = media_dir / name, SamplingSpec(max_frames=None)
    kept = []
    frames = md.iter_video_frames(path, spec, strategy, progress=lambda k, n: kept.append(k))
    refs, times, alive = [], [], []
    for t, frame in frames:  # (not enumerate: it caches its last tuple, and so the frame)
        assert kept[-1] == len(refs) + 1  # decoded lazily: nothing decoded ahead of the consumer
        refs.append(weakref.ref(frame))
        times.append(t)
        del frame  # arrays hold no cycles: freed now unless something else keeps them
        alive.append(sum(r() is not None for r in refs))
    assert len(times) == len(md.decode_video(path, spec, strategy)) > 2
    assert max(alive) == 0  # a list would keep every frame: len(times)
    assert times == [t for t, _ in md.decode_video(path, spec, strategy)]


def test_images_stream_as_one_frame_with_progress(media_kit):
    png = media_kit.image_bytes(media_kit.make_frame(2), "PNG")
    seen = []
    (t, frame), = list(md.iter_media_frames(png, progress=lambda k, n: seen.append((k, n))))
    assert t == 0.0 and seen == [(1, 1)]
    np.testing.assert_array_equal(frame, md.load_image(png))


def test_a_raising_progress_stops_decoding(media_dir):
    class Stop(Exception):
        pass

    seen = []

    def progress(kept: int, wanted: int) -> None:
        seen.append(kept)
        if kept == 2:
            raise Stop()

    frames = md.iter_video_frames(media_dir / "h264.mp4", SamplingSpec(max_frames=None), "full", progress=progress)
    got = []
    with pytest.raises(Stop):
        for item in frames:
            got.append(item)
    assert seen == [1, 2] and len(got) == 1


def test_a_bad_strategy_fails_at_the_call_not_at_the_first_frame(media_dir):
    with pytest.raises(ValueError, match="unknown decode strategy"):
        md.iter_video_frames(media_dir / "h264.mp4", strategy="fastest")  # type: ignore[arg-type]


def test_a_frame_the_decoder_never_returns_is_an_error_without_holding_the_rest():
    """Frames decoded past a missing one are held only up to a bound, then CorruptMediaError."""
    wanted = list(range(0, 400, 4))
    pulled = []

    def decoded():  # every wanted frame but the first, in order
        for pts in wanted[1:]:
            pulled.append(pts)
            yield pts, np.zeros((2, 2, 3), np.uint8)

    frames = ds.in_order(decoded(), wanted, {p: p / 100 for p in wanted}, None, "clip.mp4")
    with pytest.raises(CorruptMediaError, match=r"clip.mp4: .* of 100 frames could not be decoded \(first pts 0\)"):
        next(frames)
    assert len(pulled) <= ds.MAX_PENDING + 1 < len(wanted) - 1
