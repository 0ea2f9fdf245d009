"""POST /v1/images/generations: OpenAI semantics over `FrameDrawer` (no FastAPI here).

n images are ONE engine request (n guided outputs, 2n pool rows). With
`stream: true` and `partial_images` = p (1..3), the image is shown filling in:
after 256 * i / (p + 1) codes (i = 1..p) the complete code rows so far are
decoded (the rows below black) and sent as `image_generation.partial_image`;
then `image_generation.completed` carries the final image. A streamed request
draws one image (the events carry no image index).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import AsyncIterator

import numpy as np

from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.handlers import common
from lwm_serve.server.handlers.frame_generation import (IMAGE_DEFAULTS, FrameDrawer, draw_settings,
                                                        generation_keys, output_side, resize_frames, size_text)
from lwm_serve.server.schemas.images import (ImageCompletedEvent, ImageData, ImageGenerationRequest,
                                             ImageGenUsage, ImagePartialEvent, ImagesResponse)
from lwm_serve.server.stores.outputs import ExpiringOutputs
from lwm_serve.tokenizers.media_encode import encode_image
from lwm_serve.tokenizers.vision_layout import CODES_PER_FRAME, TOKENS_PER_FRAME

logger = logging.getLogger(__name__)

DEFAULT_QUALITY = 90  # webp/jpeg when output_compression is not given


class ImagesHandler:
    def __init__(self, drawer: FrameDrawer, outputs: ExpiringOutputs, model_name: str) -> None:
        self.drawer = drawer
        self.outputs = outputs
        self.model_name = model_name

    async def generate(self, req: ImageGenerationRequest, base_url: str
                       ) -> ImagesResponse | AsyncIterator[ImageCompletedEvent | ImagePartialEvent]:
        """Validates, submits, and returns the response (or the stream of events)."""
        common.check_model(req.model, self.model_name)
        common.reject_unsupported(req.unsupported())
        self.drawer.require_vqgan()
        if not req.prompt.strip():
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        n = req.n or 1
        side = output_side(req.size, self.drawer.native_side)
        fmt = req.output_format or "png"
        if req.output_compression is not None and fmt == "png":
            raise InvalidRequestError("output_compression applies to webp and jpeg only", param="output_compression")
        if req.stream and n > 1:
            raise InvalidRequestError("a streamed request draws one image (n = 1): the partial-image events "
                                      "carry no image index", param="n")
        if req.partial_images and not req.stream:
            raise InvalidRequestError("partial_images needs stream: true", param="partial_images")
        if req.stream and req.response_format == "url":
            raise InvalidRequestError("streamed images come as b64_json", param="response_format")
        settings = draw_settings(IMAGE_DEFAULTS, temperature=req.temperature, top_k=req.top_k,
                                 cfg_scale=req.cfg_scale)
        self.drawer.check_rows(n)
        cond, uncond = self.drawer.image_rows(req.prompt)
        self.drawer.check_fits(len(cond.ids), 1, "prompt")
        key = generation_keys(req.seed, req.key_source, 1)[0]
        handle = self.drawer.submit(cond, uncond, n, 1, settings, req.seed, key)
        logger.info("[%s] images: n %d, size %s, prompt %d tokens, stream %s", handle.request_id, n,
                    size_text(side), len(cond.ids), bool(req.stream))
        usage = ImageGenUsage.of(len(cond.ids), n * TOKENS_PER_FRAME)
        quality = req.output_compression if req.output_compression is not None else DEFAULT_QUALITY
        if req.stream:
            return self._stream(handle, side, fmt, quality, req.partial_images or 0, usage)
        tokens = await self._collect(handle, n)
        frames = await asyncio.to_thread(lambda: resize_frames(
            np.concatenate([self.drawer.decode(t) for t in tokens]), side))
        data = []
        for frame in frames:
            blob = await asyncio.to_thread(encode_image, frame, fmt, quality)
            if req.response_format == "url":
                name, _ = await asyncio.to_thread(self.outputs.put, blob, fmt)
                data.append(ImageData(url=f"{base_url.rstrip('/')}/v1/images/files/{name}"))
            else:
                data.append(ImageData(b64_json=base64.b64encode(blob).decode()))
        return ImagesResponse(created=common.now(), data=data, output_format=fmt, size=size_text(side), usage=usage)

    async def _collect(self, handle, n: int) -> list[list[int]]:  # noqa: ANN001 - a RequestHandle
        tokens: list[list[int]] = [[] for _ in range(n)]
        async for step in self.drawer.steps(handle):
            for r in range(n):
                tokens[r].append(int(step.tokens[r]))
        return tokens

    async def _stream(self, handle, side: int, fmt: str, quality: int, partials: int,  # noqa: ANN001
                      usage: ImageGenUsage) -> AsyncIterator[ImageCompletedEvent | ImagePartialEvent]:
        marks = {CODES_PER_FRAME * (i + 1) // (partials + 1): i for i in range(partials)}
        tokens: list[int] = []

        def encoded(frame: np.ndarray) -> str:
            frame = resize_frames(frame[None], side)[0]
            return base64.b64encode(encode_image(frame, fmt, quality)).decode()  # type: ignore[arg-type]

        async for step in self.drawer.steps(handle):
            tokens.append(int(step.tokens[0]))
            index = marks.get(len(tokens))
            if index is not None:
                codes = list(tokens)
                b64 = await asyncio.to_thread(lambda: encoded(self.drawer.decode_partial(codes)))
                yield ImagePartialEvent(b64_json=b64, created_at=common.now(), size=size_text(side),
                                        output_format=fmt, partial_image_index=index)  # type: ignore[arg-type]
        b64 = await asyncio.to_thread(lambda: encoded(self.drawer.decode(tokens)[0]))
        yield ImageCompletedEvent(b64_json=b64, created_at=common.now(), size=size_text(side),
                                  output_format=fmt, usage=usage)  # type: ignore[arg-type]
