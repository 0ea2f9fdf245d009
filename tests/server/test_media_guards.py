"""Media guards over HTTP: a pixel budget checked from headers before anything is decoded
(every way media arrives), base64 errors named as such, malformed and disallowed remote
URLs (SSRF: loopback, link-local metadata, file:, redirects, the video routes' `url`)."""

from __future__ import annotations

import functools
import http.server
import io
import threading

import httpx
import pytest
from PIL import Image

from lwm_serve.server.config import ServerSettings
from lwm_serve.tokenizers import media_decode
from lwm_serve.tokenizers.errors import MediaTooLargeError

BUDGET = 1000  # pixels: the tests' 40x30 image (1200) and 64x48 clips (3072) are over it


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A PNG decompression bomb: 15000 x 15000 pixels in well under a megabyte."""
    out = io.BytesIO()
    Image.new("1", (15000, 15000)).save(out, "PNG")
    assert len(out.getvalue()) < 1 << 20
    return out.getvalue()


@pytest.fixture(scope="module")
def media_http(server_media):
    """127.0.0.1 serving the test media, plus /redirect?to=URL answering 302 to URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib API
            if self.path.startswith("/redirect?to="):
                self.send_response(302)
                self.send_header("Location", self.path[len("/redirect?to="):])
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args) -> None:  # noqa: ANN002 - quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(server_media)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def tight(launch, vision_runtime):
    """A server with a tiny pixel budget; 127.0.0.1 is its only allowed remote host."""
    srv = launch(vision_runtime, max_media_pixels=BUDGET, media_url_allowlist=["127.0.0.1"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default(launch, vision_runtime):
    """Default settings, except one allowed remote host that is not this machine."""
    srv = launch(vision_runtime, media_url_allowlist=["media.example.com"])
    yield srv
    srv.stop()


def _upload(server, auth_headers, name: str, data: bytes) -> str:
    r = httpx.post(f"{server.base_url}/v1/files", headers=auth_headers, files={"file": (name, data)},
                   data={"purpose": "user_data"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _chat(server, auth_headers, url: str, kind: str = "image_url") -> httpx.Response:
    body = {"max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": kind, kind: {"url": url, "max_frames": 1}}]}]}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=120)


def _question(server, auth_headers, fields: dict, upload=None) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/video/questions", headers=auth_headers, timeout=120,
                      data={"question": "q", "max_tokens": "1", "max_frames": "1", **fields},
                      files={"file": upload} if upload else None)


def _plan(server, auth_headers, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/video/plan", headers=auth_headers, json={"question": "q", **body},
                      timeout=120)


def test_bombs_and_big_frames_are_refused_from_their_headers(bomb_png, server_media):
    with pytest.raises(MediaTooLargeError, match="pixels"):
        media_decode.is_image(bomb_png)  # was: False, and the bomb went to PyAV (~19 s, +2 GB)
    with pytest.raises(MediaTooLargeError, match="1200 pixels"):
        media_decode.is_image(server_media / "image.png", max_pixels=BUDGET)
    with pytest.raises(MediaTooLargeError, match=str(BUDGET)):
        media_decode.probe_video(server_media / "h264.mp4", max_pixels=BUDGET)
    with pytest.raises(MediaTooLargeError):
        media_decode.decode_media(server_media / "h264.mp4", max_pixels=BUDGET)
    assert media_decode.is_image(server_media / "image.png", max_pixels=1200)  # at the budget: fine


def test_the_default_budget_refuses_a_png_bomb_by_every_route(default, auth_headers, bomb_png, make_data_url,
                                                              tmp_path, find_leftovers):
    (tmp_path / "bomb.png").write_bytes(bomb_png)
    fid = _upload(default, auth_headers, "bomb.png", bomb_png)
    answers = [_chat(default, auth_headers, make_data_url(tmp_path / "bomb.png", "image/png")),
               _chat(default, auth_headers, fid),
               _question(default, auth_headers, {}, ("bomb.png", bomb_png, "image/png")),
               _question(default, auth_headers, {"file_id": fid}),
               _plan(default, auth_headers, file_id=fid)]
    for r in answers:
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels", r.text
    assert find_leftovers(default.data_dir) == []


