"""server/stores/jobs.py: records and files of video jobs, restart semantics, cursor listing."""

from __future__ import annotations

import pytest

from lwm_serve.server.stores.jobs import RESTART_ERROR, JobNotFound, JobStore, VideoJob


def _job(store: JobStore, status: str = "queued") -> VideoJob:
    job = VideoJob(store.new_id(), "a prompt", "256x256", "1", 4, "m", status=status, created_at=100)
    store.save(job)
    return job


def test_listing_follows_creation_order_within_one_second(tmp_path):
    store = JobStore(tmp_path)
    jobs = [_job(store, "completed") for _ in range(5)]  # same created_at
    jobs[0].progress = 50
    store.save(jobs[0])  # an update keeps its place
    ids = [j.id for j in jobs]
    assert [j.id for j in store.list(order="asc")] == ids
    assert [j.id for j in store.list(order="desc")] == ids[::-1]
    assert [j.id for j in store.list(order="asc", after=ids[1], limit=2)] == ids[2:4]
    assert [j.id for j in store.list(order="desc", after=ids[3])] == ids[2::-1]
    with pytest.raises(JobNotFound):
        store.list(after="video_" + "0" * 24)


def test_reopening_fails_interrupted_jobs_and_keeps_finished_ones(tmp_path):
    store = JobStore(tmp_path)
    done, running, queued = _job(store, "completed"), _job(store, "in_progress"), _job(store)
    store.write_output(done.id, "video.mp4", b"mp4")
    store.write_output(running.id, "codes.npy", b"partial")
    store.close()
    again = JobStore(tmp_path)
    assert again.get(done.id).status == "completed"
    assert again.output(done.id, "video.mp4").read_bytes() == b"mp4"
    for job in (running, queued):
        got = again.get(job.id)
        assert got.status == "failed" and got.error == {"code": "server_restarted", "message": RESTART_ERROR}
    assert not (tmp_path / "videos" / running.id).exists()
    again.delete(done.id)
    assert not (tmp_path / "videos" / done.id).exists()
    with pytest.raises(JobNotFound):
        again.get(done.id)


@pytest.mark.parametrize("bad", ["", "../x", "video_../../etc", "video_" + "g" * 24, "file-abc"])
def test_ids_never_become_paths(tmp_path, bad):
    store = JobStore(tmp_path)
    with pytest.raises(JobNotFound):
        store.get(bad)
    with pytest.raises(JobNotFound):
        store.output(bad, "video.mp4")
