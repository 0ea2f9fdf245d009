"""The /v1/videos job protocol through the official `openai` client against uvicorn on 127.0.0.1.

The fixture model draws the reference's 2-frame video for the fixture seed
(`key_source: "reference"`); jobs and their files survive a restart; every body
is checked against OpenAI's VideoResource schemas.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time

import av
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from openai.types import Video

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks the Sora API deprecated

PROMPT = "Fireworks over the city"


@pytest.fixture(scope="module")
def server(launch, vision_runtime):
    s = launch(vision_runtime)
    yield s
    s.stop()


def _client(server, auth_headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=auth_headers["Authorization"][7:], max_retries=0)


@pytest.fixture(scope="module")
def client(server, auth_headers) -> openai.OpenAI:
    return _client(server, auth_headers)


def _extend(client: openai.OpenAI, **body) -> Video:
    """POST /videos/extensions with a video *reference* through the SDK's client: this SDK
    version's `videos.extend` accepts only an upload for `video` (it refuses {"id": ...})."""
    return client.post("/videos/extensions", body=body, cast_to=Video)


def _wait(client: openai.OpenAI, video_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = json.loads(client.videos.with_raw_response.retrieve(video_id).text)
        if body["status"] in ("completed", "failed"):
            return body
        time.sleep(0.1)
    raise TimeoutError(video_id)


def _frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def _codes(server, video_id: str) -> np.ndarray:
    return np.load(server.data_dir / "jobs" / "videos" / video_id / "codes.npy")


@pytest.fixture(scope="module")
def reference_video(client, server, reference_dir, validate):
    """The fixture's 2-frame video, drawn through the API with the reference's seed and knobs."""
    case = json.loads((reference_dir / "cases" / "generate_video_2frames" / "case.json").read_text())
    flags = case["flags"]
    extras = {"n_frames": flags["n_frames"], "seed": flags["seed"], "key_source": "reference"}
    for knob in ("cfg_scale", "temperature", "top_k"):
        for kind in ("image", "video"):
            extras[f"{knob}_{kind}"] = flags[f"{knob}_{kind}"]
    created = json.loads(client.videos.with_raw_response.create(prompt=flags["prompt"], extra_body=extras).text)
    validate("VideoResource", created)
    assert created["status"] in ("queued", "in_progress") and created["seconds"] == "0.5"
    done = _wait(client, created["id"])
    validate("VideoResource", done)
    return case, done


def test_video_equals_reference_draw(reference_video, server, client, reference_dir):
    case, done = reference_video
    assert done["status"] == "completed" and done["progress"] == 100 and done["size"] == "256x256"
    np.testing.assert_array_equal(_codes(server, done["id"]).reshape(2, 256), np.asarray(case["video_frames_codes"]))
    d = np.load(reference_dir / "cases" / "generate_video_2frames" / "data.npz")
    np.testing.assert_array_equal(_codes(server, done["id"]), d["video_codes"].reshape(2, 16, 16))
    frames = _frames(client.videos.download_content(done["id"]).read())
    assert len(frames) == 2 and frames[0].shape == (256, 256, 3)
    thumb = Image.open(io.BytesIO(client.videos.download_content(done["id"], variant="thumbnail").read()))
    assert thumb.format == "WEBP" and thumb.size == (256, 256)


def test_extend_a_completed_video(reference_video, client, server, validate):
    _, done = reference_video
    ext = _extend(client, prompt=PROMPT, seconds="4", video={"id": done["id"]}, n_frames=1, seed=5).model_dump()
    validate("VideoResource", ext)
    finished = _wait(client, ext["id"])
    assert finished["status"] == "completed", finished
    assert finished["remixed_from_video_id"] == done["id"] and finished["seconds"] == "0.75"
    codes = _codes(server, ext["id"])
    assert codes.shape == (3, 16, 16)
    np.testing.assert_array_equal(codes[:2], _codes(server, done["id"]))
    assert len(_frames(client.videos.download_content(ext["id"]).read())) == 3


def test_extend_an_uploaded_clip(client, server, media_kit, tmp_path):
    path = media_kit.write_video(tmp_path / "clip.mp4", 5, fps=10)  # 0.5 s: 2 frames at 4 fps
    clip = client.files.create(file=("clip.mp4", path.read_bytes()), purpose="user_data")
    ext = _extend(client, prompt="the shapes move on", seconds="4", video={"id": clip.id}, n_frames=1, seed=1)
    finished = _wait(client, ext.id)
    assert finished["status"] == "completed", finished
    # The clip sampled at the generated videos' 4 fps (VQGAN-encoded), then 1 new frame.
    assert finished["remixed_from_video_id"] is None and finished["seconds"] == "0.75"
    codes = _codes(server, ext.id)
    assert len(codes) == 2 + 1
    from lwm_serve.tokenizers.frame_sampling import SamplingSpec
    from lwm_serve.tokenizers.media_ingest import encode_media

    clip_codes, _ = encode_media(path, SamplingSpec(max_frames=None, fps=4), server.services.vision.vqgan)
    np.testing.assert_array_equal(codes[:2], clip_codes)
    assert len(_frames(client.videos.download_content(ext.id).read())) == 3
    # The clip itself as the multipart `video` (the SDK's extend() upload form), same seed: same video.
    again = client.videos.extend(prompt="the shapes move on", seconds="4", video=("clip.mp4", path.read_bytes()),
                                 extra_body={"n_frames": 1, "seed": 1})
    assert _wait(client, again.id)["status"] == "completed"
    np.testing.assert_array_equal(_codes(server, again.id), codes)


def test_create_multipart_with_reference_image_list_delete(client, server, server_media, validate, auth_headers):
    image = (server_media / "image.png").read_bytes()
    created = client.videos.create(prompt="a calm sea", input_reference=("ref.png", image, "image/png"),
                                   size="128x128", extra_body={"n_frames": 2, "seed": 2})
    done = _wait(client, created.id)
    assert done["status"] == "completed" and done["size"] == "128x128", done
    frames = _frames(client.videos.download_content(created.id).read())
    assert len(frames) == 2 and frames[0].shape == (128, 128, 3)
    # The first frame is the reference image's codes.
    from lwm_serve.tokenizers.frame_sampling import SamplingSpec
    from lwm_serve.tokenizers.media_ingest import encode_media

    ref_codes, _ = encode_media(image, SamplingSpec(max_frames=1), server.services.vision.vqgan)
    np.testing.assert_array_equal(_codes(server, created.id)[0], ref_codes[0])

    page = json.loads(client.videos.with_raw_response.list(limit=1, order="desc").text)
    validate("VideoListResource", page)
    assert page["data"][0]["id"] == created.id and page["has_more"] is True
    ids = [v.id for v in client.videos.list(order="asc", limit=100)]
    assert created.id in ids

    deleted = json.loads(client.videos.with_raw_response.delete(created.id).text)
    validate("DeletedVideoResource", deleted)
    assert deleted == {"object": "video.deleted", "deleted": True, "id": created.id}
    assert not (server.data_dir / "jobs" / "videos" / created.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)


def test_json_body_with_reference_by_file_id(client, server, server_media, auth_headers):
    ref = client.files.create(file=("ref.png", (server_media / "image.png").read_bytes()), purpose="vision")
    resp = httpx.post(f"{server.base_url}/v1/videos", headers=auth_headers, timeout=60, json={
        "prompt": "a calm sea", "n_frames": 1, "input_reference": {"file_id": ref.id}})
    assert resp.status_code == 200, resp.text
    done = _wait(client, resp.json()["id"])
    assert done["status"] == "completed" and len(_codes(server, done["id"])) == 1


@pytest.mark.parametrize("body,param,status", [
    ({"prompt": ""}, "prompt", 400),
    ({"prompt": "   ", "n_frames": 1}, "prompt", 400),
    ({"prompt": "x", "seconds": "5"}, "seconds", 400),
    ({"prompt": "x", "size": "720x1280"}, "size", 400),
    ({"prompt": "x", "n_frames": 40}, "n_frames", 400),   # 40 x 257 tokens exceed the 1024-token context
    ({"prompt": "x", "seconds": "4"}, "n_frames", 400),   # 16 frames do not fit either
    ({"prompt": "x", "n_frames": 0}, "n_frames", 400),
    ({"prompt": "x", "n_frames": 1, "input_reference": {"file_id": "file-000000000000000000000000"}},
     "input_reference", 404),
    ({"prompt": "x", "n_frames": 1, "input_reference": {"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
     "input_reference", 415),
])
def test_bad_creates_are_clear_4xx_and_store_nothing(server, auth_headers, validate, body, param, status):
    before = list((server.data_dir / "jobs" / "videos").iterdir())
    count = len(server.services.videos.store.list())
    resp = httpx.post(f"{server.base_url}/v1/videos", json=body, headers=auth_headers, timeout=60)
    assert resp.status_code == status, resp.text
    validate("ErrorResponse", resp.json())
    assert resp.json()["error"]["param"] == param
    assert len(server.services.videos.store.list()) == count
    assert list((server.data_dir / "jobs" / "videos").iterdir()) == before


def test_bad_extensions_and_unknown_ids(client, server, server_media, auth_headers, find_leftovers):
    count = len(server.services.videos.store.list())
    notes = client.files.create(file=("notes.txt", (server_media / "notes.txt").read_bytes()), purpose="user_data")
    with pytest.raises(openai.APIStatusError) as err:
        _extend(client, prompt="go on", seconds="4", video={"id": notes.id}, n_frames=1)
    assert err.value.status_code in (400, 415) and err.value.body["param"] == "video"
    with pytest.raises(openai.APIStatusError) as err:  # a non-video upload in the form itself
        client.videos.extend(prompt="go on", seconds="4", video=("notes.txt", b"plainly not a video" * 10),
                             extra_body={"n_frames": 1})
    assert err.value.status_code in (400, 415)
    with pytest.raises(openai.NotFoundError):
        _extend(client, prompt="go on", seconds="4", video={"id": "video_" + "0" * 24})
    with pytest.raises(openai.BadRequestError) as err:
        _extend(client, prompt="go on", seconds="7", video={"id": notes.id})
    assert err.value.body["param"] == "seconds"
    assert len(server.services.videos.store.list()) == count
    assert find_leftovers(server.data_dir) == []
    for call in (lambda: client.videos.retrieve("video_nope"), lambda: client.videos.delete("video_" + "1" * 24),
                 lambda: client.videos.download_content("../../etc/passwd")):
        with pytest.raises(openai.NotFoundError):
            call()
    resp = httpx.get(f"{server.base_url}/v1/videos/video_x/content", params={"variant": "spritesheet"},
                     headers=auth_headers)
    assert resp.status_code == 404


def test_restart_keeps_completed_fails_running(launch, vision_runtime, auth_headers, tmp_path):
    """A completed video stays downloadable after a restart; one running when the server
    stopped is failed with a message saying why; deleting it removes its files."""
    gate = threading.Event()
    gate.set()
    hooked = dataclasses.replace(vision_runtime, step_hook=lambda: gate.wait(60))
    first = launch(hooked, data_dir=tmp_path)
    try:
        client = _client(first, auth_headers)
        done = client.videos.create(prompt="a kite", extra_body={"n_frames": 1, "seed": 4})
        assert _wait(client, done.id)["status"] == "completed"
        mp4 = client.videos.download_content(done.id).read()
        gate.clear()  # the worker stops before its next step: the next job stays in progress
        running = client.videos.create(prompt="a storm", extra_body={"n_frames": 2})
        doomed = client.videos.create(prompt="a flood", extra_body={"n_frames": 2})
        deadline = time.monotonic() + 60
        while {client.videos.retrieve(v.id).status for v in (running, doomed)} != {"in_progress"}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Deleting a running job stops its engine request and leaves nothing behind.
        aborted = first.engine.stats().aborted_total
        assert client.videos.delete(doomed.id).deleted
        assert not (tmp_path / "jobs" / "videos" / doomed.id).exists()
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(doomed.id)
        gate.set()
        while first.engine.stats().aborted_total == aborted:
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        gate.clear()
    finally:
        gate.set()
        first.stop()
    second = launch(vision_runtime, data_dir=tmp_path)
    try:
        client = _client(second, auth_headers)
        assert client.videos.retrieve(done.id).status == "completed"
        assert client.videos.download_content(done.id).read() == mp4
        failed = client.videos.retrieve(running.id)
        assert failed.status == "failed" and failed.error.code == "server_restarted"
        assert "restarted" in failed.error.message
        with pytest.raises(openai.BadRequestError):
            client.videos.download_content(running.id)
        client.videos.delete(done.id)
        assert not (tmp_path / "jobs" / "videos" / done.id).exists()
        assert {v.id for v in client.videos.list()} == {running.id}
    finally:
        second.stop()
