"""The playground in a real browser: headless Debian Chromium driven by Playwright against
uvicorn on 127.0.0.1, the fixture model with its VQGAN, an API key required.

Each test watches the browser console (no error allowed unless the test provokes a
failing request on purpose) and saves screenshots of each state under its tmp dir
(the README's pictures also under $LWM_PLAYGROUND_SCREENSHOTS when set: that is how
docs/ is refreshed).
"""

from __future__ import annotations

import base64
import colorsys
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from playwright import sync_api as playwright_api  # the test extra; never skipped
from playwright.sync_api import expect

from lwm_serve.tokenizers.frame_sampling import SamplingSpec, select_frames

API_KEY = "test-key-123"  # tests/server/conftest.py's key (settings_for)
TIMEOUT_MS = 120_000  # generous: CI shares two cores
CLIP_FPS, CLIP_FRAMES, CLIP_SIZE = 10, 20, (320, 240)
PACE = {"s": 0.0}  # seconds slept before each decode step (the stop test needs a long answer)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # a failure, not a skip: CI installs it (.ci/run) and these tests must run
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    expect.set_options(timeout=TIMEOUT_MS)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(launch, hooked_runtime, vision_runtime):
    """Fixture model + VQGAN, API key on; decode steps paced by PACE."""
    import dataclasses

    runtime = dataclasses.replace(hooked_runtime(lambda: time.sleep(PACE["s"])), vqgan=vision_runtime.vqgan)
    srv = launch(runtime)
    yield srv
    srv.stop()


@dataclass
class Session:
    """A page, the console errors it logged, and where its screenshots go."""

    page: Any
    shots: Path
    errors: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # regexes of console errors a test provokes

    def shot(self, name: str, docs: str | None = None) -> Path:
        """Screenshot to the tmp dir; `docs`: also the README's picture of that name when
        $LWM_PLAYGROUND_SCREENSHOTS names a folder (docs/)."""
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        export = os.environ.get("LWM_PLAYGROUND_SCREENSHOTS")
        if export and docs:
            Path(export).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(export) / f"{docs}.png")
        return path

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(a, e) for a in self.allowed)]


@pytest.fixture
def open_page(browser, tmp_path) -> Iterator[Any]:
    """open_page(base_url, key=API_KEY, viewport=(1280, 860)) -> Session, the page loaded and connected."""
    sessions: list[tuple[Any, Session]] = []

    def go(base_url: str, key: str | None = API_KEY, viewport: tuple[int, int] = (1280, 860)) -> Session:
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        s = Session(page, tmp_path)
        page.on("console", lambda m: m.type == "error" and s.errors.append(m.text))
        page.on("pageerror", lambda e: s.errors.append(f"page error: {e}"))
        page.goto(base_url + "/")
        if key is not None:
            expect(page.locator("#key-dialog")).to_be_visible()
            s.shot("api-key")
            page.fill("#key-input", key)
            page.click("#key-save")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        sessions.append((context, s))
        return s

    yield go
    for context, s in sessions:
        context.close()
        assert s.unexpected_errors() == [], "console errors in the browser"


def _set(page, **fields: Any) -> None:
    """Fills settings-panel fields (id = the request field's name)."""
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))
        page.dispatch_event(f"#{name}", "change")


def _watch_text_updates(page) -> None:
    """Records (time, length) each time an answer's text changes (to see it stream)."""
    page.evaluate("""() => {
      window.__updates = [];
      new MutationObserver((records) => {
        for (const r of records) {
          const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
          if (el && el.closest('.msg.assistant .text'))
            window.__updates.push([performance.now(), el.closest('.text').textContent.length]);
        }
      }).observe(document.getElementById('thread'), {childList: true, subtree: true, characterData: true});
    }""")


def _answer(page, i: int):
    return page.locator(".msg.assistant").nth(i)


