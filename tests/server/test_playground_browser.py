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
            from PIL import Image

            Path(export).mkdir(parents=True, exist_ok=True)
            # 256 colours: a third of the bytes in the repository, the same picture to the eye
            # (a generated drawing is noise to PNG's filters)
            Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(
                Path(export) / f"{docs}.png", optimize=True)
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


def _watch_images(page) -> None:
    """Records every picture a generated <img> shows: each `src` it had before a change
    (several changes in one task come as several records), the current one read at the end."""
    page.evaluate("""() => { window.__oldSrcs = [];
      new MutationObserver((records) => { for (const r of records)
          if (r.target.closest('.generated') && r.oldValue) window.__oldSrcs.push(r.oldValue); })
      .observe(document.getElementById('thread'),
               {subtree: true, attributes: true, attributeFilter: ['src'], attributeOldValue: true}); }""")


def _shown_images(page) -> list[str]:
    return page.evaluate("[...window.__oldSrcs, document.querySelector('.generated img').src]")


def _png_of(src: str) -> np.ndarray:
    from PIL import Image

    head, b64 = src.split(",", 1)
    assert head == "data:image/png;base64", head
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def _watch_progress(page) -> None:
    """Records each text the newest generation's progress bar shows."""
    page.evaluate("""() => { window.__progress = [];
      new MutationObserver(() => {
        const label = [...document.querySelectorAll('.generated .progress .label')].pop();
        const t = label && label.textContent;
        if (t && window.__progress[window.__progress.length - 1] !== t) window.__progress.push(t); })
      .observe(document.getElementById('thread'), {subtree: true, childList: true, characterData: true}); }""")


def _draw_image(s: Session, server, auth_headers) -> None:
    """An image prompt: the partial images, then the final one, which is the server's own
    drawing for that seed (asked again directly)."""
    from lwm_serve.tokenizers.vision_layout import CODES_PER_FRAME

    page = s.page
    PACE["s"] = 0.015  # the partial images stay on screen a moment (a screenshot of one)
    page.check("input[value=image]")
    _watch_images(page)
    with page.expect_request(lambda r: r.url.endswith("/v1/images/generations")) as sent:
        _send(page, "a red cube on a table")
    body = sent.value.post_data_json
    assert body["stream"] is True and body["partial_images"] == 3 and body["seed"] == 11 and body["cfg_scale"] == 3
    assert "temperature" not in body  # the chat's temperature is not the drawing's
    assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
    card = page.locator(".msg.gen-image")
    expect(card.locator(".meta")).to_contain_text("partial image 2 of 3")
    s.shot("generate-image-partial", docs="playground-image-partial")
    expect(card).to_have_attribute("data-state", "done")
    PACE["s"] = 0.0
    meta = card.locator(".meta").inner_text()
    assert "3 partial images" in meta and re.search(r"\d+ prompt \+ 257 image tokens", meta), meta
    pictures = [_png_of(src) for src in _shown_images(page)]
    assert len(pictures) == 4, "three partial images, then the final one"
    final = pictures[-1]
    side = int(np.sqrt(CODES_PER_FRAME))  # codes per row
    row_px = final.shape[0] // side
    for i, partial in enumerate(pictures[:3]):  # partial i: the first (i + 1) quarter of the code rows
        assert partial.shape == final.shape == (256, 256, 3)
        cut = (i + 1) * side // 4 * row_px
        assert not partial[cut:].any(), f"partial {i}: rows below {cut} px should still be black"
        assert partial[:cut].any()
    assert page.evaluate("[...document.querySelectorAll('.generated img')].map((i) => [i.naturalWidth, i.naturalHeight])"
                         ) == [[256, 256]]
    direct = httpx.post(f"{server.base_url}/v1/images/generations", headers=auth_headers, timeout=300, json={
        "prompt": "a red cube on a table", "seed": 11, "cfg_scale": 3})
    assert direct.status_code == 200, direct.text
    np.testing.assert_array_equal(final, _png_of("data:image/png;base64," + direct.json()["data"][0]["b64_json"]))


LAST_VIDEO = "[...document.querySelectorAll('.generated video')].pop()"