def test_the_pixel_budget_holds_for_every_way_media_arrives(tight, auth_headers, server_media, make_data_url,
                                                            media_http, find_leftovers):
    png, clip = server_media / "image.png", server_media / "h264.mp4"
    png_id, clip_id = _upload(tight, auth_headers, "i.png", png.read_bytes()), \
        _upload(tight, auth_headers, "c.mp4", clip.read_bytes())
    answers = {
        "chat data URL image": _chat(tight, auth_headers, make_data_url(png, "image/png")),
        "chat file id video": _chat(tight, auth_headers, clip_id, "video_url"),
        "chat remote URL": _chat(tight, auth_headers, f"{media_http}/image.png"),
        "question upload video": _question(tight, auth_headers, {}, ("c.mp4", clip.read_bytes(), "video/mp4")),
        "question file id image": _question(tight, auth_headers, {"file_id": png_id}),
        "question url": _question(tight, auth_headers, {"url": f"{media_http}/h264.mp4"}),
        "plan file id video": _plan(tight, auth_headers, file_id=clip_id),
        "plan url image": _plan(tight, auth_headers, url=f"{media_http}/image.png"),
    }
    for way, r in answers.items():
        assert r.status_code == 413, (way, r.text)
        err = r.json()["error"]
        assert err["code"] == "too_many_pixels" and "max_media_pixels" in err["message"], (way, err)
    assert find_leftovers(tight.data_dir) == []
    assert httpx.get(f"{tight.base_url}/ready").status_code == 200


def test_invalid_base64_says_so(default, auth_headers):
    for url in ("data:image/png;base64,!!!not-base64!!!", "data:video/mp4;base64,%%%%"):
        r = _chat(default, auth_headers, url)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_data_url" and "base64" in err["message"], err  # was: "the file is empty"


@pytest.mark.parametrize("url, code", [
    ("http://localhost:abc/clip.mp4", "invalid_media_url"),  # was: 500 (http.client.InvalidURL)
    ("http://127.0.0.1/clip.mp4", "url_not_allowed"),  # loopback
    ("http://[::1]:8000/clip.mp4", "url_not_allowed"),
    ("http://169.254.169.254/latest/meta-data/", "url_not_allowed"),  # link-local metadata
    ("http://metadata.google.internal/computeMetadata/v1/", "url_not_allowed"),
    ("http://media.example.com.evil.test/clip.mp4", "url_not_allowed"),  # suffix trick
    ("http://media.example.com@127.0.0.1/clip.mp4", "url_not_allowed"),  # userinfo trick
    ("file:///etc/passwd", "invalid_media_url"),
    ("ftp://media.example.com/clip.mp4", "invalid_media_url"),
])
def test_remote_urls_off_the_allowlist_are_refused_on_every_route(default, auth_headers, url, code):
    answers = [_chat(default, auth_headers, url), _chat(default, auth_headers, url, "video_url"),
               _question(default, auth_headers, {"url": url}), _plan(default, auth_headers, url=url)]
    for r in answers:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code, r.json()


def test_redirects_to_a_disallowed_host_are_refused(tight, auth_headers, media_http, find_leftovers):
    port = media_http.rsplit(":", 1)[1]
    for target in (f"http://localhost:{port}/image.png", "http://169.254.169.254/latest/meta-data/",
                   "file:///etc/passwd"):
        url = f"{media_http}/redirect?to={target}"
        for r in (_chat(tight, auth_headers, url), _question(tight, auth_headers, {"url": url}),
                  _plan(tight, auth_headers, url=url)):
            err = r.json()["error"]
            assert r.status_code == 400 and ("not allowed" in err["message"] or "allowlist" in err["message"]), err
            assert err["param"], err
            # urllib itself refuses a redirect to file: before our allowlist check sees it
            assert r.json()["error"]["code"] == ("media_fetch_failed" if target.startswith("file:")
                                                 else "url_not_allowed"), r.text
    assert find_leftovers(tight.data_dir) == []


def test_vqgan_dir_without_pickle_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a directory.*vqgan_params.pkl.*no .pkl file"):
        ServerSettings(vqgan=str(tmp_path))
