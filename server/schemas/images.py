"""Wire types of /v1/images/generations (OpenAI's CreateImageRequest, ImagesResponse,
ImageGenStreamEvent), plus LWM's knobs as extras."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lwm_serve.server.schemas.common import OpenAIBaseModel, ResponseModel

ImageOutputFormat = Literal["png", "webp", "jpeg"]
MAX_IMAGES = 10  # OpenAI's bound on n


class ImageGenerationRequest(OpenAIBaseModel):
    """OpenAI's CreateImageRequest.

    `size`: "auto" or a square "NxN" (see `frame_generation.output_side`).
    Extras: `cfg_scale`, `temperature`, `top_k` (LWM's image knobs; defaults the
    reference's image settings), `key_source` ("server" | "reference": see
    `handlers.frame_generation`).
    """

    prompt: str = Field(max_length=32000)
    model: str | None = None
    n: int | None = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: ImageOutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: str | None = None
    background: str | None = None
    style: str | None = None
    moderation: str | None = None
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)
    user: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**32, description="extra: the draw's random seed")
    cfg_scale: float | None = Field(None, description="extra: classifier-free guidance scale (default 5.0)")
    temperature: float | None = Field(None, description="extra: sampling temperature (default 1.0)")
    top_k: int | None = Field(None, description="extra: sample among the k most likely codes (default 8192)")
    key_source: Literal["server", "reference"] = Field(
        "server", description="extra: 'reference' draws with LWM's own key chain for `seed`")

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
        if self.quality not in (None, "auto", "standard"):
            out.append(("quality", f"quality {self.quality!r} is not supported; this model has one quality (auto)"))
        if self.background not in (None, "auto", "opaque"):
            out.append(("background", f"background {self.background!r} is not supported; images are opaque"))
        if self.style is not None:
            out.append(("style", "style (a dall-e-3 option) is not supported by this model"))
        return out


class ImageGenUsageInputDetails(ResponseModel):
    text_tokens: int
    image_tokens: int = 0


class ImageGenUsage(ResponseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: ImageGenUsageInputDetails

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int) -> "ImageGenUsage":
        return cls(input_tokens=input_tokens, output_tokens=output_tokens,
                   total_tokens=input_tokens + output_tokens,
                   input_tokens_details=ImageGenUsageInputDetails(text_tokens=input_tokens))


class ImageData(ResponseModel):
    b64_json: str | None = Field(None, exclude_if=lambda v: v is None)
    url: str | None = Field(None, exclude_if=lambda v: v is None)


class ImagesResponse(ResponseModel):
    created: int
    data: list[ImageData]
    output_format: ImageOutputFormat
    size: str
    usage: ImageGenUsage


class _ImageStreamEvent(ResponseModel):
    """The fields OpenAI's two image-generation stream events share."""

    b64_json: str
    created_at: int
    size: str
    quality: Literal["auto"] = "auto"
    background: Literal["opaque"] = "opaque"
    output_format: ImageOutputFormat


class ImagePartialEvent(_ImageStreamEvent):
    """OpenAI's ImageGenPartialImageEvent: the code rows sampled so far, the rest black."""

    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    partial_image_index: int


class ImageCompletedEvent(_ImageStreamEvent):
    """OpenAI's ImageGenCompletedEvent."""

    type: Literal["image_generation.completed"] = "image_generation.completed"
    usage: ImageGenUsage
