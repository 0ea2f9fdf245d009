"""MediaService ingestion (server/media_service.py, server/media_ingest.py) without HTTP: it runs the one pipeline,
`media_ingest.encode_media`, with progress events, the stored sha256, O(batch)
memory, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lwm_serve.server.media_sources import MediaSource
from lwm_serve.server.media_ingest import IngestEvent
from lwm_serve.server.media_plan import MediaRequest
from lwm_serve.server.media_service import MediaService
from lwm_serve.tokenizers import media_ingest
from lwm_serve.tokenizers import vision_cache as vc
from lwm_serve.tokenizers.frame_sampling import SamplingSpec

N_FRAMES, W, H = 48, 320, 240


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory, media_kit) -> Path:
    frames = [np.full((H, W, 3), (5 * i) % 256, np.uint8) for i in range(N_FRAMES)]
    path = tmp_path_factory.mktemp("vision") / "long.mp4"
    return media_kit.write_video(path, 0, fps=24, frames=frames, gop=24)


def _service(tmp_path: Path, vqgan) -> MediaService:
    return MediaService(vqgan, FakeTokenizer(), vc.VisionCache(tmp_path / "cache"), None,  # type: ignore[arg-type]
                         layout="standard", context_limit=1 << 20)


def _request(path: Path, spec: SamplingSpec) -> MediaRequest:
    source = MediaSource(data=path, sha256=vc.media_sha256(path), label="file-abc")
    return MediaRequest(source=source, spec=spec, auto_fps=None, param="file")


def _plan(service: MediaService, req: MediaRequest):
    plans, _ = asyncio.run(service.plan([req], text_tokens=4, max_tokens=8))
    return plans


def test_ingest_reports_progress_uses_the_stored_sha256_and_shares_the_cache_key(tmp_path, long_clip,
                                                                                    monkeypatch, fake_vqgan):
    vqgan = fake_vqgan(batch_size=8)
    service = _service(tmp_path, vqgan)
    spec = SamplingSpec(max_frames=None, fps=6.0)
    req = _request(long_clip, spec)
    plans = _plan(service, req)

    def no_hash(src):
        raise AssertionError("the server must reuse the file store's sha256")

    monkeypatch.setattr(vc, "media_sha256", no_hash)
    events: list[IngestEvent] = []

    async def run():
        return await service.encode(plans, events.append)

    (encoded,) = asyncio.run(run())
    n = len(encoded.codes)
    assert n == len(encoded.timestamps) == sum(vqgan.batches) > vqgan.batch_size and not encoded.cached
    assert max(vqgan.batches) <= vqgan.batch_size
    encode_events = [e for e in events if e.stage == "encode"]
    assert [e.done for e in encode_events] == list(range(8, n, 8)) + [n]
    assert all(e.total == n and e.frames_per_s is not None for e in encode_events)
    assert any(e.stage == "decode" and e.done == e.total == n for e in events)
    assert (service.stats.cache_misses, service.stats.frames_encoded, service.stats.cache_hits) == (1, n, 0)
    # The same key as tokenizers.media_ingest.encode_media: an offline ingest's entry is a server hit.
    key = vc.cache_key(req.source.sha256, spec, vqgan.identity)
    np.testing.assert_array_equal(service.cache.get(key), encoded.codes)
    monkeypatch.undo()
    offline, _ = media_ingest.encode_media(long_clip, spec, fake_vqgan(8), vc.VisionCache(tmp_path / "offline"))
    np.testing.assert_array_equal(offline, encoded.codes)

    again = _plan(service, req)
    assert again[0].hit is not None
    events.clear()
    (cached,) = asyncio.run(service.encode(again, events.append))
    assert cached.cached and [e.stage for e in events] == ["cached"] and service.stats.cache_hits == 1


def test_ingest_memory_is_bounded_by_the_batch(tmp_path, long_clip, fake_vqgan):
    vqgan = fake_vqgan(batch_size=4)
    service = _service(tmp_path, vqgan)
    plans = _plan(service, _request(long_clip, SamplingSpec(max_frames=None)))  # all 48 frames
    per_batch = vqgan.batch_size * (W * H * 3 + 256 * 256 * 3 * 4)  # decoded uint8 + float32 pixels
    all_frames = N_FRAMES * (W * H * 3 + 256 * 256 * 3 * 4)
    tracemalloc.start()  # traces every thread, the ingest thread included
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        (encoded,) = asyncio.run(service.encode(plans))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(encoded.codes) == N_FRAMES and vqgan.batches == [4] * (N_FRAMES // 4)
    assert peak < 4 * per_batch < all_frames / 2.5, (peak, per_batch, all_frames)


def test_a_client_leaving_stops_the_ingestion_and_stores_nothing(tmp_path, long_clip, fake_vqgan):
    vqgan = fake_vqgan(batch_size=4)
    vqgan.release = threading.Event()
    service = _service(tmp_path, vqgan)
    plans = _plan(service, _request(long_clip, SamplingSpec(max_frames=None)))
    decoded: list[int] = []

    async def leave() -> None:
        task = asyncio.ensure_future(service.encode(plans, lambda e: decoded.append(e.done)
                                                    if e.stage == "decode" else None))
        while not vqgan.entered.is_set():  # the first batch is in the VQGAN
            await asyncio.sleep(0.01)
        task.cancel()  # what a disconnect does to the request's task
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    vqgan.release.set()  # the batch finishes; its progress event finds the request gone
    service.ingester._executor.submit(lambda: None).result(timeout=30)  # the ingest thread is done
    service.close()
    assert vqgan.batches == [4]  # no second batch was decoded or encoded
    assert max(decoded, default=0) <= 4 < N_FRAMES
    assert service.cache.size_bytes() == 0
    assert (service.stats.cache_misses, service.stats.frames_encoded) == (0, 0)


def test_a_cut_event_stream_leaves_no_task_pending(tmp_path, long_clip, fake_vqgan):
    """Closing `encode_events` mid-wait (a cut SSE stream) cancels what it started:
    before, its `Queue.get` task was left pending ("Task was destroyed but it is pending")."""
    vqgan = fake_vqgan(batch_size=4)
    vqgan.release = threading.Event()
    service = _service(tmp_path, vqgan)
    plans = _plan(service, _request(long_clip, SamplingSpec(max_frames=None)))

    async def cut() -> list[asyncio.Task]:
        events = service.encode_events(plans)
        first = await events.__anext__()
        assert isinstance(first, IngestEvent)
        reader = asyncio.ensure_future(events.__anext__())  # waits inside encode_events
        await asyncio.sleep(0.05)
        reader.cancel()  # what a client leaving does to the response task
        with pytest.raises(asyncio.CancelledError):
            await reader
        await events.aclose()
        await asyncio.sleep(0)  # let cancellations land
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    pending = asyncio.run(cut())
    vqgan.release.set()
    service.ingester._executor.submit(lambda: None).result(timeout=30)
    service.close()
    assert pending == []


@pytest.mark.parametrize("fixed", [None, 3])
def test_warm_up_compiles_and_measures_the_encode_sizes_before_any_request(tmp_path, reference_dir, fixed):
    from lwm_serve.server.runtime import load_vqgan
    from lwm_serve.tokenizers.vqgan_batch import CANDIDATES

    vqgan = load_vqgan(reference_dir / "vqgan" / "vqgan_params.pkl")  # a fresh wrapper: warm-up changes it
    service = MediaService(vqgan, FakeTokenizer(), vc.VisionCache(tmp_path / "cache"), None,  # type: ignore[arg-type]
                           layout="standard", context_limit=1 << 20, vqgan_batch=fixed)
    service.prepare()  # beside the model's compiles: the identity hash and the first sizes
    assert "identity" in vqgan.__dict__  # the cached property was computed
    measured = service.warm_up()
    if fixed is None:
        assert set(CANDIDATES[:2]) <= set(measured) <= set(CANDIDATES)
        assert vqgan.batch_size in measured and vqgan.encode_seconds == measured
    else:  # the batch and its padded power-of-two tails compiled, nothing measured
        assert measured == {} and vqgan.batch_size == 3 and vqgan.encode_seconds is None
        assert service._first_sizes() == [1, 2, 3]