def _send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def _metric(base_url: str, name: str) -> float:
    """A sample of /metrics by its exposition name, e.g. `lwm:requests_total{status="aborted"}`."""
    text = httpx.get(f"{base_url}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


# ---------------------------------------------------------------------------- chat


def test_chat_streams_multi_turn_answers_with_usage_and_ttft(server, open_page):
    PACE["s"] = 0.02  # each token a visible step
    s = open_page(server.base_url)
    page = s.page
    expect(page.locator("#model")).to_have_text(server.model)
    s.shot("empty")
    _set(page, max_tokens=12, temperature=0)
    _watch_text_updates(page)
    _send(page, "Hello! What can you do?")
    first = _answer(page, 0)
    expect(first).to_have_attribute("data-state", "done")
    updates = page.evaluate("window.__updates")
    assert len({round(t) for t, _ in updates}) >= 2, f"the answer did not arrive in pieces: {updates}"
    meta = first.locator(".meta").inner_text()
    assert re.search(r"\d+ prompt \+ \d+ completion tokens", meta) and re.search(r"TTFT \d+\.\d\d s", meta), meta
    answer_text = first.locator(".text").inner_text()
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        _send(page, "Tell me more.")
    body = sent.value.post_data_json
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == answer_text and body["stream"] is True
    assert body["max_tokens"] == 12 and body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}
    assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
    expect(_answer(page, 1)).to_have_attribute("data-state", "done")
    second_prompt = int(re.search(r"(\d+) prompt", _answer(page, 1).locator(".meta").inner_text()).group(1))
    first_prompt = int(re.search(r"(\d+) prompt", meta).group(1))
    assert second_prompt > first_prompt  # the history went along
    assert page.locator("#banner").is_hidden()
    s.shot("chat")


