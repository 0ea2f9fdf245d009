"""Wire types of POST /v1/video/questions (multipart in, JSON or SSE out)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lwm_serve.server.schemas.common import ResponseModel
from lwm_serve.server.schemas.common import MAX_TOKENS, MAX_TOP_K, SESSION_DOC, TOP_K_DOC
from lwm_serve.server.schemas.media import MediaSampling
from lwm_serve.tokenizers.vision_layout import CODES_PER_FRAME, TOKENS_PER_FRAME

FinishReason = Literal["stop", "length"]
_OMIT_NONE = dict(default=None, exclude_if=lambda v: v is None)


class VideoQuestionForm(MediaSampling):
    """The form fields (besides the `file` upload); the sampling options are the chat
    parts' (`MediaSampling`), given as form strings."""

    question: str = Field(min_length=1, description="what to ask about the video or image")
    file_id: str | None = Field(None, description="a stored file (POST /v1/files) instead of an upload")
    url: str | None = Field(None, description="a data URL or an allowed http(s) URL instead of an upload")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description=TOP_K_DOC)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    store: bool = Field(False, description="keep the upload as a file (its id is in the answer)")
    session: str | None = Field(None, min_length=1, max_length=128, description=SESSION_DOC)


class FrameInfo(ResponseModel):
    index: int
    timestamp: float = Field(description="presentation time of the frame, seconds")


class SamplingUsed(ResponseModel):
    fps: float | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    auto_adjusted: bool = Field(False, description="auto_fps lowered the requested sampling to fit the context")


class MediaDetails(ResponseModel):
    kind: Literal["image", "video"]
    file_id: str | None = None
    sha256: str
    frames: list[FrameInfo]
    sampling: SamplingUsed
    cached: bool = Field(description="the frame codes came from the cache (nothing decoded or encoded)")


class VideoUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    vision_tokens: int = Field(description=f"frames x {TOKENS_PER_FRAME} ({CODES_PER_FRAME} VQGAN codes + a delimiter)")
    frames: int


class VideoAnswer(ResponseModel):
    id: str
    object: Literal["video.answer"] = "video.answer"
    created: int
    model: str
    answer: str
    finish_reason: FinishReason
    usage: VideoUsage
    media: MediaDetails


class VideoAnswerChunk(ResponseModel):
    """One SSE data event; the last one carries finish_reason, usage and media."""

    id: str
    object: Literal["video.answer.chunk"] = "video.answer.chunk"
    created: int
    model: str
    delta: str
    finish_reason: FinishReason | None = None
    usage: VideoUsage | None = Field(**_OMIT_NONE)
    media: MediaDetails | None = Field(**_OMIT_NONE)


def _form_schema() -> dict:
    """The form's JSON schema (bounds included) with the upload added."""
    schema = VideoQuestionForm.model_json_schema()
    return {"type": "object", "required": schema.get("required", []),
            "properties": {"file": {"type": "string", "format": "binary", "description": "the video or image"},
                           **schema["properties"]}}


VIDEO_QUESTION_DOC = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _form_schema()}}}}


class VideoPlanRequest(MediaSampling):
    """POST /v1/video/plan: what a question about this media would cost (nothing decoded;
    `auto_fps` changes nothing here: a plan that does not fit names the sampling that does)."""

    file_id: str | None = Field(None, description="a stored file")
    url: str | None = Field(None, description="a data URL or an allowed http(s) URL")
    question: str = Field("", description="the question (its tokens count too)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="the completion budget to leave room for")


class VideoPlan(ResponseModel):
    object: Literal["video.plan"] = "video.plan"
    kind: Literal["image", "video"]
    duration_s: float | None = Field(None, description="the video's duration (from its container)")
    frames: int = Field(description="frames the sampling takes (exact when cached, else estimated)")
    vision_tokens: int
    prompt_tokens: int
    max_tokens: int = Field(description="new tokens counted (max_tokens, or 1 when not given)")
    context: int
    fits: bool
    cached: bool
    suggested_max_frames: int | None = Field(None, description="when it does not fit: most frames that do")
    suggested_fps: float | None = Field(None, description="when it does not fit: an fps giving about that many")
    frame_timestamps: list[float] | None = Field(None, description=(
        "video: the times (seconds) of the frames the sampling takes, exact when cached, else estimated "
        "from the container's duration at a constant frame rate (previews); null for an image or when "
        "the container tells neither"))
