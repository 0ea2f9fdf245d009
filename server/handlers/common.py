"""Request checks and translations shared by the chat and completions handlers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from lwm_serve.model.generation import ContextLengthError
from lwm_serve.model.sampling import SamplingParams
from lwm_serve.server.errors import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError
from lwm_serve.server.schemas.common import StreamOptions

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class HandlerLimits:
    """Server-side limits the handlers enforce (from ServerSettings)."""

    default_max_tokens: int = 512
    max_batch: int = 16


def now() -> int:
    return int(time.time())


def check_model(requested: str | None, served: str) -> None:
    """A request may omit `model`; naming another model is a 404."""
    if requested and requested != served:
        raise ModelNotFoundError(requested, [served])


def reject_unsupported(problems: Sequence[tuple[str, str]]) -> None:
    if problems:
        param, message = problems[0]
        raise UnsupportedFeatureError(message, param=param)


def check_stream_options(stream: bool, options: StreamOptions | None) -> None:
    if options is not None and not stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")


def check_rows(rows: int, max_batch: int, param: str = "n") -> None:
    if rows > max_batch:
        raise InvalidRequestError(
            f"this request asks for {rows} sequences (prompts x n) but the server allows at most {max_batch}",
            param=param)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings as a list (validated)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}",
                                  param="stop")
    if any(s == "" for s in stops):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return stops


def sampling_params(*, temperature: float | None, top_p: float | None, top_k: int | None,
                    presence_penalty: float, frequency_penalty: float) -> SamplingParams:
    """OpenAI knobs -> SamplingParams (OpenAI defaults: temperature 1, top_p 1; top_k off)."""
    return SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=max(int(top_k or 0), 0),  # vLLM spells "off" as -1
        presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty),
    )


def resolve_max_tokens(requested: int | None, prompt_tokens: int, context_limit: int, default: int) -> int:
    """The request's new-token budget. Without one: `default`, capped by the free context.

    Raises:
        ContextLengthError: the prompt leaves no room (an explicit budget is
            checked against the context when the request is submitted).
    """
    if requested is not None:
        return requested
    free = context_limit - prompt_tokens
    if free < 1:
        raise ContextLengthError(prompt_tokens, 1, context_limit)
    return min(default, free)
