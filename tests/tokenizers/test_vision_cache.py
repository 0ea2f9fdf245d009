"""The on-disk code cache: round trip, keys, atomic writes, restart, eviction."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lwm_serve.tokenizers import vision_cache as vc
from lwm_serve.tokenizers.frame_sampling import SamplingSpec


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