def _make_video(s: Session, server, auth_headers) -> None:
    """A video job of 2 frames: queued, in progress with its percentage, the MP4 playing."""
    from lwm_serve.server.handlers.frame_generation import VIDEO_FPS

    page = s.page
    page.check("input[value=video]")
    PACE["s"] = 0.005  # a frame takes at least 257 x 5 ms: a few polls see each percentage
    _set(page, video_frames=2)
    _watch_progress(page)
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/videos")) as sent:
        _send(page, "a ball rolling")
    body = sent.value.post_data_json
    assert body["n_frames"] == 2 and body["seed"] == 11 and "seconds" not in body
    assert body["cfg_scale_image"] == body["cfg_scale_video"] == 3
    card = page.locator(".msg.gen-video").last
    with page.expect_request(lambda r: r.url.endswith("/content")) as content:
        expect(card).to_have_attribute("data-state", "done")
    PACE["s"] = 0.0
    assert content.value.headers["authorization"] == f"Bearer {API_KEY}"
    progress = page.evaluate("window.__progress")
    assert "queued · 0%" in progress and progress[-1] == "completed · 100%", progress
    assert any(re.fullmatch(r"in progress · [1-9]\d?%", p) for p in progress), progress
    page.wait_for_function(f"(() => {{ const v = {LAST_VIDEO}; return v && v.readyState >= 1 && v.duration > 0; }})()")
    video = page.evaluate(f"(() => {{ const v = {LAST_VIDEO}; return [v.videoWidth, v.videoHeight, v.duration]; }})()")
    assert video[:2] == [256, 256]
    assert video[2] == pytest.approx(2 / VIDEO_FPS, abs=0.5 / VIDEO_FPS), video
    video_id = card.get_attribute("data-video-id")
    job = httpx.get(f"{server.base_url}/v1/videos/{video_id}", headers=auth_headers).json()
    assert job["status"] == "completed" and job["size"] == "256x256"
    assert job["seconds"] in card.locator(".meta").inner_text()


def test_draw_an_image_then_a_video(server, open_page, auth_headers):
    """The real generation routes behind the API key, on the fixture model's VQGAN."""
    s = open_page(server.base_url)
    page = s.page
    expect(page.locator("#modes")).to_be_visible()
    _set(page, seed=11, cfg_scale=3, temperature=0.7)
    _draw_image(s, server, auth_headers)
    s.shot("generate-image")
    _make_video(s, server, auth_headers)
    page.evaluate(f"{LAST_VIDEO}.pause()")  # a still for the picture
    s.shot("generate-video", docs="playground-generate")


def test_a_refused_video_shows_why_and_stop_deletes_a_running_one(server, open_page, auth_headers):
    s = open_page(server.base_url)
    page = s.page
    s.allowed.append(r"status of 400")  # the refused job
    page.check("input[value=video]")
    _set(page, video_frames=40)
    _send(page, "a ball rolling")
    refused = page.locator(".msg.gen-video")
    expect(refused).to_have_attribute("data-state", "error")
    direct = httpx.post(f"{server.base_url}/v1/videos", headers=auth_headers, json={
        "prompt": "a ball rolling", "n_frames": 40})
    assert direct.status_code == 400
    assert direct.json()["error"]["message"] in refused.locator(".error").inner_text()
    s.shot("video-refused")
    PACE["s"] = 0.05  # 514 steps would take 26 s: only the stop can end it early
    _set(page, video_frames=2)
    aborted = _metric(server.base_url, 'lwm:requests_total{status="aborted"}')
    _send(page, "a long slow pan")
    card = page.locator(".msg.gen-video").last
    expect(card.locator(".progress")).to_contain_text("in progress")
    video_id = card.get_attribute("data-video-id")
    page.click("#stop")
    expect(card).to_have_attribute("data-state", "stopped")
    s.shot("video-stopped")
    expect(card).to_have_attribute("data-deleted", "true")  # DELETE answers once the job's task is cancelled
    deadline = time.monotonic() + 60  # the worker counts the abort at its next step
    while _metric(server.base_url, 'lwm:requests_total{status="aborted"}') <= aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.base_url, 'lwm:requests_total{status="aborted"}') == aborted + 1  # not drawn for nobody
    PACE["s"] = 0.0
    assert httpx.get(f"{server.base_url}/v1/videos/{video_id}", headers=auth_headers).status_code == 404
    expect(page.locator("#send")).to_be_visible()


def test_generation_controls_stay_hidden_when_the_model_cannot_draw(make_server, fixture_runtime, open_page):
    # The routes are there (they would answer 400: no VQGAN), so the page asks the server.
    server = make_server(fixture_runtime, api_keys=[])
    assert httpx.get(f"{server.base_url}/openapi.json").json()["paths"]["/v1/images/generations"]
    s = open_page(server.base_url, key=None)  # no key asked
    expect(s.page.locator("#key-dialog")).to_be_hidden()
    expect(s.page.locator("#modes")).to_be_hidden()
    expect(s.page.locator("#gen-settings")).to_be_hidden()
