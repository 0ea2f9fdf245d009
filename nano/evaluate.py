"""Evaluate a running lwm-serve server on LWM-Nano's world, through its public API.

Works against any model the server serves (the trained LWM-Nano, or the random demo,
where answers are at chance): it only speaks HTTP.

* `videos` held-out video scenes and `images` held-out image scenes (seeds
  `world.HELD_OUT_SEED_BASE + offset + i`, never below the base) are made here, and
  every question that applies to each (`questions.questions_for`) is asked, greedy
  and short, on each path:
    - "chat-video": POST /v1/chat/completions, a `video_url` part with a data: URL;
    - "chat-image": the same with an `image_url` part (PNG);
    - "multipart":  POST /v1/video/questions, the MP4 uploaded as multipart `file`;
  each reply is graded with `questions.grade` (exactly one answer word, the true one).
* `generations` prompts `questions.image_prompt(color, shape)` go to
  POST /v1/images/generations (b64_json); `classify.classify` reads the colour and
  shape of each returned PNG, which are compared with the prompt's.

Sensitivity options: `reverse=True` sends every video with its frames in reverse
order (direction questions are still graded against the true, forward direction;
the report separates moving objects), and `frame_transform` changes the uint8 frames
[T, H, W, 3] before they are encoded (e.g. `off_centre`, which puts the scene where
the server's centre crop cuts it away).

Requests run concurrently (`concurrency` at a time; the server batches them); a
429/503 is retried after its Retry-After. A request that fails otherwise is
recorded with its error and counts as wrong.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Sequence

import httpx
import numpy as np

from lwm_serve.nano import classify, questions, world
from lwm_serve.nano.eval_report import Answer, Drawing, EvalReport
from lwm_serve.tokenizers.media_encode import encode_image, encode_mp4

logger = logging.getLogger(__name__)

Path = Literal["chat-video", "chat-image", "multipart"]
PATHS: tuple[str, ...] = ("chat-video", "chat-image", "multipart")
FrameTransform = Callable[[np.ndarray], np.ndarray]  # uint8 [T, H, W, 3] -> uint8 [T, H', W', 3]
RETRIES = 8


@dataclasses.dataclass(frozen=True)
class Medium:
    """One held-out scene, encoded as it is sent."""

    kind: Literal["video", "image"]
    seed: int
    scene: world.Scene
    data: bytes
    mime: str

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def held_out_seeds(count: int, offset: int = 0) -> list[int]:
    """`count` evaluation seeds from `world.HELD_OUT_SEED_BASE + offset` (offset >= 0)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (seeds below HELD_OUT_SEED_BASE are training seeds), got {offset}")
    return [world.HELD_OUT_SEED_BASE + offset + i for i in range(count)]


def make_medium(kind: Literal["video", "image"], seed: int, reverse: bool = False,
                frame_transform: FrameTransform | None = None) -> Medium:
    """The scene of `seed`, as an MP4 (video; `reverse` plays it backwards) or a PNG (image)."""
    scene = world.scene_from_seed(seed, kind)
    if kind == "video":
        if frame_transform is None:
            data = world.video_mp4(scene, reverse=reverse)
        else:
            data = encode_mp4(list(_transformed(scene.frames(reverse=reverse), frame_transform)), fps=world.FPS)
        return Medium(kind, seed, scene, data, "video/mp4")
    if frame_transform is None:
        return Medium(kind, seed, scene, world.image_png(scene), "image/png")
    frame = _transformed(scene.frames(), frame_transform)[0]
    return Medium(kind, seed, scene, encode_image(frame, "png"), "image/png")


def _transformed(frames: np.ndarray, transform: FrameTransform) -> np.ndarray:
    out = np.asarray(transform(frames))
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[-1] != 3 or len(out) != len(frames):
        raise ValueError(f"frame_transform must return uint8 [{len(frames)}, H, W, 3], got {out.dtype} {out.shape}")
    return out