def test_stop_aborts_the_request_on_the_server(server, open_page):
    PACE["s"] = 0.05  # 900 tokens would take 45 s: only the stop can end it early
    s = open_page(server.base_url)
    page = s.page
    _set(page, max_tokens=900, temperature=1)
    _watch_text_updates(page)
    aborted = _metric(server.base_url, 'lwm:requests_total{status="aborted"}')
    _send(page, "Write a very long story.")
    page.wait_for_function("window.__updates.length >= 4")
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    answer = _answer(page, 0)
    expect(answer).to_have_attribute("data-state", "stopped")
    deadline = time.monotonic() + 60
    while _metric(server.base_url, 'lwm:requests_total{status="aborted"}') <= aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.base_url, 'lwm:requests_total{status="aborted"}') == aborted + 1
    while _metric(server.base_url, "lwm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.base_url, "lwm:num_requests_running") == 0
    expect(page.locator("#send")).to_be_visible()
    assert "stopped" in answer.locator(".meta").inner_text()
    s.shot("stopped")


def test_server_errors_are_shown_as_their_message(server, open_page, auth_headers, tmp_path):
    PACE["s"] = 0.0
    s = open_page(server.base_url)
    s.allowed.append(r"status of 4\d\d")  # the browser logs the failed requests themselves
    page = s.page
    _set(page, max_tokens=5000)  # beyond the context
    _send(page, "Hi")
    answer = _answer(page, 0)
    expect(answer).to_have_attribute("data-state", "error")
    direct = httpx.post(f"{server.base_url}/v1/chat/completions", headers=auth_headers, json={
        "model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000})
    assert direct.status_code == 400
    assert direct.json()["error"]["message"] in answer.locator(".error").inner_text()
    # A file that is no video: uploaded, then the plan's error is shown on its card.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not really a video " * 64)
    page.set_input_files("#file-input", str(broken))
    card = page.locator("#attachment .media-card")
    expect(card.locator(".error")).to_be_visible()
    file_id = card.locator(".progress.done").inner_text().split("· ")[-1]
    direct = httpx.post(f"{server.base_url}/v1/video/plan", headers=auth_headers, json={"file_id": file_id})
    assert direct.status_code in (400, 415)
    assert direct.json()["error"]["message"] in card.locator(".error").inner_text()
    s.shot("error", docs="playground-error")
    # Removing the attachment deletes the upload it made (it was never asked about).
    card.locator("button.remove").click()
    expect(page.locator("#attachment")).to_be_hidden()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.base_url}/v1/files/{file_id}", headers=auth_headers).status_code != 404:
        assert time.monotonic() < deadline, "the removed upload is still stored"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- video and images


def _clip_frame(i: int) -> np.ndarray:
    """Frame i: a saturated colour of its own (hue by index) with a white ball moving left to right."""
    w, h = CLIP_SIZE
    r, g, b = colorsys.hsv_to_rgb(i / CLIP_FRAMES, 0.75, 0.9)
    frame = np.empty((h, w, 3), np.uint8)
    frame[:] = (int(r * 255), int(g * 255), int(b * 255))
    yy, xx = np.mgrid[:h, :w]
    cx = 80 + (w - 160) * i / (CLIP_FRAMES - 1)  # inside the square the model sees
    frame[(xx - cx) ** 2 + (yy - 80) ** 2 < 22**2] = 255
    return frame


@pytest.fixture(scope="module")
def clip(tmp_path_factory, media_kit) -> Path:
    path = tmp_path_factory.mktemp("playground-media") / "moving-ball.mp4"
    return media_kit.write_video(path, CLIP_FRAMES, fps=CLIP_FPS, frames=[_clip_frame(i) for i in range(CLIP_FRAMES)])


def _drop_file(page, path: Path, mime: str) -> None:
    """A real drag-and-drop: dragenter + drop events carrying a File in a DataTransfer."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle("""([b64, name, mime]) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], name, {type: mime}));
      return dt;
    }""", [data, path.name, mime])
    page.dispatch_event("body", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#dropzone")).to_be_visible()
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})


def _thumbnail_centres(page, root: str) -> list[list[int]]:
    return page.evaluate("""(root) => [...document.querySelectorAll(root + ' .strip canvas')].map((c) => {
      const d = c.getContext('2d').getImageData(c.width / 2, c.height * 0.7, 1, 1).data;
      return [d[0], d[1], d[2]];
    })""", root)


def test_video_upload_plan_frames_progress_answer_and_follow_up(server, open_page, clip):
    PACE["s"] = 0.0
    s = open_page(server.base_url)
    page = s.page
    _set(page, max_tokens=12, temperature=0)
    _drop_file(page, clip, "video/mp4")
    card = page.locator("#attachment .media-card")
    expect(card.locator(".progress.done")).to_contain_text("uploaded")
    # The default 8 frames do not fit the fixture's 1024-token context: the plan says so and offers a fit.
    expect(card.locator(".badge.bad")).to_have_text("too long")
    s.shot("video-plan-too-long")
    card.locator("button.link").click()
    expect(card.locator(".badge.ok")).to_have_text("fits")
    frames = int(page.input_value("#max_frames"))  # the suggestion, written back into the settings
    assert 1 <= frames < 8
    plan_text = card.locator(".plan").inner_text()
    assert f"{frames} frames" in plan_text and f"{frames * 257:,} vision tokens" in plan_text, plan_text
    # The strip: the sampled frames at their times, drawn from the local file.
    times = [i / CLIP_FPS for i in range(CLIP_FRAMES)]
    picked = select_frames(times, SamplingSpec(max_frames=frames))
    expect(card.locator(".strip")).to_have_attribute("data-drawn", "true")
    captions = card.locator(".strip figcaption").all_inner_texts()
    assert captions == [f"≈0:{times[i]:04.1f}" for i in picked]
    for i, got in zip(picked, _thumbnail_centres(page, "#attachment")):
        want = _clip_frame(i)[CLIP_SIZE[1] // 2 + CLIP_SIZE[1] * 2 // 10, CLIP_SIZE[0] // 2]
        assert np.abs(np.array(got) - want).max() < 40, (i, got, want.tolist())  # the right frame (H.264 is lossy)
    s.shot("video-plan")
    # Ask: progress from the SSE progress events, then the streamed answer and the frames read.
    with page.expect_request(lambda r: r.url.endswith("/v1/video/questions")) as sent:
        _send(page, "What is the ball doing?")
    assert "multipart/form-data" in sent.value.headers["content-type"]
    first = _answer(page, 0)
    expect(first).to_have_attribute("data-state", "done")
    bars = first.locator(".progress").all_inner_texts()
    assert any(re.search(rf"VQGAN encoding {frames}/{frames} frames", b) for b in bars), bars
    assert any(re.search(r"prefill [\d,]+ tokens in \d+\.\d\d s", b) for b in bars), bars
    assert f"{frames} frames = {frames * 257:,} vision tokens" in first.locator(".meta").inner_text()
    user = page.locator(".msg.user").nth(0)
    expect(user.locator(".strip")).to_have_attribute("data-exact", "true")
    assert user.locator(".strip figcaption").all_inner_texts() == [f"0:{times[i]:04.1f}" for i in picked]
    s.shot("video-answer")
    # A follow-up about the same video: chat completions with the history, the video by file id.
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        _send(page, "And then?")
    messages = sent.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    part = messages[0]["content"][1]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("file-")
    assert part["video_url"]["max_frames"] == frames
    second = _answer(page, 1)
    expect(second).to_have_attribute("data-state", "done")
    assert any("from the cache" in b for b in second.locator(".progress").all_inner_texts())
    s.shot("video-follow-up", docs="playground-video")


def test_image_upload_plan_and_answer(server, open_page, tmp_path):
    from PIL import Image

    PACE["s"] = 0.0
    s = open_page(server.base_url)
    page = s.page
    _set(page, max_tokens=8, temperature=0)
    path = tmp_path / "shapes.png"
    img = np.full((180, 240, 3), (40, 90, 200), np.uint8)
    img[60:120, 90:150] = (250, 200, 30)
    Image.fromarray(img).save(path)
    page.set_input_files("#file-input", str(path))
    card = page.locator("#attachment .media-card")
    expect(card.locator(".badge.ok")).to_have_text("fits")
    assert card.locator(".plan").inner_text().startswith("image · 1 frame → 257 vision tokens")
    expect(card.locator(".strip")).to_have_attribute("data-drawn", "true")
    centre = page.evaluate("""() => Array.from(document.querySelector('#attachment canvas').getContext('2d')
      .getImageData(56, 56, 1, 1).data.slice(0, 3))""")
    assert np.abs(np.array(centre) - (250, 200, 30)).max() < 10, centre
    _send(page, "")  # no text: the page asks its default question about the image
    answer = _answer(page, 0)
    expect(answer).to_have_attribute("data-state", "done")
    assert page.locator(".msg.user .text").inner_text() == "What is in this image?"
    assert "1 frame = 257 vision tokens" in answer.locator(".meta").inner_text()
    s.shot("image-answer")


# ---------------------------------------------------------------------------- layout, auth off, generation


def test_phone_width_has_no_sideways_scroll_and_settings_open_from_the_header(server, open_page, clip):
    PACE["s"] = 0.0
    s = open_page(server.base_url, viewport=(390, 844))
    page = s.page
    expect(page.locator("#settings")).to_be_hidden()
    page.click("#settings-toggle")
    expect(page.locator("#settings")).to_be_visible()
    s.shot("phone-settings")
    _set(page, max_tokens=8, max_frames=3)  # the video test's sampling: codes from the cache
    page.click("#settings-toggle")
    page.set_input_files("#file-input", str(clip))
    expect(page.locator("#attachment .strip")).to_have_attribute("data-drawn", "true")
    _send(page, "Where does the ball go?")
    expect(_answer(page, 0)).to_have_attribute("data-state", "done")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    s.shot("phone", docs="playground-phone")


def _partial_png(rows_done: int) -> str:
    """A 256x256 picture whose first `rows_done` of 16 token rows are drawn, the rest blank."""
    from PIL import Image

    img = np.full((256, 256, 3), 255, np.uint8)
    for r in range(rows_done):
        for c in range(16):
            img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = (r * 15, 120 + c * 8, 200 - r * 10)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _stand_in_image_route() -> APIRouter:
    """A stand-in for the image generation route (not in the server yet): OpenAI's stream
    events with partial images, so the page's generation controls can be exercised."""
    router = APIRouter()

    @router.post("/v1/images/generations")
    async def generations(body: dict) -> StreamingResponse:
        import asyncio

        async def events() -> Any:
            for i, rows in enumerate((4, 8, 12)[: body.get("partial_images", 0)]):
                data = {"type": "image_generation.partial_image", "b64_json": _partial_png(rows),
                        "partial_image_index": i, "output_format": "png"}
                yield f"event: image_generation.partial_image\ndata: {json.dumps(data)}\n\n"
                await asyncio.sleep(0.3)
            data = {"type": "image_generation.completed", "b64_json": _partial_png(16), "output_format": "png"}
            yield f"event: image_generation.completed\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return router


