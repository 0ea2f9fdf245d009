"""The per-media sampling options (fps, max_frames, start, end, auto_fps): declared once.

Every way a request names a video uses this model: the chat parts' extras
(`handlers.media_parts`), the `/v1/video/questions` form and the `/v1/video/plan`
body; `spec()` turns it into the tokenizers' `SamplingSpec`, which is what the
frame sampler and the code cache key read. Every number is bounded here, at the
schema, so that no value reaches arithmetic that overflows (a 400-digit `fps`)
or an int32 array.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lwm_serve.server.schemas.common import OpenAIBaseModel
from lwm_serve.tokenizers.frame_sampling import DEFAULT_MAX_FRAMES, MAX_FPS, MAX_FRAMES, MAX_SECONDS, SamplingSpec

OPTION_NAMES: tuple[str, ...] = ("fps", "max_frames", "start", "end", "auto_fps")
_KIND = {"fps": f"a positive number of frames per second, at most {MAX_FPS:g}",
         "max_frames": f"a positive integer, at most {MAX_FRAMES}",
         "start": f"a non-negative number of seconds, at most {MAX_SECONDS:g}",
         "end": f"a non-negative number of seconds, at most {MAX_SECONDS:g}",
         "auto_fps": "a boolean"}


class MediaSampling(OpenAIBaseModel):
    """Which frames of a video to take. Without fps or max_frames: the reference's 8
    uniform frames; with fps alone: one frame every 1/fps seconds, no cap. A still
    image is one frame whatever these say."""

    fps: float | None = Field(None, gt=0, le=MAX_FPS, description=(
        f"frames per second to sample (at most {MAX_FPS:g}: more than any video has gives each frame once)"))
    max_frames: int | None = Field(None, ge=1, le=MAX_FRAMES, description=(
        f"most frames, taken uniformly (default {DEFAULT_MAX_FRAMES} when fps is not given)"))
    start: float | None = Field(None, ge=0, le=MAX_SECONDS, description="range start, seconds")
    end: float | None = Field(None, ge=0, le=MAX_SECONDS, description="range end, seconds")
    auto_fps: bool | None = Field(None, description=(
        "true: sample fewer frames when the video does not fit the context (default: the server's setting)"))

    @field_validator(*OPTION_NAMES, mode="wrap")
    @classmethod
    def _one_sentence(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: Any) -> Any:
        if value is None or value == "":  # an empty form field means "not given"
            return None
        if isinstance(value, bool) and info.field_name != "auto_fps":
            value = "not-a-number"  # JSON true is no number of frames
        try:
            out = handler(value)
        except ValidationError:
            out = None
        if out is None or (isinstance(out, float) and not math.isfinite(out)):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise PydanticCustomError("sampling_value", "must be {kind} (got {shown})",
                                      {"kind": _KIND[info.field_name], "shown": shown})
        return out

    @model_validator(mode="after")
    def _range_in_order(self) -> "MediaSampling":
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self

    def sampling(self) -> "MediaSampling":
        """Only the sampling options (for a subclass that carries other fields too)."""
        return MediaSampling.model_validate(self.model_dump(include=set(OPTION_NAMES)))

    def spec(self) -> SamplingSpec:
        """The frame sampler's spec (the defaults applied)."""
        max_frames = self.max_frames
        if max_frames is None and self.fps is None:
            max_frames = DEFAULT_MAX_FRAMES
        return SamplingSpec(max_frames=max_frames, fps=self.fps, start=self.start, end=self.end)