def off_centre(frames: np.ndarray, visible: float = 0.5) -> np.ndarray:
    """A wrong crop: square frames on the left of a wider black canvas, so that the server's
    centre crop (resize the shorter side, keep the middle square) sees only the right
    `visible` share of the scene (0.5: its right half, then black; 0: black only).

    `functools.partial(off_centre, visible=0.25)` makes another `frame_transform`.
    """
    t, h, w, c = frames.shape
    if h != w or not 0.0 <= visible <= 1.0:
        raise ValueError(f"off_centre wants square frames and 0 <= visible <= 1, got {h}x{w}, {visible}")
    # The crop keeps canvas columns [(W - h) / 2, (W + h) / 2); the frame fills [0, w).
    width = round(w * (3 - 2 * visible))
    canvas = np.zeros((t, h, width + width % 2, c), np.uint8)  # even: the codec wants even sides
    canvas[:, :, :w] = frames
    return canvas


def generation_prompts(count: int, offset: int = 0) -> list[tuple[str, str]]:
    """(color, shape) of `count` prompts, cycling over every colour x shape pair."""
    pairs = list(itertools.product(world.COLORS, world.SHAPES))
    return [pairs[(offset + i) % len(pairs)] for i in range(count)]


class _Client:
    """The few API calls the evaluation makes, with retries on a full queue."""

    def __init__(self, http: httpx.AsyncClient, model: str, max_tokens: int, semaphore: asyncio.Semaphore) -> None:
        self.http, self.model, self.max_tokens, self.semaphore = http, model, max_tokens, semaphore

    async def _post(self, url: str, **kwargs: Any) -> dict:
        async with self.semaphore:
            for attempt in range(RETRIES + 1):
                r = await self.http.post(url, **kwargs)
                if r.status_code in (429, 503) and attempt < RETRIES:
                    await asyncio.sleep(_retry_after(r))
                    continue
                if r.status_code != 200:
                    raise RuntimeError(f"{url} answered {r.status_code}: {_error_message(r)}")
                return r.json()
        raise AssertionError("unreachable")

    async def chat(self, medium: Medium, question: str) -> str:
        part = "video_url" if medium.kind == "video" else "image_url"
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": question},
                    {"type": part, part: {"url": medium.data_url}}]}]}
        out = await self._post("/v1/chat/completions", json=body)
        return out["choices"][0]["message"]["content"] or ""

    async def multipart(self, medium: Medium, question: str) -> str:
        form = {"question": question, "model": self.model, "temperature": "0", "max_tokens": str(self.max_tokens)}
        name = "scene.mp4" if medium.kind == "video" else "scene.png"
        out = await self._post("/v1/video/questions", data=form, files={"file": (name, medium.data, medium.mime)})
        return out["answer"]

    async def draw(self, prompt: str, seed: int) -> bytes:
        body = {"model": self.model, "prompt": prompt, "n": 1, "response_format": "b64_json", "seed": seed}
        out = await self._post("/v1/images/generations", json=body)
        return base64.b64decode(out["data"][0]["b64_json"])


def _retry_after(r: httpx.Response) -> float:
    try:
        return min(max(float(r.headers.get("retry-after", "1")), 0.1), 30.0)
    except ValueError:  # an HTTP date: not worth parsing for a local evaluation
        return 1.0


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


async def _ask(client: _Client, path: str, medium: Medium, qa: questions.QA) -> Answer:
    moving = None
    if qa.kind == "direction":
        moving = qa.answer != "still"
    try:
        call = client.multipart if path == "multipart" else client.chat
        reply, error = await call(medium, qa.question), None
    except (httpx.HTTPError, RuntimeError, KeyError, IndexError, ValueError) as exc:
        reply, error = "", str(exc)
    correct = error is None and questions.grade(qa.kind, reply, qa.answer)
    return Answer(path, medium.kind, medium.seed, qa.kind, qa.question, qa.answer, reply, correct, moving, error)


async def _draw(client: _Client, color: str, shape: str, seed: int) -> Drawing:
    prompt = questions.image_prompt(color, shape)
    try:
        png = await client.draw(prompt, seed)
    except (httpx.HTTPError, RuntimeError, KeyError, IndexError, ValueError) as exc:
        return Drawing(prompt, color, shape, seed, None, None, str(exc))
    guess = await asyncio.to_thread(classify.classify, png)
    return Drawing(prompt, color, shape, seed, guess.color if guess else None, guess.shape if guess else None, None)


