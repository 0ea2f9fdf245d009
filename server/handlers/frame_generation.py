"""Drawing frames with LWM: the engine requests and the VQGAN decode shared by
/v1/images/generations and /v1/videos.

LWM generates vision the way its `vision_generation` script does:

* an image (or a video's first frame) continues the prompt
  `... USER: Generate an image of {prompt} ASSISTANT: <vision>` with 257 vision
  tokens per frame, classifier-free guidance against `<s><vision>`, and the
  image settings (`IMAGE_DEFAULTS`);
* the next frames continue `... Generate a video of {prompt} ASSISTANT: <vision>`
  + the frames so far (the guidance partner is `<s><vision>` + the same frames)
  with the video settings (`VIDEO_DEFAULTS`);
* the 257th token of every frame is the frame delimiter, dictated rather than
  sampled (`vision_layout.generated_frame_delimiter`).

Codes the vision head can sample but the VQGAN does not have (8192..8447 inside
a frame) are clamped to the last codebook row, 8191: that is what the
reference's codebook gather does with them (`jnp.take` clamps), so a returned
image equals the reference's decode of the same tokens.

Randomness: `key_source="server"` (default) starts each request's chains from
`PRNGKey(seed)` like chat; `"reference"` reproduces the key chain of LWM's own
script for the same `--seed` (its image call, then its video call), so the
fixture checkpoint draws exactly the reference's tokens through the API.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Sequence

import numpy as np
from PIL import Image

from lwm_serve.model.generation import PromptRow, StepOutput, reference_vision_keys
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.engine.engine import Engine
from lwm_serve.server.engine.request import GenerationRequest
from lwm_serve.server.errors import InvalidRequestError, UnsupportedFeatureError
from lwm_serve.tokenizers import chat_template
from lwm_serve.tokenizers.media_encode import to_uint8
from lwm_serve.tokenizers.vision_layout import (CODES_PER_FRAME, END_OF_FRAME, NUM_CODES, TOKENS_PER_FRAME,
                                                frames_from_tokens, generated_frame_delimiter)

logger = logging.getLogger(__name__)

KeySource = Literal["server", "reference"]
# The frame rate LWM's vision_generation writes its videos with (imageio, fps=4).
VIDEO_FPS = 4
MIN_SIDE, MAX_SIDE = 64, 2048
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class DrawSettings:
    """LWM's per-modality sampling knobs."""

    temperature: float
    top_k: int
    cfg_scale: float

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, cfg_scale=self.cfg_scale)


# The reference's settings: its shipped scripts draw images with cfg 5 and top-k
# 8192 (all codes), video frames with the script defaults cfg 1 and top-k 100.
IMAGE_DEFAULTS = DrawSettings(temperature=1.0, top_k=8192, cfg_scale=5.0)
VIDEO_DEFAULTS = DrawSettings(temperature=1.0, top_k=100, cfg_scale=1.0)


def draw_settings(defaults: DrawSettings, *, temperature: float | None, top_k: int | None,
                  cfg_scale: float | None, prefix: str = "") -> DrawSettings:
    """The request's knobs over `defaults` (validated; `prefix` names the params, e.g. "video_")."""
    t = defaults.temperature if temperature is None else float(temperature)
    k = defaults.top_k if top_k is None else int(top_k)
    c = defaults.cfg_scale if cfg_scale is None else float(cfg_scale)
    if not 0 <= t <= 2:
        raise InvalidRequestError(f"temperature must lie in [0, 2], got {t}", param=f"{prefix}temperature")
    if k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0: all codes), got {k}", param=f"{prefix}top_k")
    if not 0 <= c <= 100:
        raise InvalidRequestError(f"cfg_scale must lie in [0, 100], got {c}", param=f"{prefix}cfg_scale")
    return DrawSettings(t, k, c)


def output_side(size: str | None, native: int, param: str = "size") -> int:
    """The size policy: the model draws `native` x `native` frames (256 for LWM's
    VQGAN). "auto" (or no size) returns them as drawn; a square "NxN" with
    64 <= N <= 2048 is resized (Lanczos) to N; any other size is a 400 (stretching a
    square drawing to another aspect ratio would distort it)."""
    if size is None or size == "auto":
        return native
    m = _SIZE.match(size)
    if m is None or m.group(1) != m.group(2) or not MIN_SIDE <= int(m.group(1)) <= MAX_SIDE:
        raise InvalidRequestError(
            f"size {size!r} is not supported: this model draws {native}x{native} images; ask for \"auto\", "
            f"\"{native}x{native}\" or another square size NxN with {MIN_SIDE} <= N <= {MAX_SIDE} (resized)",
            param=param, code="unsupported_size")
    return int(m.group(1))


def size_text(side: int) -> str:
    return f"{side}x{side}"