def _stand_in_video_routes(mp4: bytes) -> APIRouter:
    """A stand-in for the OpenAI video job protocol (not in the server yet): a job that
    progresses 0 -> 50 -> 100 over two polls, then serves `mp4` as its content."""
    router = APIRouter()
    polls: dict[str, int] = {}

    def job(video_id: str) -> dict:
        progress = min(polls[video_id] * 50, 100)
        status = "completed" if progress == 100 else ("queued" if progress == 0 else "in_progress")
        return {"id": video_id, "object": "video", "status": status, "progress": progress, "seconds": "4",
                "size": "256x256", "model": "lwm", "created_at": 0}

    @router.post("/v1/videos")
    async def create(body: dict) -> dict:
        polls["video_1"] = 0
        return job("video_1")

    @router.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str) -> dict:
        polls[video_id] += 1
        return job(video_id)

    @router.get("/v1/videos/{video_id}/content")
    async def content(video_id: str) -> Any:
        from fastapi.responses import Response

        return Response(mp4, media_type="video/mp4")

    return router


def _without_generation(srv):
    """The app with its image/video generation routes taken out (as a server without them)."""
    from lwm_serve.server.routes import images, videos

    generation = (images.router, videos.router)
    srv.app.router.routes[:] = [r for r in srv.app.router.routes
                                if getattr(r, "original_router", None) not in generation
                                and not str(getattr(r, "path", "")).startswith(("/v1/images", "/v1/videos"))]
    srv.app.openapi_schema = None
    return srv