async def evaluate_async(base_url: str, *, api_key: str | None = None, videos: int = 20, images: int = 20,
                         generations: int = 10, offset: int = 0, paths: Sequence[str] = PATHS,
                         reverse: bool = False, frame_transform: FrameTransform | None = None,
                         max_tokens: int = 16, concurrency: int = 16, timeout_s: float = 600.0) -> EvalReport:
    """`evaluate`, as a coroutine."""
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
    for name, count in (("videos", videos), ("images", images), ("generations", generations)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    t0 = time.perf_counter()
    video_seeds = held_out_seeds(videos if {"chat-video", "multipart"} & set(paths) else 0, offset)
    image_seeds = held_out_seeds(images if "chat-image" in paths else 0, offset)
    with ThreadPoolExecutor(max_workers=4) as pool:  # x264 and PNG encoders release the GIL
        vids = list(pool.map(lambda s: make_medium("video", s, reverse, frame_transform), video_seeds))
        imgs = list(pool.map(lambda s: make_medium("image", s, False, frame_transform), image_seeds))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                 limits=limits) as http:
        r = await http.get("/v1/models")
        if r.status_code != 200:
            raise RuntimeError(f"{base_url}/v1/models answered {r.status_code}: {_error_message(r)}")
        model = r.json()["data"][0]["id"]
        client = _Client(http, model, max_tokens, asyncio.Semaphore(concurrency))
        asks = []
        for path in paths:
            for medium in imgs if path == "chat-image" else vids:
                asks += [_ask(client, path, medium, qa) for qa in questions.questions_for(medium.scene, medium.kind)]
        draws = [_draw(client, c, s, offset + i) for i, (c, s) in enumerate(generation_prompts(generations, offset))]
        results = await asyncio.gather(*asks, *draws)
    answers = [a for a in results if isinstance(a, Answer)]
    drawings = [d for d in results if isinstance(d, Drawing)]
    settings = {"base_url": base_url, "videos": len(vids), "images": len(imgs), "generations": generations,
                "offset": offset, "paths": list(paths), "reverse": reverse,
                "frame_transform": _name(frame_transform),
                "max_tokens": max_tokens, "concurrency": concurrency}
    return EvalReport(model, answers, drawings, settings, time.perf_counter() - t0)


def _name(transform: FrameTransform | None) -> str | None:
    if transform is None:
        return None
    if isinstance(transform, functools.partial):
        args = ", ".join([*map(repr, transform.args), *(f"{k}={v!r}" for k, v in transform.keywords.items())])
        return f"{_name(transform.func)}({args})"
    return getattr(transform, "__name__", None) or repr(transform)


def evaluate(base_url: str, *, api_key: str | None = None, videos: int = 20, images: int = 20,
             generations: int = 10, offset: int = 0, paths: Sequence[str] = PATHS, reverse: bool = False,
             frame_transform: FrameTransform | None = None, max_tokens: int = 16, concurrency: int = 16,
             timeout_s: float = 600.0) -> EvalReport:
    """Asks every applicable question about held-out videos and images through the server at
    `base_url` and draws `generations` images; returns the graded `EvalReport`.

    Args:
        base_url: e.g. http://127.0.0.1:8000 (the first model of /v1/models is asked).
        api_key: bearer key, when the server wants one.
        videos, images: how many held-out scenes of each kind (seeds from
            HELD_OUT_SEED_BASE + offset); generations: image-generation prompts.
        paths: which of PATHS to ask on (videos go to chat-video and multipart, images to chat-image).
        reverse: send the videos backwards (truths stay the forward ones).
        frame_transform: applied to uint8 frames [T, H, W, 3] before encoding (e.g. `off_centre`).
        max_tokens: new tokens per answer (greedy).
        concurrency: requests in flight at once.

    Raises:
        ValueError: a negative offset or count, an unknown path, a frame_transform returning a wrong array.
        RuntimeError / httpx.HTTPError: the server cannot be reached, refuses the key, or lists no model.
    """
    return asyncio.run(evaluate_async(base_url, api_key=api_key, videos=videos, images=images,
                                      generations=generations, offset=offset, paths=paths, reverse=reverse,
                                      frame_transform=frame_transform, max_tokens=max_tokens,
                                      concurrency=concurrency, timeout_s=timeout_s))
