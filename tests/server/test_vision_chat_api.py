"""Images and video in /v1/chat/completions: real media through the real server.

Expected prompts are built by hand (frames decoded and VQGAN-encoded here, then
`chat_prompt`) and generated directly, so the API must splice exactly those
tokens. Bad media must give a clear OpenAI-shaped 4xx, leave no temp file, and
leave the server serving.
"""

from __future__ import annotations

import functools
import http.server
import re
import tempfile
import threading

import httpx
import openai
import pytest

from lwm_serve.model.generation import PromptRow, seed_key
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.tokenizers.chat_template import chat_prompt
from lwm_serve.tokenizers.frame_sampling import SamplingSpec
from lwm_serve.tokenizers.media_decode import decode_media, preprocess_frames

QUESTION = "What is happening in this video?"
MAX_NEW = 4


@pytest.fixture(scope="module")
def temp_root(tmp_path_factory):
    """The process's tempfile folder, pointed at an empty dir for this module (checked for leftovers)."""
    root = tmp_path_factory.mktemp("process-tmp")
    old, tempfile.tempdir = tempfile.tempdir, str(root)
    yield root
    tempfile.tempdir = old


@pytest.fixture(scope="module")
def server(launch, vision_runtime, temp_root):
    srv = launch(vision_runtime, media_url_allowlist=["127.0.0.1"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server, auth_headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=auth_headers["Authorization"][7:],
                         max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def media_http(server_media):
    """A local http server over the test media (an allowlisted 'remote' host)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(server_media))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _upload(client, path) -> str:
    return client.files.create(file=(path.name, path.read_bytes()), purpose="user_data").id


def _expected(runtime, src, spec: SamplingSpec, question: str = QUESTION, layout: str = "standard"):
    """(prompt, greedy tokens) built by hand from the media."""
    frames = [f for _, f in decode_media(src, spec)]
    codes = runtime.vqgan.encode_frames(preprocess_frames(frames, runtime.vqgan.cfg.resolution))
    prompt = chat_prompt(runtime.tokenizer, question, (codes,), layout=layout)
    tokens = runtime.generator.generate([PromptRow(prompt.ids, prompt.vision_mask)], SamplingParams(temperature=0),
                                        max_new_tokens=MAX_NEW, key=seed_key(0),
                                        stop_token_ids=[runtime.tokenizer.eos_id])[0]
    return prompt, tokens


def _ask(client, part: dict, question: str = QUESTION, **kwargs):
    return client.chat.completions.create(
        model="lwm-fixture", messages=[{"role": "user", "content": [{"type": "text", "text": question}, part]}],
        max_tokens=MAX_NEW, temperature=0, **kwargs)


def _check_clean(server, temp_root, find_leftovers):
    assert find_leftovers(server.data_dir) == []
    assert list(temp_root.iterdir()) == []
    assert httpx.get(f"{server.base_url}/ready", timeout=30).status_code == 200


def test_image_by_data_url_and_by_file_id_equals_direct_generation(client, server, vision_runtime, server_media,
                                                                   make_data_url, validate):
    png = server_media / "image.png"
    prompt, tokens = _expected(vision_runtime, png, SamplingSpec())
    text = vision_runtime.tokenizer.decode(tokens, skip_special_tokens=True)
    by_url = _ask(client, {"type": "image_url", "image_url": {"url": make_data_url(png, "image/png")}})
    assert by_url.choices[0].message.content == text
    assert by_url.usage.prompt_tokens == len(prompt.ids) and by_url.usage.completion_tokens == len(tokens)
    by_id = _ask(client, {"type": "image_url", "image_url": {"url": _upload(client, png)}})
    assert by_id.choices[0].message.content == text and by_id.usage.prompt_tokens == len(prompt.ids)
    by_file_part = _ask(client, {"type": "file", "file": {"file_id": _upload(client, png)}})
    assert by_file_part.choices[0].message.content == text


@pytest.mark.parametrize("part_extras, inner_extras, spec", [
    ({}, {"fps": 5, "max_frames": 3}, SamplingSpec(fps=5, max_frames=3)),
    ({"max_frames": 2}, {}, SamplingSpec(max_frames=2)),
    ({"start": 0.3, "end": 0.8}, {"max_frames": 2}, SamplingSpec(max_frames=2, start=0.3, end=0.8)),
])
def test_video_by_file_id_with_sampling_extras_equals_direct_generation(client, vision_runtime, server_media,
                                                                        part_extras, inner_extras, spec):
    clip = server_media / "h264.mp4"
    prompt, tokens = _expected(vision_runtime, clip, spec)
    part = {"type": "video_url", "video_url": {"url": _upload(client, clip), **inner_extras}, **part_extras}
    resp = _ask(client, part)
    assert resp.choices[0].message.content == vision_runtime.tokenizer.decode(tokens, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(prompt.ids)


def test_media_follow_their_message_text_in_part_order(client, vision_runtime, server_media, make_data_url):
    """The documented rule: a user message's text parts form its question; its media
    follow that text in the order the parts appear."""
    png, clip = server_media / "image.png", server_media / "h264.mp4"
    vq, tok = vision_runtime.vqgan, vision_runtime.tokenizer
    codes = [vq.encode_frames(preprocess_frames([f for _, f in decode_media(src, spec)], vq.cfg.resolution))
             for src, spec in ((png, SamplingSpec()), (clip, SamplingSpec(max_frames=1)))]
    prompt = chat_prompt(tok, "Compare\nthese two.", codes)
    direct = vision_runtime.generator.generate([PromptRow(prompt.ids, prompt.vision_mask)],
                                               SamplingParams(temperature=0), max_new_tokens=MAX_NEW, key=seed_key(0),
                                               stop_token_ids=[tok.eos_id])[0]
    resp = client.chat.completions.create(model="lwm-fixture", max_tokens=MAX_NEW, temperature=0, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": make_data_url(png, "image/png")}},
            {"type": "text", "text": "Compare"},
            {"type": "video_url", "video_url": {"url": make_data_url(clip, "video/mp4"), "max_frames": 1}},
            {"type": "text", "text": "these two."}]}])
    assert resp.usage.prompt_tokens == len(prompt.ids)
    assert resp.choices[0].message.content == tok.decode(direct, skip_special_tokens=True)


def test_asking_again_or_uploading_again_decodes_and_encodes_nothing(client, server, server_media):
    clip = server_media / "vp9.webm"
    part = {"type": "video_url", "video_url": {"url": _upload(client, clip), "max_frames": 2}}
    first = _ask(client, part)
    stats = server.services.vision.stats
    encoded, decoded, hits = stats.frames_encoded, stats.frames_decoded, stats.cache_hits
    again = _ask(client, part)
    reuploaded = _ask(client, {"type": "video_url", "video_url": {"url": _upload(client, clip), "max_frames": 2}})
    assert (stats.frames_encoded, stats.frames_decoded) == (encoded, decoded)
    assert stats.cache_hits == hits + 2
    assert again.choices[0].message.content == reuploaded.choices[0].message.content == first.choices[0].message.content


def test_streaming_chat_reports_ingestion_progress_as_comments(client, server, auth_headers, server_media,
                                                               make_data_url, validate):
    part = {"type": "video_url", "video_url": {"url": make_data_url(server_media / "rotated.mp4"), "max_frames": 2}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}, part]}],
            "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers,
                      timeout=300) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert all(line.startswith(": progress stage=") for line in comments)
    assert {"decode", "encode", "prefill"} <= {re.search(r"stage=(\w+)", c).group(1) for c in comments}
    assert max(i for i, line in enumerate(lines) if line.startswith(":")) < first_data
    assert lines[-1] == "data: [DONE]"
    # The official client ignores the comments; the text equals the non-streamed answer (now cached).
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(client, part, stream=True) if c.choices)
    assert streamed == _ask(client, part).choices[0].message.content


GOOD = ["h264.mp4", "vp9.webm", "rotated.mp4", "image.png", "image.jpg", "image.gif"]
BAD = [  # file, status, code, fragments of the message
    ("audio.m4a", 400, "no_video_stream", ("no video stream", "audio")),
    ("truncated.mp4", 400, "corrupt_media", ("truncated or damaged",)),
    ("notes.txt", 415, "unsupported_media_type", ("not a recognised image or video format",)),
]


@pytest.mark.parametrize("name", GOOD)
def test_good_media_are_answered(client, server, server_media, temp_root, find_leftovers, name):
    part = {"type": "video_url", "video_url": {"url": _upload(client, server_media / name), "max_frames": 2}}
    assert _ask(client, part).usage.completion_tokens >= 1
    _check_clean(server, temp_root, find_leftovers)


@pytest.mark.parametrize("name, status, code, says", BAD)
@pytest.mark.parametrize("how", ["file_id", "data_url"])
def test_bad_media_are_clear_4xx_and_leave_nothing(client, server, auth_headers, server_media, make_data_url, validate,
                                                   temp_root, find_leftovers, name, status, code, says, how):
    path = server_media / name
    url = _upload(client, path) if how == "file_id" else make_data_url(path)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "video_url", "video_url": {"url": url}}]}],
            "max_tokens": 2}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=120)
    assert r.status_code == status, r.text
    validate("ErrorResponse", r.json())
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == "messages[0].content[1]"
    assert all(s in err["message"] for s in says), err["message"]
    assert str(server.data_dir) not in err["message"]  # names the file id / data URL, never server paths
    assert (url if how == "file_id" else "data URL") in err["message"]
    _check_clean(server, temp_root, find_leftovers)


def test_zero_byte_media_is_400(server, auth_headers, validate, temp_root, find_leftovers):
    body = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}}]}], "max_tokens": 2}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=60)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    validate("ErrorResponse", r.json())
    _check_clean(server, temp_root, find_leftovers)


def test_remote_urls_need_the_allowlist(client, server, auth_headers, media_http, validate, temp_root,
                                        find_leftovers):
    def ask(url: str) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2}
        return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=120)

    refused = ask("https://example.com/clip.mp4")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "url_not_allowed"
    assert "media_url_allowlist" in refused.json()["error"]["message"]
    validate("ErrorResponse", refused.json())
    assert ask(f"{media_http}/image.png").status_code == 200  # 127.0.0.1 is on this server's allowlist
    missing = ask(f"{media_http}/nothing-here.mp4")
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "media_fetch_failed"
    assert "404" in missing.json()["error"]["message"]
    bad = ask(f"{media_http}/audio.m4a")
    assert bad.status_code == 400 and "no video stream" in bad.json()["error"]["message"]
    _check_clean(server, temp_root, find_leftovers)


def test_frame_budget_refuses_with_numbers_and_a_sampling_that_fits(client, server, auth_headers, server_media,
                                                                    validate, fixture_runtime):
    fid = _upload(client, server_media / "h264.mp4")  # 10 frames: 4 x 257 do not fit in 1024 with the text
    context = fixture_runtime.generator.context_limit

    def ask(video_url: dict, **extra) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                          {"type": "video_url", "video_url": video_url}]}],
                "max_tokens": MAX_NEW, "temperature": 0, **extra}
        return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=300)

    r = ask({"url": fid, "max_frames": 4})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages[0].content[1]"
    assert f"context is {context} tokens" in err["message"] and "4 frames x 257 = 1028" in err["message"]
    suggested = int(re.search(r"max_frames=(\d+)", err["message"]).group(1))
    assert 1 <= suggested < 4
    fits = ask({"url": fid, "max_frames": suggested})
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] + MAX_NEW <= context
    validate("CreateChatCompletionResponse", fits.json())
    for video_url, extra in [({"url": fid, "max_frames": 4}, {"auto_fps": True}),
                             ({"url": fid, "fps": 10, "auto_fps": True}, {})]:
        auto = ask(video_url, **extra)
        assert auto.status_code == 200, auto.text
        usage = auto.json()["usage"]
        assert usage["prompt_tokens"] + MAX_NEW <= context
        assert usage["prompt_tokens"] == fits.json()["usage"]["prompt_tokens"]  # the largest sampling that fits