def resize_frames(frames: np.ndarray, side: int) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, side, side, 3] (a no-op at the drawn size)."""
    if frames.shape[1] == side and frames.shape[2] == side:
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.Resampling.LANCZOS))
                     for f in frames])


def generation_keys(seed: int | None, key_source: KeySource, calls: int) -> list[tuple[int, int] | None]:
    """Per engine call (image, then video), the explicit key or None (the engine's `seed_key(seed)`)."""
    if key_source == "server":
        return [None] * calls
    if seed is None:
        raise InvalidRequestError("key_source \"reference\" needs a seed", param="seed")
    return [tuple(int(x) for x in np.asarray(k)) for k in reference_vision_keys(seed, calls)]  # type: ignore[misc]


class FrameDrawer:
    """Submits vision generation to the engine and decodes codes to pixels.

    Args:
        engine: the serving engine (generation runs as engine work beside chat).
        tokenizer: the text tokenizer (prompts).
        vqgan: the VQGAN wrapper (`decode_codes`), or None (then every call is a 400).
    """

    def __init__(self, engine: Engine, tokenizer: Any, vqgan: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.vqgan = vqgan

    @property
    def native_side(self) -> int:
        return int(self.vqgan.cfg.resolution) if self.vqgan is not None else 256

    def require_vqgan(self) -> None:
        if self.vqgan is None:
            raise UnsupportedFeatureError("this server has no VQGAN loaded, so it cannot draw images or video "
                                          "(start it with --vqgan)", param="model")

    # ------------------------------------------------------------------ prompts

    def image_rows(self, prompt: str) -> tuple[PromptRow, PromptRow]:
        cond = chat_template.image_generation_prompt(self.tokenizer, prompt)
        uncond = chat_template.unconditional_prompt(self.tokenizer)
        return PromptRow(cond.ids, cond.vision_mask), PromptRow(uncond.ids, uncond.vision_mask)

    def video_rows(self, prompt: str, frame_codes: np.ndarray) -> tuple[PromptRow, PromptRow]:
        """Video prompt + the frames so far (each closed by END_OF_FRAME, as generated)."""
        vision = frame_tokens_generated(frame_codes)
        cond = chat_template.video_generation_prompt(self.tokenizer, prompt)
        uncond = chat_template.unconditional_prompt(self.tokenizer)
        return (PromptRow(cond.ids + vision, cond.vision_mask + [True] * len(vision)),
                PromptRow(uncond.ids + vision, uncond.vision_mask + [True] * len(vision)))

    def check_fits(self, prompt_tokens: int, new_frames: int, param: str) -> None:
        """A 400 naming the frames that fit when the prompt + new frames exceed the context."""
        need = prompt_tokens + new_frames * TOKENS_PER_FRAME
        limit = self.engine.context_limit
        if need > limit:
            fit = max(0, (limit - prompt_tokens) // TOKENS_PER_FRAME)
            raise InvalidRequestError(
                f"{new_frames} frames ({new_frames * TOKENS_PER_FRAME} tokens) after a {prompt_tokens}-token "
                f"prompt exceed this model's context of {limit} tokens; at most {fit} fit",
                param=param, code="context_length_exceeded")

    def check_rows(self, n: int) -> None:
        """Each guided output takes two pool rows (cond + uncond)."""
        pool = self.engine.pool
        if pool is not None and 2 * n > pool.num_slots:
            raise InvalidRequestError(
                f"{n} image(s) need {2 * n} decode rows (guidance pairs) but the server has {pool.num_slots} "
                "(--max-num-seqs)", param="n")

    # ------------------------------------------------------------------ engine

    def submit(self, cond: PromptRow, uncond: PromptRow, n: int, frames: int, settings: DrawSettings,
               seed: int | None, key: tuple[int, int] | None, prefix: str = "img-") -> Any:
        """Submits n outputs of `frames` frames each (QueueFullError / ContextLengthError raise here)."""
        request = GenerationRequest(
            self.engine.new_request_id(prefix), [cond] * n, [settings.sampling()] * n,
            frames * TOKENS_PER_FRAME, seed=seed, head="vision", uncond_rows=[uncond] * n,
            forced_tokens=generated_frame_delimiter, key=key)
        return self.engine.submit(request)

    @staticmethod
    async def steps(handle: Any) -> AsyncIterator[StepOutput]:
        async with aclosing(handle.steps()) as steps:
            async for step in steps:
                yield step

    # ------------------------------------------------------------------ pixels

    def decode(self, tokens: Sequence[int]) -> np.ndarray:
        """Whole frames of generated tokens -> uint8 pixels [N, R, R, 3] (blocking: call in a thread)."""
        codes = frames_from_tokens(tokens)
        return self.decode_codes(codes)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.minimum(np.asarray(codes, np.int32), NUM_CODES - 1)  # see the module docstring
        return to_uint8(self.vqgan.decode_codes(codes))

    def decode_partial(self, codes: Sequence[int]) -> np.ndarray:
        """One frame of which `len(codes)` codes are sampled: the complete code rows
        decoded, the pixel rows below them black. [R, R, 3] uint8."""
        side = int(round(CODES_PER_FRAME ** 0.5))
        rows = len(codes) // side
        grid = np.zeros(CODES_PER_FRAME, np.int32)
        grid[:len(codes)] = codes[:CODES_PER_FRAME]
        pixels = self.decode_codes(grid.reshape(1, side, side))[0]
        cut = rows * (pixels.shape[0] // side)
        pixels[cut:] = 0
        return pixels

    async def decode_async(self, tokens: Sequence[int]) -> np.ndarray:
        return await asyncio.to_thread(self.decode, tokens)


def frame_tokens_generated(frame_codes: np.ndarray) -> list[int]:
    """Frames as the model generated them: 256 codes + END_OF_FRAME each."""
    codes = np.asarray(frame_codes, np.int64).reshape(-1, CODES_PER_FRAME)
    return np.concatenate([codes, np.full((len(codes), 1), END_OF_FRAME)], axis=1).reshape(-1).tolist()
