"""POST /v1/images/generations through the official `openai` client against uvicorn on 127.0.0.1.

The fixture model + VQGAN draw what LWM's own `vision_generation` draws for the
fixture seeds (`key_source: "reference"`), and the PNG returned is the VQGAN
decode of those codes, pixel for pixel.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from lwm_serve.tokenizers.media_encode import to_uint8
from lwm_serve.tokenizers.vision_layout import frames_from_tokens

PROMPT = "Fireworks over the city"


PACE_S = [0.0]  # seconds the worker sleeps per engine step (a test sets it)


@pytest.fixture(scope="module")
def drawing(launch, vision_runtime):
    """A server with the VQGAN; its worker can be paced (PACE_S) so that an image
    takes long enough for a chat request to run beside it however fast the model is."""
    import dataclasses

    server = launch(dataclasses.replace(vision_runtime, step_hook=lambda: time.sleep(PACE_S[0])))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(drawing, auth_headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{drawing.base_url}/v1", api_key=auth_headers["Authorization"][7:],
                         max_retries=0)


def _case(reference_dir: Path, name: str) -> tuple[dict, dict]:
    case = json.loads((reference_dir / "cases" / name / "case.json").read_text())
    return case, case["flags"]


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.mark.parametrize("name", ["generate_image_cfg", "generate_image_greedy"])
def test_image_equals_reference_draw_and_its_decode(client, vision_runtime, reference_dir, validate, name):
    case, flags = _case(reference_dir, name)
    tokens = case["image_tokens_257"]
    expected = to_uint8(vision_runtime.vqgan.decode_codes(np.minimum(frames_from_tokens(tokens), 8191)))[0]
    resp = client.images.with_raw_response.generate(
        prompt=flags["prompt"], extra_body={"seed": flags["seed"], "key_source": "reference",
                                            "cfg_scale": flags["cfg_scale_image"],
                                            "temperature": flags["temperature_image"],
                                            "top_k": flags["top_k_image"]})
    body = json.loads(resp.text)
    validate("ImagesResponse", body)
    assert body["size"] == "256x256" and body["output_format"] == "png"
    assert body["usage"]["output_tokens"] == 257
    got = _png(body["data"][0]["b64_json"])
    assert got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got, expected)


def test_n_images_as_urls_in_webp_resized(client, drawing, validate):
    body = json.loads(client.images.with_raw_response.generate(
        prompt="a red square", n=2, size="128x128", response_format="url", output_format="jpeg",
        extra_body={"seed": 7}).text)
    validate("ImagesResponse", body)
    assert body["size"] == "128x128" and body["output_format"] == "jpeg" and len(body["data"]) == 2
    images = []
    for item in body["data"]:
        assert set(item) == {"url"}
        resp = httpx.get(item["url"], timeout=30)  # the unguessable name is the capability: no API key
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(resp.content))
        assert img.format == "JPEG" and img.size == (128, 128)
        images.append(np.asarray(img.convert("RGB")))
    assert not np.array_equal(images[0], images[1])  # two draws, not one copied
    name = body["data"][0]["url"].rsplit("/", 1)[1]
    missing = httpx.get(f"{drawing.base_url}/v1/images/files/{name[:-10]}0000000000", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_streamed_partial_images_fill_in_row_by_row(client, drawing, validate):
    kwargs = dict(prompt="a green field", extra_body={"seed": 11})
    final = _png(client.images.generate(**kwargs).data[0].b64_json)
    with httpx.stream("POST", f"{drawing.base_url}/v1/images/generations", timeout=120,
                      headers={"Authorization": f"Bearer {client.api_key}"},
                      json={"prompt": "a green field", "seed": 11, "stream": True, "partial_images": 3}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert lines[-1] == "data: [DONE]"
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert names == [e["type"] for e in events]
    for e in events:
        validate("ImageGenPartialImageEvent" if e["type"].endswith("partial_image") else "ImageGenCompletedEvent", e)
    assert [e["partial_image_index"] for e in events[:3]] == [0, 1, 2]
    for e, codes in zip(events[:3], (64, 128, 192)):
        img = _png(e["b64_json"])
        rows = codes // 16 * 16  # complete code rows, 16 pixels each
        assert img[rows:].max() == 0, "the rows not sampled yet are blank"
        assert img[:rows].max() > 0
    np.testing.assert_array_equal(_png(events[-1]["b64_json"]), final)
    # The SDK reads the same stream (here as WebP).
    streamed = list(client.images.generate(prompt="a green field", stream=True, partial_images=1,
                                           output_format="webp", extra_body={"seed": 11}))
    assert [e.type for e in streamed] == ["image_generation.partial_image", "image_generation.completed"]
    webp = Image.open(io.BytesIO(base64.b64decode(streamed[-1].b64_json)))
    assert webp.format == "WEBP" and webp.size == (256, 256) and streamed[-1].output_format == "webp"


def test_chat_beside_an_image_is_unchanged(client, drawing):
    """A chat decoding in the same engine steps as an image (one model call, both heads)
    gets exactly the tokens it gets alone."""
    ask = dict(model=drawing.model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12,
               temperature=0)
    alone = client.chat.completions.create(**ask).choices[0].message.content
    PACE_S[0] = 0.004  # ~1 s for the image's remaining steps: the chat runs inside them
    try:
        _chat_during_image(client, drawing, ask, alone)
    finally:
        PACE_S[0] = 0.0


def _chat_during_image(client, drawing, ask, alone) -> None:
    with httpx.stream("POST", f"{drawing.base_url}/v1/images/generations", timeout=120,
                      headers={"Authorization": f"Bearer {client.api_key}"},
                      json={"prompt": "a tree", "stream": True, "partial_images": 3}) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break  # the first partial image: the image is mid-draw
        beside = client.chat.completions.create(**ask).choices[0].message.content
        assert drawing.engine.stats().running == 1, "the image is still being drawn"
        rest = [line for line in lines if line.startswith("data: ")]
    assert beside == alone
    assert json.loads(rest[-2][6:])["type"] == "image_generation.completed"
    stats = drawing.engine.stats()
    assert stats.failed_total == 0


@pytest.mark.parametrize("body,param", [
    ({"prompt": "  "}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": 9}, "n"),  # 18 guidance rows > the server's 16 (--max-num-seqs)
    ({"prompt": "x", "size": "1024x1536"}, "size"),
    ({"prompt": "x", "size": "huge"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
    ({"prompt": "x", "background": "transparent"}, "background"),
    ({"prompt": "x", "partial_images": 2}, "partial_images"),
    ({"prompt": "x", "stream": True, "n": 2}, "n"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
])
def test_bad_requests_are_clear_4xx(drawing, auth_headers, validate, body, param):
    before = sorted(p.name for p in (drawing.data_dir / "images").iterdir())
    resp = httpx.post(f"{drawing.base_url}/v1/images/generations", json=body, headers=auth_headers, timeout=60)
    assert resp.status_code in (400, 404), resp.text
    validate("ErrorResponse", resp.json())
    assert resp.json()["error"]["param"] == param
    assert sorted(p.name for p in (drawing.data_dir / "images").iterdir()) == before


def test_chat_image_modality_names_the_images_endpoint(client, drawing):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=drawing.model, messages=[{"role": "user", "content": "draw"}],
                                       modalities=["text", "image"])
    assert "/v1/images/generations" in err.value.body["message"]
    assert err.value.body["param"] == "modalities"


def test_no_vqgan_no_images(live, auth_headers):
    resp = httpx.post(f"{live.base_url}/v1/images/generations", json={"prompt": "x"}, headers=auth_headers,
                      timeout=30)
    assert resp.status_code == 400 and "VQGAN" in resp.json()["error"]["message"]


def test_codes_past_the_codebook_decode_as_the_last_code(vision_runtime):
    """The vision head can sample 8192..8447 inside a frame; they decode as code 8191
    (the reference's codebook gather clamps), and partial images black out unsampled rows."""
    from lwm_serve.server.handlers.frame_generation import FrameDrawer

    drawer = FrameDrawer(None, vision_runtime.tokenizer, vision_runtime.vqgan)  # no engine needed to decode
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8192, 256)
    odd = codes.copy()
    odd[[3, 100, 200]] = [8192, 8300, 8447]
    clamped = codes.copy()
    clamped[[3, 100, 200]] = 8191
    np.testing.assert_array_equal(drawer.decode(odd.tolist() + [8192]), drawer.decode(clamped.tolist() + [8192]))
    partial = drawer.decode_partial(codes[:40].tolist())  # 2 complete rows of 16 codes
    assert partial.shape == (256, 256, 3) and partial[32:].max() == 0 and partial[:32].max() > 0
