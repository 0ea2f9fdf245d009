"""The ingestion pipeline (`media_ingest.encode_media`): read-through cache, streamed
decode -> preprocess -> VQGAN in O(batch) memory, progress stages, cancellation."""

from __future__ import annotations

import numpy as np
import pytest

from lwm_serve.tokenizers import media_ingest as mi
from lwm_serve.tokenizers import vision_cache as vc
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.vqgan import VQGAN


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_encode_media_reads_through_the_cache(tmp_path, media_dir, vqgan_case, monkeypatch):
    from lwm_serve.tokenizers import media_decode as md

    model = VQGAN(vqgan_case["params"], vqgan_case["cfg"], batch_size=4)
    cache = vc.VisionCache(tmp_path / "cache")
    spec = SamplingSpec(max_frames=6)  # two batches of 4 and 2: streaming equals all at once
    path = media_dir / "h264.mp4"
    codes, ts = mi.encode_media(path, spec, model, cache)
    assert codes.shape == (6, 16, 16) and ts.shape == (6,)
    direct = model.encode_frames(md.preprocess_frames([f for _, f in md.decode_video(path, spec)]))
    np.testing.assert_array_equal(codes, direct)

    def no_decode(*args, **kwargs):
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(md, "iter_media_frames", no_decode)
    again, ts2 = mi.encode_media(path.read_bytes(), spec, model, cache)  # same content as bytes
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(ts2, ts)
    with pytest.raises(AssertionError, match="must not decode"):
        mi.encode_media(path, SamplingSpec(max_frames=2), model, cache)  # another spec is a miss


# --------------------------------------------------------------------------- streamed pipeline


def _long_clip(path, media_kit, n: int, w: int, h: int):
    frames = [np.full((h, w, 3), (7 * i) % 256, np.uint8) for i in range(n)]
    return media_kit.write_video(path, 0, fps=30, frames=frames, gop=30)


def _peak_bytes(fn) -> tuple[int, object]:
    import tracemalloc

    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def test_encode_media_memory_is_bounded_by_the_batch_not_the_video(tmp_path, media_kit, fake_vqgan):
    """96 frames of 320x240 through decode -> preprocess -> VQGAN in batches of 4:
    the peak traced memory stays within a few batches' worth, far below all frames'."""
    from lwm_serve.tokenizers import media_decode as md

    n, w, h, batch = 96, 320, 240, 4
    path = _long_clip(tmp_path / "long.mp4", media_kit, n, w, h)
    spec = SamplingSpec(max_frames=None)  # every frame
    model = fake_vqgan(batch)
    frame_bytes, pixel_bytes = w * h * 3, 256 * 256 * 3 * 4  # uint8 decoded, float32 preprocessed
    per_batch = batch * (frame_bytes + pixel_bytes)
    all_frames = n * (frame_bytes + pixel_bytes)

    peak, (codes, ts) = _peak_bytes(lambda: mi.encode_media(path, spec, model))
    assert codes.shape == (n, 16, 16) and len(ts) == n
    assert model.batches == [batch] * (n // batch)
    assert peak < 4 * per_batch < all_frames / 5, (peak, per_batch, all_frames)

    # The bound can fail: the same work with every frame in memory peaks above all the frames' size.
    listed = fake_vqgan(batch)
    list_peak, list_codes = _peak_bytes(
        lambda: listed.encode_frames(md.preprocess_frames([f for _, f in md.decode_media(path, spec)])))
    assert list_peak > all_frames > 4 * per_batch
    np.testing.assert_array_equal(codes, list_codes)  # batching changes nothing


def test_encode_media_progress_stages_and_known_sha256(tmp_path, media_dir, monkeypatch, fake_vqgan):
    path = media_dir / "h264.mp4"
    spec = SamplingSpec(max_frames=5)
    sha = vc.media_sha256(path)

    def no_hash(src):
        raise AssertionError("a known sha256 must not be recomputed")

    monkeypatch.setattr(vc, "media_sha256", no_hash)
    model, cache, seen = fake_vqgan(2), vc.VisionCache(tmp_path), []
    codes, ts = mi.encode_media(path, spec, model, cache, progress=lambda *a: seen.append(a), content_sha256=sha)
    decode = [(d, t) for stage, d, t in seen if stage == "decode"]
    encode = [(d, t) for stage, d, t in seen if stage == "encode"]
    assert decode == [(i + 1, 5) for i in range(5)]
    assert encode == [(2, 5), (4, 5), (5, 5)]
    assert {stage for stage, _, _ in seen} == {"decode", "encode"}
    # Decoding and encoding interleave: the first batch is encoded before the last frame is decoded.
    assert seen.index(("encode", 2, 5)) < seen.index(("decode", 5, 5))
    # Stored under the same key as ever (sha256 of the content + spec + VQGAN identity).
    np.testing.assert_array_equal(cache.get(vc.cache_key(sha, spec, model.identity)), codes)
    seen.clear()
    again, ts2 = mi.encode_media(path, spec, model, cache, progress=lambda *a: seen.append(a), content_sha256=sha)
    assert seen == [("cached", 5, 5)]
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(ts2, ts)


def test_a_raising_progress_cancels_and_stores_nothing(tmp_path, media_dir, fake_vqgan):
    class Cancelled(Exception):
        pass

    decoded = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "decode":
            decoded.append(done)
        if stage == "encode":
            raise Cancelled()

    model, cache = fake_vqgan(2), vc.VisionCache(tmp_path)
    with pytest.raises(Cancelled):
        mi.encode_media(media_dir / "h264.mp4", SamplingSpec(max_frames=None), model, cache, progress=progress)
    # The first batch's codes are collected once the second batch is dispatched (one VQGAN
    # call in flight while the next frames decode): it stops there, not at the end.
    assert model.batches == [2, 2] and decoded == [1, 2, 3, 4]
    assert cache.size_bytes() == 0 and _files(tmp_path) == []


def test_a_sampling_that_picks_nothing_is_returned_empty_and_not_stored(tmp_path, media_dir, fake_vqgan):
    model, cache = fake_vqgan(2), vc.VisionCache(tmp_path)
    codes, ts = mi.encode_media(media_dir / "h264.mp4", SamplingSpec(start=100.0), model, cache)
    assert codes.shape == (0, 16, 16) and codes.dtype == np.int32 and ts.shape == (0,)
    assert model.batches == [] and _files(tmp_path) == []
