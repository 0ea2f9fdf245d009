"""Server test setup: the fixture checkpoint as a runtime, a real uvicorn server, schemas.

One runtime for the whole session (its compiled shapes are shared); one live
server (uvicorn on 127.0.0.1, a free port, in a background thread) per need:
`live` is the shared API-key-protected server most tests use.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import jsonschema
import pytest
from fastapi import FastAPI

from lwm_serve.server.app import build_app
from lwm_serve.server.config import ServerSettings
from lwm_serve.server.local import LocalServer, start_in_thread
from lwm_serve.server.runtime import Runtime, load_runtime

SCHEMAS = Path(__file__).resolve().parents[1] / "fixtures" / "openai" / "schemas.json"
API_KEY = "test-key-123"
# Small enough that a too-long prompt is cheap to build, large enough for the tests.
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def fixture_runtime(reference_dir: Path) -> Runtime:
    """The reference fixture model (tiny random LWM) with its tokenizer."""
    return load_runtime(f"params::{reference_dir / 'model' / 'params_scan'}",
                        model_config_spec=str(reference_dir / "model" / "config.json"),
                        tokenizer=str(reference_dir / "tokenizer"), served_model_name="lwm-fixture",
                        max_model_len=MAX_MODEL_LEN, prefill_chunk=256, progress=False)


@pytest.fixture(scope="session")
def vision_runtime(fixture_runtime: Runtime, reference_dir: Path) -> Runtime:
    """The fixture model with the fixture's tiny VQGAN (images and video work)."""
    import dataclasses

    from lwm_serve.server.runtime import load_vqgan

    return dataclasses.replace(fixture_runtime, vqgan=load_vqgan(reference_dir / "vqgan" / "vqgan_params.pkl"))


@pytest.fixture(scope="session")  # stateless factory: module-scoped servers may use it too
def hooked_runtime(fixture_runtime: Runtime) -> Callable[[Callable[[], None]], Runtime]:
    """hooked_runtime(before_step): the fixture runtime whose engine calls `before_step()`
    before each engine step: a gate makes "the worker is busy" a fact of the test, a
    sleep keeps a long request long however fast the model gets."""
    import dataclasses

    return lambda before_step: dataclasses.replace(fixture_runtime, step_hook=before_step)


class LiveServer(LocalServer):
    """A test server, with the running app's parts at hand."""

    @property
    def engine(self):  # noqa: ANN201 - the Engine of the running app
        return self.app.state.services.engine

    @property
    def model(self) -> str:
        return self.app.state.services.model_name

    @property
    def services(self):  # noqa: ANN201 - the app's Services
        return self.app.state.services

    @property
    def data_dir(self) -> Path:
        return self.app.state.settings.resolved_data_dir()


def start_server(app: FastAPI, *, ready_timeout: float = 300.0, wait_for: str = "/ready") -> LiveServer:
    """Runs `app` under uvicorn on 127.0.0.1:<free port> in a thread; waits for `wait_for` (200)."""
    local = start_in_thread(app, ready_timeout_s=ready_timeout, wait_for=wait_for)
    return LiveServer(local.app, local.base_url, local.server, local.thread)