def test_without_a_key_and_with_generation_offered_the_page_draws(make_server, fixture_runtime, open_page, clip):
    # The page is checked against stand-ins shaped after OpenAI's spec (the fixture model has
    # no VQGAN to draw with): the real routes are taken out first.
    srv = _without_generation(make_server(fixture_runtime, api_keys=[]))
    srv.app.include_router(_stand_in_image_route())  # before the page reads /openapi.json
    s = open_page(srv.base_url, key=None)  # no key asked
    page = s.page
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#mode-image")).to_be_visible()
    expect(page.locator("#mode-video")).to_be_hidden()  # not offered: not shown
    page.check("input[value=image]")
    page.evaluate("""() => { window.__srcs = new Set();
      new MutationObserver(() => document.querySelectorAll('.generated img')
        .forEach((i) => i.src && window.__srcs.add(i.src)))
      .observe(document.getElementById('thread'), {subtree: true, childList: true, attributes: true}); }""")
    _send(page, "a red cube on a table")
    card = page.locator(".msg.gen-image")
    expect(card.locator(".meta")).to_contain_text("partial image 1")
    s.shot("generate-partial")
    expect(card).to_have_attribute("data-state", "done")
    assert page.evaluate("window.__srcs.size") == 4  # three partial images, then the final one
    assert page.evaluate("document.querySelector('.generated img').naturalWidth") == 256
    s.shot("generate-image")
    # The server gains video generation: the same page, reloaded, offers it.
    srv.app.include_router(_stand_in_video_routes(clip.read_bytes()))
    srv.app.openapi_schema = None
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.check("input[value=video]")
    _send(page, "a ball rolling")
    card = page.locator(".msg.gen-video")
    expect(card.locator(".progress")).to_contain_text("50%")
    expect(card).to_have_attribute("data-state", "done")
    page.wait_for_function("document.querySelector('.generated video').videoWidth > 0")
    assert page.evaluate("document.querySelector('.generated video').videoWidth") == CLIP_SIZE[0]
    s.shot("generate-video")


def test_generation_controls_stay_hidden_when_the_server_has_none(make_server, fixture_runtime, open_page):
    server = _without_generation(make_server(fixture_runtime, api_keys=[]))
    s = open_page(server.base_url, key=None)
    expect(s.page.locator("#modes")).to_be_hidden()
    expect(s.page.locator("#gen-settings")).to_be_hidden()
