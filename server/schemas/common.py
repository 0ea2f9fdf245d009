"""Shared wire types: the request base model, usage, stream options, the error body."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)

# Bounds of integers that reach the model's int32 arrays (checked at the schema, so a
# 2^63 or a 400-digit number is a 400, never an overflow in a conversion).
INT32_MAX = 2**31 - 1
MAX_TOKENS = INT32_MAX  # any larger budget is refused by the context check anyway
MAX_TOP_K = INT32_MAX
TOP_K_DOC = ("extra: keep the k most likely tokens (0 or -1: off; a k at least the vocabulary size keeps "
             f"every token, so values are capped at {MAX_TOP_K})")


class OpenAIBaseModel(BaseModel):
    """Base of every request model: unknown fields are accepted and logged.

    As vLLM's `OpenAIBaseModel`: clients (the SDK's `extra_body`, LangChain)
    send fields this server does not know; refusing them would break them, so
    they are kept in `model_extra` and named in the log. Fields that are real
    OpenAI features we do not implement are declared and rejected by the
    handlers instead (never silently ignored).
    """

    # NaN and +-inf are no valid value of any field (Python's JSON parser lets them in).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_extra(self) -> "OpenAIBaseModel":
        if self.model_extra:
            logger.warning("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


class ResponseModel(BaseModel):
    """Base of response models (no extras; dumped as JSON)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens whose prefill was reused (the prefix cache)


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


def dump(model: BaseModel, *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """JSON-ready dict of a response model, without the named top-level keys."""
    out = model.model_dump(mode="json")
    for key in drop:
        out.pop(key, None)
    return out


SESSION_DOC = (
    "extra: keep this prompt's prefill pinned in the prefix cache under this name, so "
    "follow-up questions skip it even when other prompts push kept prefills out; released by "
    "DELETE /v1/sessions/{session} (at most --max-sessions names at once: 429 beyond)")
