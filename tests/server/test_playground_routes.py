"""The playground's HTTP side (no browser): the page and its assets at / and /playground,
--no-playground, the config the page reads first, and the plan's frame times it draws."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from lwm_serve.server import cli
from lwm_serve.server.routes.playground import STATIC_DIR
from lwm_serve.tokenizers.frame_sampling import SamplingSpec, select_frames


@pytest.fixture(scope="module")
def vision_server(launch, vision_runtime):
    srv = launch(vision_runtime)
    yield srv
    srv.stop()


def _assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(playground/static/[^"]+)"', html)


def _module_imports(js: str) -> list[str]:
    return re.findall(r"from '\./([^']+)'", js)


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_the_page_and_every_asset_it_loads_are_served_without_a_key(live, path):
    page = httpx.get(f"{live.base_url}{path}")  # the shared server requires a key for /v1: not for the page
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = _assets(page.text)
    assert {"playground/static/main.js", "playground/static/playground.css"} <= set(assets)
    seen, todo = set(), [a.removeprefix("playground/static/") for a in assets]
    while todo:  # follow the ES module imports: every file the page needs is shipped
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        r = httpx.get(f"{live.base_url}/playground/static/{name}")
        assert r.status_code == 200, name
        kind = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}[Path(name).suffix]
        assert kind in r.headers["content-type"], (name, r.headers["content-type"])
        if name.endswith(".js"):
            todo += _module_imports(r.text)
    assert seen == {p.name for p in STATIC_DIR.iterdir() if p.suffix in (".js", ".css", ".svg")}
    # Nothing is fetched from elsewhere (the server may run offline); an XML namespace is no fetch.
    for p in STATIC_DIR.iterdir():
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", re.sub(r'xmlns="[^"]*"', "", p.read_text())), p.name


def test_config_tells_the_page_whether_to_ask_for_a_key_and_whether_the_model_draws(live, vision_server,
                                                                                    auth_headers):
    for srv, draws in ((live, False), (vision_server, True)):
        config = httpx.get(f"{srv.base_url}/playground/config.json").json()
        assert config["auth_required"] is True
        assert config["generation"] == {"image": draws, "video": draws}
        # What it says is what the route does: a model without a VQGAN refuses to draw.
        refused = httpx.post(f"{srv.base_url}/v1/images/generations", headers=auth_headers,
                             json={"prompt": "a cat", "size": "bogus"})
        assert refused.status_code == 400
        assert ("no VQGAN" in refused.json()["error"]["message"]) is not draws
    assert httpx.get(f"{srv.base_url}/v1/models").status_code == 401  # the API itself stays guarded


def test_no_playground_serves_the_api_only(make_server, fixture_runtime, auth_headers, validate):
    srv = make_server(fixture_runtime, playground=False, api_keys=[])
    for path in ("/", "/playground", "/playground/static/main.js", "/playground/config.json"):
        r = httpx.get(f"{srv.base_url}{path}")
        assert r.status_code == 404, path
        validate("ErrorResponse", r.json())
    assert httpx.get(f"{srv.base_url}/v1/models").status_code == 200


def test_an_unknown_asset_is_an_openai_404_and_paths_cannot_escape(live, validate):
    for path in ("/playground/static/nope.js", "/playground/static/../routes/playground.py",
                 "/playground/static/%2e%2e/config.py"):
        r = httpx.get(f"{live.base_url}{path}")
        assert r.status_code == 404, path
        validate("ErrorResponse", r.json())


def test_cli_flag_turns_the_playground_off(monkeypatch):
    served = []
    monkeypatch.setattr(cli, "serve", lambda settings: served.append(settings) or 0)
    assert cli.main(["serve", "--log-level", "warning"]) == 0
    assert cli.main(["serve", "--log-level", "warning", "--no-playground"]) == 0
    monkeypatch.setenv("LWM_SERVE_PLAYGROUND", "false")
    assert cli.main(["serve", "--log-level", "warning"]) == 0
    assert [s.playground for s in served] == [True, False, False]


def test_plan_gives_the_frame_times_the_answer_then_reads(vision_server, auth_headers, server_media):
    """The page draws its frame strip from the plan's times before asking: they are the
    frames the answer reports (estimated from the container, exact once cached)."""
    base = vision_server.base_url
    clip = server_media / "h264.mp4"  # 10 frames at 10 fps
    up = httpx.post(f"{base}/v1/files", headers=auth_headers, data={"purpose": "user_data"},
                    files={"file": ("clip.mp4", clip.read_bytes(), "video/mp4")})
    file_id = up.json()["id"]
    plan = httpx.post(f"{base}/v1/video/plan", headers=auth_headers, json={"file_id": file_id, "max_frames": 3}).json()
    times = [i / 10 for i in range(10)]
    expected = [times[i] for i in select_frames(times, SamplingSpec(max_frames=3))]
    assert not plan["cached"] and plan["frame_timestamps"] == pytest.approx(expected, abs=1e-6)
    answer = httpx.post(f"{base}/v1/video/questions", headers=auth_headers, timeout=300, data={
        "file_id": file_id, "question": "What happens?", "max_frames": "3", "max_tokens": "2"}).json()
    assert [f["timestamp"] for f in answer["media"]["frames"]] == pytest.approx(plan["frame_timestamps"], abs=1e-6)
    cached = httpx.post(f"{base}/v1/video/plan", headers=auth_headers, json={"file_id": file_id, "max_frames": 3})
    assert cached.json()["cached"] and cached.json()["frame_timestamps"] == pytest.approx(expected, abs=1e-6)
    image = httpx.post(f"{base}/v1/files", headers=auth_headers, data={"purpose": "user_data"},
                       files={"file": ("a.png", (server_media / "image.png").read_bytes(), "image/png")}).json()
    still = httpx.post(f"{base}/v1/video/plan", headers=auth_headers, json={"file_id": image["id"]}).json()
    assert still["kind"] == "image" and still["frames"] == 1 and still["frame_timestamps"] is None
