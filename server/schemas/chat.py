"""Wire types of /v1/chat/completions (requests, responses, stream chunks)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lwm_serve.server.schemas.common import MAX_TOKENS, MAX_TOP_K, SESSION_DOC, TOP_K_DOC, OpenAIBaseModel, ResponseModel, StreamOptions, UsageInfo

FinishReason = Literal["stop", "length"]
_OMIT_NONE = dict(default=None, exclude_if=lambda v: v is None)


class ContentPart(BaseModel):
    """One part of a message's content: `text`, `image_url`, `video_url` or `file`
    (see `handlers.media_parts`); other types are rejected by name. Extras (the
    per-part sampling options fps, max_frames, start, end, auto_fps) are kept."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(OpenAIBaseModel):
    """OpenAI's CreateChatCompletionRequest, plus vLLM-style extras (`top_k`, `ignore_eos`)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="deprecated alias of max_completion_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Real OpenAI features not implemented here: declared so that they are rejected, not ignored.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Extras (the SDK's extra_body), as vLLM names them.
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description=TOP_K_DOC)
    ignore_eos: bool = Field(False, description="extra: keep generating after the end-of-sequence token")
    session: str | None = Field(None, min_length=1, max_length=128, description=SESSION_DOC)
    auto_fps: bool | None = Field(None, description=(
        "extra: when the request's videos do not fit the context, sample fewer frames instead of a 400 "
        "(default: the server's auto_fps setting)"))

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, message) for every requested feature this server does not implement."""
        out: list[tuple[str, str]] = []
        if self.tools:
            out.append(("tools", "tools (function calling) are not supported by this server"))
        if self.tool_choice not in (None, "none"):
            out.append(("tool_choice", "tool_choice is not supported by this server (tools are not supported)"))
        if self.functions:
            out.append(("functions", "functions (function calling) are not supported by this server"))
        if self.function_call not in (None, "none"):
            out.append(("function_call", "function_call is not supported by this server"))
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            kind = self.response_format.get("type")
            out.append(("response_format", f"response_format type {kind!r} is not supported; only 'text' is"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported by this server"))
        if self.audio is not None:
            out.append(("audio", "audio output is not supported by this server"))
        if self.modalities and set(self.modalities) != {"text"}:
            out.append(("modalities", f"modalities {self.modalities} are not supported by chat completions; "
                        "only ['text'] is: generate images with POST /v1/images/generations and videos with "
                        "POST /v1/videos"))
        if self.prediction is not None:
            out.append(("prediction", "predicted outputs are not supported by this server"))
        if self.web_search_options is not None:
            out.append(("web_search_options", "web search is not supported by this server"))
        return out


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = Field(**_OMIT_NONE)
    content: str | None = Field(**_OMIT_NONE)


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    # Present (possibly null) only when the client asked for stream usage.
    usage: UsageInfo | None = None
