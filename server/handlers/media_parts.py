"""Chat messages -> text + media parts (pure: nothing is fetched or decoded here).

Accepted content parts:
  * `{"type": "text", "text": ...}`
  * `{"type": "image_url", "image_url": {"url": <data URL | file id | http(s) URL>}}`
  * `{"type": "video_url", "video_url": {"url": ...}}` (vLLM's spelling)
  * `{"type": "file", "file": {"file_id": "file-..."}}` (OpenAI's file part; image or video)
Sampling extras `fps`, `max_frames`, `start`, `end`, `auto_fps` may sit on the
part or inside its `image_url`/`video_url`/`file` object (the inner one wins).

Where media goes (the prompt rule): a user message's text parts are joined
with newlines into its question, and its media follow that text in the order
the parts appear: `USER: {text}\\n<vision>..</vision><vision>..</vision>`. This is
the reference's single-turn layout (question, then the vision segment, then
` ASSISTANT:`), which is what LWM was trained on, whatever order the client
put its parts in. Only user messages may carry media.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from lwm_serve.server.errors import InvalidRequestError, UnsupportedFeatureError, validation_error
from lwm_serve.server.schemas.chat import ChatMessage, ContentPart
from lwm_serve.server.schemas.media import OPTION_NAMES, MediaSampling

MediaKind = Literal["image", "video", "file"]
_MEDIA_TYPES: dict[str, MediaKind] = {"image_url": "image", "video_url": "video", "file": "file"}


@dataclass(frozen=True)
class MediaPart:
    kind: MediaKind
    url: str  # data URL, file id or http(s) URL
    options: MediaSampling
    param: str  # e.g. "messages[0].content[1]"


@dataclass
class ParsedMessage:
    role: Literal["system", "user", "assistant"]
    text: str
    media: list[MediaPart] = field(default_factory=list)


def parse_messages(messages: Sequence[ChatMessage]) -> list[ParsedMessage]:
    """Wire messages -> (role, text, media), rejecting tool turns and unknown part types."""
    out = []
    for i, m in enumerate(messages):
        if m.role in ("tool", "function"):
            raise UnsupportedFeatureError(
                f"messages with role {m.role!r} are not supported (tools are not supported)",
                param=f"messages[{i}].role")
        if m.tool_calls:
            raise UnsupportedFeatureError("assistant tool_calls are not supported (tools are not supported)",
                                          param=f"messages[{i}].tool_calls")
        role = "system" if m.role == "developer" else m.role
        text, media = _content(m, i)
        if media and role != "user":
            raise InvalidRequestError(f"only user messages may carry images or video (this one is {m.role!r})",
                                      param=media[0].param)
        out.append(ParsedMessage(role, text, media))  # type: ignore[arg-type]
    return out


def _content(message: ChatMessage, index: int) -> tuple[str, list[MediaPart]]:
    content = message.content
    if content is None:
        if message.role == "user":
            raise InvalidRequestError("a user message needs content", param=f"messages[{index}].content")
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    media: list[MediaPart] = []
    for j, part in enumerate(content):
        param = f"messages[{index}].content[{j}]"
        if part.type == "text":
            if part.text is None:
                raise InvalidRequestError("a text content part needs 'text'", param=f"{param}.text")
            texts.append(part.text)
        elif part.type in _MEDIA_TYPES:
            media.append(media_part(part, param))
        else:
            raise UnsupportedFeatureError(f"content part type {part.type!r} is not supported; this server "
                                          "reads text, image_url, video_url and file parts",
                                          param=f"{param}.type")
    return "\n".join(texts), media


def media_part(part: ContentPart, param: str) -> MediaPart:
    """One image_url / video_url / file part -> MediaPart (URL + sampling options)."""
    kind = _MEDIA_TYPES[part.type]
    extra = dict(part.model_extra or {})
    inner = extra.pop(part.type, None)
    where = f"{param}.{part.type}"
    if isinstance(inner, str):  # a bare URL string, as some clients send
        url, inner_opts = inner, {}
    elif isinstance(inner, dict):
        inner_opts = dict(inner)
        if kind == "file":
            url = inner_opts.pop("file_id", None) or inner_opts.pop("file_data", None)
        else:
            url = inner_opts.pop("url", None)
    else:
        raise InvalidRequestError(f"a {part.type} part needs a {part.type!r} object", param=where)
    if not isinstance(url, str) or not url:
        field_name = "file_id" if kind == "file" else "url"
        raise InvalidRequestError(f"a {part.type} part needs '{field_name}'", param=f"{where}.{field_name}")
    options = {k: extra[k] for k in OPTION_NAMES if k in extra}
    options.update({k: inner_opts[k] for k in OPTION_NAMES if k in inner_opts})
    return MediaPart(kind, url, sampling_options(options, where), param)


def sampling_options(raw: dict[str, Any], param: str) -> MediaSampling:
    """Validated sampling options from loosely typed values (JSON part extras).

    Raises:
        InvalidRequestError: one sentence naming the field (`{param}.fps`, ...).
    """
    try:
        return MediaSampling.model_validate({k: raw[k] for k in OPTION_NAMES if k in raw})
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors()), prefix=param) from None
