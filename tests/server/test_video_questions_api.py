"""POST /v1/video/questions (multipart, for curl users) and the issue's acceptance check:
a video question through the API yields the tokens of the reference layout built by hand."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from PIL import Image

from lwm_serve.model.generation import PromptRow, seed_key
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.schemas.video import VideoAnswer, VideoAnswerChunk
from lwm_serve.tokenizers.chat_template import chat_prompt
from lwm_serve.tokenizers.frame_sampling import SamplingSpec, select_frames
from lwm_serve.tokenizers.media_decode import preprocess_frames
from lwm_serve.tokenizers.vision_layout import frame_tokens

QUESTION = "What is happening in this video?"
MAX_NEW = 6


@pytest.fixture(scope="module")
def server(launch, vision_runtime):
    srv = launch(vision_runtime)
    yield srv
    srv.stop()


def _post(server, auth_headers, fields: dict, upload=None, **kwargs) -> httpx.Response:
    """Multipart with the upload, url-encoded without one (curl -F / curl -d)."""
    files = {"file": upload} if upload is not None else None
    return httpx.post(f"{server.base_url}/v1/video/questions", data=fields, files=files, headers=auth_headers,
                      timeout=300, **kwargs)


def _events(lines) -> list[tuple[str, str]]:
    """(event name or 'message', data) per SSE event."""
    out, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((name, line[len("data: "):]))
            name = "message"
        else:
            assert line == "" or line.startswith(":"), line
    return out


def test_upload_and_ask_returns_the_answer_with_frames_and_usage(server, auth_headers, server_media, find_leftovers,
                                                                 media_kit):
    clip = server_media / "h264.mp4"  # 10 frames at 10 fps
    r = _post(server, auth_headers, {"question": QUESTION, "max_frames": "3", "max_tokens": str(MAX_NEW),
                                     "temperature": "0"}, ("clip.mp4", clip.read_bytes(), "video/mp4"))
    assert r.status_code == 200, r.text
    answer = VideoAnswer.model_validate(r.json())
    times = [i / 10 for i in range(10)]
    expected = [times[i] for i in select_frames(times, SamplingSpec(max_frames=3))]
    assert [f.timestamp for f in answer.media.frames] == pytest.approx(expected, abs=1e-6)
    assert answer.usage.frames == 3 and answer.usage.vision_tokens == 3 * 257
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.media.kind == "video" and not answer.media.cached and answer.media.file_id is None
    assert answer.media.sampling.max_frames == 3
    # Not stored: no file listed, no temp file left.
    assert httpx.get(f"{server.base_url}/v1/files", headers=auth_headers).json()["data"] == []
    assert find_leftovers(server.data_dir) == []


def test_store_keeps_the_upload_and_file_id_reuses_it_from_the_cache(server, auth_headers, server_media):
    clip = server_media / "vp9.webm"
    fields = {"question": QUESTION, "max_frames": "2", "max_tokens": str(MAX_NEW), "temperature": "0"}
    first = _post(server, auth_headers, {**fields, "store": "true"}, ("clip.webm", clip.read_bytes()))
    assert first.status_code == 200, first.text
    file_id = first.json()["media"]["file_id"]
    listed = httpx.get(f"{server.base_url}/v1/files/{file_id}", headers=auth_headers).json()
    assert listed["filename"] == "clip.webm" and listed["bytes"] == clip.stat().st_size
    encoded = server.services.vision.stats.frames_encoded
    # url-encoded form (curl -d), no upload: the stored file, from the code cache.
    again = _post(server, auth_headers, {**fields, "file_id": file_id})
    assert again.status_code == 200, again.text
    assert again.json()["media"]["cached"] and server.services.vision.stats.frames_encoded == encoded
    assert again.json()["answer"] == first.json()["answer"]


def test_stream_sends_progress_then_deltas_then_done(server, auth_headers, server_media):
    image = server_media / "image.jpg"
    fields = {"question": "Describe the picture.", "max_tokens": str(MAX_NEW), "temperature": "0"}
    plain = _post(server, auth_headers, fields, ("p.jpg", image.read_bytes()))
    assert plain.status_code == 200, plain.text
    with httpx.stream("POST", f"{server.base_url}/v1/video/questions", data={**fields, "stream": "true"},
                      files={"file": ("p.jpg", image.read_bytes())}, headers=auth_headers, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(list(r.iter_lines()))
    assert events[-1] == ("message", "[DONE]")
    progress = [json.loads(d) for name, d in events if name == "progress"]
    chunks = [VideoAnswerChunk.model_validate_json(d) for name, d in events[:-1] if name == "message"]
    stages = [p["stage"] for p in progress]
    assert stages[0] in ("decode", "cached") and stages[-1] == "first_token"
    # prefill progress comes from the prefill's own chunks, all before the first token
    prefill = [p for p in progress if p["stage"] == "prefill" and "chunks_total" in p]
    assert prefill and prefill[-1]["done"] == prefill[-1]["total"] == plain.json()["usage"]["prompt_tokens"]
    assert prefill[-1]["chunks_done"] == prefill[-1]["chunks_total"] == len(prefill)
    first_chunk = next(i for i, (name, _) in enumerate(events) if name == "message")
    assert all(name == "progress" for name, _ in events[:first_chunk])
    assert "".join(c.delta for c in chunks) == plain.json()["answer"]
    assert chunks[-1].finish_reason == plain.json()["finish_reason"]
    assert chunks[-1].usage == VideoAnswer.model_validate(plain.json()).usage
    assert chunks[-1].media.kind == "image" and [f.timestamp for f in chunks[-1].media.frames] == [0.0]


def test_ingest_reports_its_stage_seconds_and_feeds_the_metrics(server, auth_headers, server_media, read_metrics):
    clip = server_media / "h264.mp4"
    fields = {"question": QUESTION, "max_frames": "2", "max_tokens": "2", "temperature": "0", "stream": "true"}
    frames_metric = ("lwm:video_frames_ingested_total", ())
    count_metric = ("lwm:video_ingest_seconds_count", ())
    sum_metric = ("lwm:video_ingest_seconds_sum", ())
    before = read_metrics(server.base_url)

    def ask() -> list[dict]:
        with httpx.stream("POST", f"{server.base_url}/v1/video/questions", data=fields,
                          files={"file": ("clip.mp4", clip.read_bytes(), "video/mp4")}, headers=auth_headers,
                          timeout=300) as r:
            assert r.status_code == 200
            return [json.loads(d) for name, d in _events(list(r.iter_lines())) if name == "progress"]

    progress = ask()
    (done,) = [p for p in progress if p["stage"] == "ingested"]
    stages = [p["stage"] for p in progress]
    assert stages.index("ingested") > max(i for i, s in enumerate(stages) if s == "encode")
    assert done["done"] == done["total"] == 2 and set(done["seconds"]) == {"decode", "preprocess", "vqgan", "total"}
    parts = done["seconds"]["decode"] + done["seconds"]["preprocess"] + done["seconds"]["vqgan"]
    assert parts <= done["seconds"]["total"] + 0.01 and min(done["seconds"].values()) >= 0
    after = read_metrics(server.base_url)
    assert after[frames_metric] - before.get(frames_metric, 0) == 2
    assert after[count_metric] - before.get(count_metric, 0) == 1
    assert after[sum_metric] - before.get(sum_metric, 0) == pytest.approx(done["seconds"]["total"], abs=0.05)

    again = ask()  # the same video and sampling: codes from the cache, nothing ingested
    assert [p["stage"] for p in again][0] == "cached" and "ingested" not in [p["stage"] for p in again]
    final = read_metrics(server.base_url)
    assert final[frames_metric] == after[frames_metric] and final[count_metric] == after[count_metric]


@pytest.mark.parametrize("fields, upload, status, param, says", [
    ({"max_tokens": "2"}, "h264.mp4", 400, "question", "'question' is a required property"),
    ({"question": "q"}, None, 400, "file", "'file'"),
    ({"question": "q", "file_id": "file-000000000000000000000000"}, "h264.mp4", 400, "file_id", "not both"),
    ({"question": "q", "file_id": "file-000000000000000000000000"}, None, 404, "file_id", "No such file"),
    ({"question": "q", "fps": "-1"}, "h264.mp4", 400, "fps", "positive number"),
    ({"question": "q", "max_frames": "2.5"}, "h264.mp4", 400, "max_frames", "positive integer"),
    ({"question": "q", "start": "3", "end": "1"}, "h264.mp4", 400, None, "before start"),
    ({"question": "q", "start": "50"}, "h264.mp4", 400, "file", "picks no frame"),
    ({"question": "q"}, "audio.m4a", 400, "file", "no video stream"),
    ({"question": "q"}, "truncated.mp4", 400, "file", "truncated or damaged"),
    ({"question": "q"}, "empty.mp4", 400, "file", "empty"),
    ({"question": "q"}, "notes.txt", 415, "file", "not a recognised image or video format"),
])
def test_bad_questions_are_clear_4xx_and_leave_nothing(server, auth_headers, server_media, validate, find_leftovers,
                                                       fields, upload, status, param, says):
    listed = httpx.get(f"{server.base_url}/v1/files", headers=auth_headers).json()["data"]
    up = (upload, (server_media / upload).read_bytes()) if upload else None
    r = _post(server, auth_headers, {**fields, "store": "true"} if up else fields, up)
    assert r.status_code == status, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"], r.json()
    assert str(server.data_dir) not in r.json()["error"]["message"]
    assert find_leftovers(server.data_dir) == []
    assert httpx.get(f"{server.base_url}/v1/files", headers=auth_headers).json()["data"] == listed  # not kept
    assert httpx.get(f"{server.base_url}/ready").status_code == 200


def test_plan_tells_the_frame_budget_before_asking(server, auth_headers, server_media, fixture_runtime):
    clip = server_media / "h264.mp4"  # 10 frames, 1 s
    file_id = httpx.post(f"{server.base_url}/v1/files", files={"file": ("c.mp4", clip.read_bytes())},
                         data={"purpose": "user_data"}, headers=auth_headers).json()["id"]
    body = {"file_id": file_id, "question": QUESTION, "max_tokens": MAX_NEW}
    too_many = httpx.post(f"{server.base_url}/v1/video/plan", json={**body, "max_frames": 4}, headers=auth_headers)
    assert too_many.status_code == 200, too_many.text
    plan = too_many.json()
    assert plan["frames"] == 4 and plan["vision_tokens"] == 4 * 257 and not plan["fits"]
    assert plan["context"] == fixture_runtime.generator.context_limit and plan["duration_s"] == pytest.approx(1.0)
    suggested = plan["suggested_max_frames"]
    assert plan["prompt_tokens"] - 257 * (4 - suggested) + MAX_NEW <= plan["context"]
    fitting = httpx.post(f"{server.base_url}/v1/video/plan", json={**body, "max_frames": suggested},
                         headers=auth_headers).json()
    assert fitting["fits"] and fitting["frames"] == suggested and fitting["suggested_max_frames"] is None
    asked = _post(server, auth_headers, {"question": QUESTION, "file_id": file_id, "max_frames": str(suggested),
                                         "max_tokens": str(MAX_NEW), "temperature": "0"})
    assert asked.status_code == 200, asked.text
    assert asked.json()["usage"]["prompt_tokens"] == fitting["prompt_tokens"]  # the estimate was exact
    assert asked.json()["usage"]["frames"] == suggested


def test_no_vqgan_means_a_clear_400(live, auth_headers, validate):
    r = httpx.post(f"{live.base_url}/v1/video/questions", data={"question": "q"}, files={"file": ("a", b"abc")},
                   headers=auth_headers)
    assert r.status_code == 400 and "without a VQGAN (--vqgan)" in r.json()["error"]["message"]
    validate("ErrorResponse", r.json())


@pytest.mark.parametrize("layout", ["standard", "vision_chat"])
def test_fixture_video_question_equals_the_reference_layout_built_by_hand(make_server, vision_runtime, auth_headers,
                                                                          server_media, reference_dir, layout):
    """The issue's acceptance: a lossless clip of the reference's video_frame0..4 with
    max_frames=3 through the API gives exactly the prompt and the greedy tokens of
    `chat_prompt` over the VQGAN codes of the preprocessed frames [0, 2, 4]."""
    case = reference_dir / "cases" / "vqgan"
    chosen = json.loads((case / "case.json").read_text())["video_frame_ids_chosen"]
    frames = [np.asarray(Image.open(case / f"video_frame{i}.png").convert("RGB")) for i in chosen]
    vq, tok = vision_runtime.vqgan, vision_runtime.tokenizer
    codes = vq.encode_frames(preprocess_frames(frames, vq.cfg.resolution))
    prompt = chat_prompt(tok, QUESTION, (codes,), layout=layout)
    direct = vision_runtime.generator.generate([PromptRow(prompt.ids, prompt.vision_mask)],
                                               SamplingParams(temperature=0), max_new_tokens=MAX_NEW, key=seed_key(0),
                                               stop_token_ids=[tok.eos_id])[0]
    if layout == "vision_chat":  # what the reference's vision_chat really feeds for this video
        with np.load(case / "data.npz") as data:
            assert frame_tokens(codes, layout=layout) == data["video_path_tokens"].tolist()

    server = make_server(vision_runtime, frame_layout=layout)
    submitted = []
    submit = server.engine.submit
    server.engine.submit = lambda request: submitted.append(request) or submit(request)  # record the prompt row
    r = _post(server, auth_headers, {"question": QUESTION, "max_frames": "3", "max_tokens": str(MAX_NEW),
                                     "temperature": "0"}, ("clip.mov", (server_media / "fixture_clip.mov").read_bytes()))
    assert r.status_code == 200, r.text
    row = submitted[-1].rows[0]
    assert list(row.ids) == prompt.ids and [bool(m) for m in row.vision_mask] == prompt.vision_mask
    assert r.json()["answer"] == tok.decode(direct, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == len(direct)
    assert r.json()["usage"]["vision_tokens"] == len(chosen) * 257