_DATA_ROOT: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _server_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test server keeps its files and vision cache under a session tmp dir."""
    _DATA_ROOT.append(tmp_path_factory.mktemp("server-data"))
    return _DATA_ROOT[-1]


def settings_for(**overrides: Any) -> ServerSettings:
    """Test settings; without `data_dir`, a fresh data dir per server (never ~/.cache)."""
    base: dict[str, Any] = dict(api_keys=[API_KEY], max_queue=8, max_batch=8, default_max_tokens=16)
    if "data_dir" not in overrides:
        base["data_dir"] = Path(tempfile.mkdtemp(prefix="data-", dir=_DATA_ROOT[-1]))
    return ServerSettings(**{**base, **overrides})


@pytest.fixture(scope="session")
def live(fixture_runtime: Runtime) -> Iterator[LiveServer]:
    """The shared server: fixture model, API key required."""
    server = start_server(build_app(settings_for(), fixture_runtime))
    yield server
    server.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., LiveServer]]:
    """make_server(runtime, wait_for="/ready", **settings): an extra live server, stopped after the test."""
    started: list[LiveServer] = []

    def make(runtime: Any, *, wait_for: str = "/ready", **overrides: Any) -> LiveServer:
        server = start_server(build_app(settings_for(**overrides), runtime), wait_for=wait_for)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def launch() -> Callable[..., LiveServer]:
    """launch(runtime, wait_for="/ready", **settings): a live server the caller stops
    (for module-scoped servers; tests use `make_server`)."""

    def go(runtime: Any, *, wait_for: str = "/ready", **overrides: Any) -> LiveServer:
        return start_server(build_app(settings_for(**overrides), runtime), wait_for=wait_for)

    return go


@pytest.fixture(scope="session")
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def openai_schemas() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())


@pytest.fixture(scope="session")
def validate(openai_schemas: dict[str, Any]) -> Callable[[str, Any], None]:
    """validate(schema_name, body): raises jsonschema.ValidationError on mismatch."""
    validators: dict[str, jsonschema.protocols.Validator] = {}

    def check(name: str, body: Any) -> None:
        if name not in validators:
            schema = {**openai_schemas, "$ref": f"#/$defs/{name}"}
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            validators[name] = cls(schema)
        validators[name].validate(body)

    return check


def sse_events(lines: Iterator[str]) -> list[str]:
    """The `data:` payloads of an SSE body, in order (asserting the framing; comment
    lines, which SSE clients skip, may only be progress or keep-alive notes)."""
    out = []
    for line in lines:
        if not line:
            continue
        if line.startswith(": "):
            assert line.startswith((": progress ", ": keep-alive")), f"unexpected SSE comment {line!r}"
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        out.append(line[len("data: "):])
    return out


@pytest.fixture(scope="session")
def parse_sse() -> Callable[[Iterator[str]], list[str]]:
    return sse_events


@pytest.fixture(scope="session")
def server_media(tmp_path_factory: pytest.TempPathFactory, media_kit: Any, reference_dir: Path) -> Path:
    """Real media for the API tests (tiny clips): good, bad, and the fixture's frames as a lossless clip."""
    import av
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("server-media")
    media_kit.write_video(d / "h264.mp4", 10, fps=10, gop=5)
    assert "libvpx-vp9" in av.codecs_available, "this PyAV wheel has no libvpx-vp9 encoder"
    media_kit.write_video(d / "vp9.webm", 10, fps=10, codec="libvpx-vp9", gop=5)
    media_kit.write_video(d / "rotated.mp4", 6, fps=10, rotation=90)
    media_kit.write_audio_only(d / "audio.m4a")
    full = (d / "h264.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_bytes(b"this is plainly not a media file\n" * 8)
    frame = media_kit.make_frame(3, 40, 30)
    (d / "image.png").write_bytes(media_kit.image_bytes(frame, "PNG"))
    (d / "image.jpg").write_bytes(media_kit.image_bytes(frame, "JPEG", quality=95))
    (d / "image.gif").write_bytes(media_kit.image_bytes(frame, "GIF"))
    # The reference's 5-frame video case, lossless (PNG codec in MOV): frames survive exactly.
    case = reference_dir / "cases" / "vqgan"
    frames = [np.asarray(Image.open(case / f"video_frame{i}.png").convert("RGB")) for i in range(5)]
    media_kit.write_video(d / "fixture_clip.mov", 0, fps=5, codec="png", pix_fmt="rgb24", frames=frames)
    return d


def data_url(path: Path, mime: str = "application/octet-stream") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="session")
def make_data_url() -> Callable[..., str]:
    """make_data_url(path, mime): the file as a base64 data URL."""
    return data_url


def leftovers(data_dir: Path) -> list[Path]:
    """Temp/partial files a request may have left in a server's data dir (must be none)."""
    out = [p for p in (data_dir / "tmp").glob("*") if p.is_file()] if (data_dir / "tmp").exists() else []
    out += list((data_dir / "files" / "blobs").glob("*.part"))
    out += list((data_dir / "vision_cache").glob("*/.tmp-*"))
    return out


@pytest.fixture(scope="session")
def find_leftovers() -> Callable[[Path], list[Path]]:
    return leftovers


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} through prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="session")
def read_metrics() -> Callable[[str], dict[tuple[str, tuple], float]]:
    """read_metrics(base_url): the server's /metrics samples, parsed."""
    return lambda base_url: metric_samples(httpx.get(f"{base_url}/metrics").text)
