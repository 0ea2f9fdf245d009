"""Wire types of /v1/completions (legacy text completions)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lwm_serve.server.schemas.chat import FinishReason
from lwm_serve.server.schemas.common import MAX_TOKENS, MAX_TOP_K, TOP_K_DOC, OpenAIBaseModel, ResponseModel, StreamOptions, UsageInfo


class CompletionRequest(OpenAIBaseModel):
    """OpenAI's CreateCompletionRequest, plus vLLM-style extras (`top_k`, `ignore_eos`).

    `prompt`: a string, a list of strings, a list of token ids, or a list of
    token-id lists; several prompts give `len(prompts) * n` choices, choice
    `i * n + j` being prompt i's j-th sample (OpenAI's order).
    """

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Real OpenAI features not implemented here: rejected by the handler.
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)
    logit_bias: dict[str, float] | None = None
    # Extras.
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description=TOP_K_DOC)
    ignore_eos: bool = False

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, message) for every requested feature this server does not implement."""
        out: list[tuple[str, str]] = []
        if self.suffix:
            out.append(("suffix", "suffix (insertion) is not supported by this server"))
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", "best_of other than n is not supported by this server"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported by this server"))
        return out


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(ResponseModel):
    """Also the stream chunk (OpenAI streams the same object, finish_reason null until the end)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Field(None, exclude_if=lambda v: v is None)
