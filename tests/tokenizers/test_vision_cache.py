"""The on-disk code cache: round trip, keys, atomic writes, restart, eviction, read-through."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lwm_serve.tokenizers import vision_cache as vc
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.vqgan import VQGAN


def _codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 8192, (n, 16, 16)).astype(np.int32)


def _key(i: int) -> str:
    return vc.cache_key(vc.media_sha256(bytes([i])), SamplingSpec(), "vqgan")


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_get_round_trip_and_survives_restart(tmp_path):
    cache = vc.VisionCache(tmp_path)
    key, codes, ts = _key(1), _codes(3), np.array([0.0, 0.5, 1.25])
    assert cache.get(key) is None and key not in cache
    cache.put(key, codes, ts)
    assert key in cache
    reopened = vc.VisionCache(tmp_path)
    got_codes, got_ts = reopened.get_entry(key)
    np.testing.assert_array_equal(got_codes, codes)
    assert got_codes.dtype == np.int32
    np.testing.assert_array_equal(got_ts, ts)
    np.testing.assert_array_equal(reopened.get(key), codes)
    assert not [f for f in _files(tmp_path) if ".tmp-" in f]


def test_key_depends_on_content_spec_and_vqgan(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * (3 << 20))
    b.write_bytes(b"x" * (3 << 20) + b"y")
    ha = vc.media_sha256(a)
    assert ha == vc.media_sha256(a.read_bytes())  # streamed file hash == in-memory hash
    assert ha != vc.media_sha256(b)
    base = vc.cache_key(ha, SamplingSpec(), "v1")
    assert base == vc.cache_key(ha, SamplingSpec(max_frames=8), "v1")
    assert base != vc.cache_key(vc.media_sha256(b), SamplingSpec(), "v1")
    assert base != vc.cache_key(ha, SamplingSpec(fps=1.0), "v1")
    assert base != vc.cache_key(ha, SamplingSpec(), "v2")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    cache = vc.VisionCache(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vc.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.put(_key(2), _codes(1), np.zeros(1))
    assert _files(tmp_path) == []
    assert cache.get(_key(2)) is None


def test_overwrite_is_atomic_replace(tmp_path):
    cache = vc.VisionCache(tmp_path)
    cache.put(_key(3), _codes(1, 0), np.zeros(1))
    cache.put(_key(3), _codes(2, 1), np.zeros(2))
    np.testing.assert_array_equal(cache.get(_key(3)), _codes(2, 1))
    assert len(_files(tmp_path)) == 1


def test_damaged_entry_is_a_miss_and_is_removed(tmp_path):
    cache = vc.VisionCache(tmp_path)
    cache.put(_key(4), _codes(1), np.zeros(1))
    (path,) = list(tmp_path.rglob("*.npz"))
    path.write_bytes(b"not a zip")
    assert cache.get(_key(4)) is None
    assert not path.exists()


def test_bad_arguments(tmp_path):
    cache = vc.VisionCache(tmp_path)
    with pytest.raises(ValueError, match="hex"):
        cache.get("../../etc/passwd")
    with pytest.raises(ValueError, match="timestamps"):
        cache.put(_key(5), _codes(2), np.zeros(3))


def test_eviction_keeps_the_most_recently_used(tmp_path):
    probe = vc.VisionCache(tmp_path / "probe")
    probe.put(_key(0), _codes(2), np.zeros(2))
    entry_size = probe.size_bytes()
    cache = vc.VisionCache(tmp_path / "c", max_bytes=int(entry_size * 2.5))
    for i in range(3):
        cache.put(_key(10 + i), _codes(2, i), np.zeros(2))
        os.utime(next((tmp_path / "c").rglob(f"{_key(10 + i)}.npz")), (1000 + i, 1000 + i))
    # the third put evicted the oldest (10)
    assert cache.get(_key(10)) is None
    assert cache.get(_key(11)) is not None  # a hit refreshes 11
    cache.put(_key(13), _codes(2, 3), np.zeros(2))
    assert cache.get(_key(12)) is None  # 12 was now the least recently used
    assert cache.get(_key(11)) is not None and cache.get(_key(13)) is not None
    assert cache.size_bytes() <= cache.max_bytes


def test_encode_media_reads_through_the_cache(tmp_path, media_dir, vqgan_case, monkeypatch):
    from lwm_serve.tokenizers import media_decode as md

    model = VQGAN(vqgan_case["params"], vqgan_case["cfg"], batch_size=4)
    cache = vc.VisionCache(tmp_path / "cache")
    spec = SamplingSpec(max_frames=6)  # two batches of 4 and 2: streaming equals all at once
    path = media_dir / "h264.mp4"
    codes, ts = vc.encode_media(path, spec, model, cache)
    assert codes.shape == (6, 16, 16) and ts.shape == (6,)
    direct = model.encode_frames(md.preprocess_frames([f for _, f in md.decode_video(path, spec)]))
    np.testing.assert_array_equal(codes, direct)

    def no_decode(*args, **kwargs):
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(md, "iter_media_frames", no_decode)
    again, ts2 = vc.encode_media(path.read_bytes(), spec, model, cache)  # same content as bytes
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(ts2, ts)
    with pytest.raises(AssertionError, match="must not decode"):
        vc.encode_media(path, SamplingSpec(max_frames=2), model, cache)  # another spec is a miss


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

    peak, (codes, ts) = _peak_bytes(lambda: vc.encode_media(path, spec, model))
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
    codes, ts = vc.encode_media(path, spec, model, cache, progress=lambda *a: seen.append(a), content_sha256=sha)
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
    again, ts2 = vc.encode_media(path, spec, model, cache, progress=lambda *a: seen.append(a), content_sha256=sha)
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
        vc.encode_media(media_dir / "h264.mp4", SamplingSpec(max_frames=None), model, cache, progress=progress)
    assert model.batches == [2] and decoded == [1, 2]  # stopped after the first batch
    assert cache.size_bytes() == 0 and _files(tmp_path) == []


def test_a_sampling_that_picks_nothing_is_returned_empty_and_not_stored(tmp_path, media_dir, fake_vqgan):
    model, cache = fake_vqgan(2), vc.VisionCache(tmp_path)
    codes, ts = vc.encode_media(media_dir / "h264.mp4", SamplingSpec(start=100.0), model, cache)
    assert codes.shape == (0, 16, 16) and codes.dtype == np.int32 and ts.shape == (0,)
    assert model.batches == [] and _files(tmp_path) == []
