"""One place for errors: exception -> OpenAI error body + HTTP status.

Code anywhere raises typed exceptions (`APIError` subclasses here, or the
domain errors of `model/` and `tokenizers/`); `to_api_error` maps each one to
`{"error": {"message", "type", "param", "code"}}` with its status. Handlers never
build error dicts. Request validation errors are rewritten into one readable
sentence with `param` naming the field (never pydantic's raw output), with
status 400 as OpenAI answers. Anything unmapped is a bug: 500, logged with its
traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lwm_serve.model.generation import ContextLengthError
from lwm_serve.server.engine.request import SessionLimitError
from lwm_serve.server.engine.scheduler import QueueFullError, SchedulerClosedError
from lwm_serve.server.schemas.common import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its OpenAI wire form. Subclasses fix status and type."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class InvalidRequestError(APIError):
    status, type = 400, "invalid_request_error"


class UnsupportedFeatureError(InvalidRequestError):
    """A real OpenAI feature this server does not implement: rejected, never ignored."""

    default_code = "unsupported_feature"


class NotFoundError(APIError):
    status, type, default_code = 404, "invalid_request_error", "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"

    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(f"The model {model!r} does not exist; this server serves {list(available)}",
                         param="model")


class PayloadTooLargeError(APIError):
    status, type, default_code = 413, "invalid_request_error", "file_too_large"


class UnsupportedMediaTypeError(APIError):
    status, type, default_code = 415, "invalid_request_error", "unsupported_media_type"


class AuthenticationError(APIError):
    status, type, default_code = 401, "invalid_request_error", "invalid_api_key"


class TooManySessionsError(APIError):
    """Every allowed session name is in use (pins are bounded): release one first."""
    status, type, default_code = 429, "invalid_request_error", "too_many_sessions"


class ServiceUnavailableError(APIError):
    status, type, default_code = 503, "server_error", "service_unavailable"


def _domain_error_types() -> tuple[type[Exception], ...]:
    """Exceptions that are the client's fault or load (not bugs): mapped, never 500."""
    from lwm_serve.tokenizers.chat_template import TemplateError
    from lwm_serve.tokenizers.errors import MediaError
    from lwm_serve.server.stores.files import FileStoreError
    from lwm_serve.tokenizers.text import TokenizerError
    from lwm_serve.tokenizers.vision_layout import VisionLayoutError

    return (ContextLengthError, QueueFullError, SchedulerClosedError, TemplateError, TokenizerError, MediaError, FileStoreError,
            VisionLayoutError, SessionLimitError)


def _media_or_file_error(exc: BaseException, param: str | None) -> APIError | None:
    """Uploads and media: 404 unknown file, 413 too large, 415 unsupported type, else 400."""
    from lwm_serve.server.stores import files
    from lwm_serve.tokenizers import errors as media

    if isinstance(exc, files.FileNotFound):
        return NotFoundError(str(exc), param=param or "file_id", code="file_not_found")
    if isinstance(exc, files.FileTooLarge):
        return PayloadTooLargeError(str(exc), param=param or "file")
    if isinstance(exc, files.EmptyFile):
        return InvalidRequestError(str(exc), param=param or "file", code="empty_file")
    codes: list[tuple[type[Exception], str]] = [
        (media.EmptyMediaError, "empty_media"), (media.CorruptMediaError, "corrupt_media"),
        (media.NoVideoStreamError, "no_video_stream"), (media.MediaTooLongError, "media_too_long")]
    if isinstance(exc, media.MediaTooLargeError):
        return PayloadTooLargeError(str(exc), param=param, code="too_many_pixels")
    if isinstance(exc, media.UnsupportedMediaError):
        return UnsupportedMediaTypeError(str(exc), param=param)
    for cls, code in codes:
        if isinstance(exc, cls):
            return InvalidRequestError(str(exc), param=param, code=code)
    if isinstance(exc, media.MediaError):
        return InvalidRequestError(str(exc), param=param, code="invalid_media")
    return None


def to_api_error(exc: BaseException, *, param: str | None = None) -> APIError:
    """Maps any exception to its APIError (500 for unknown ones, i.e. bugs).

    Args:
        exc: what was raised.
        param: request field the error belongs to, when the caller knows it.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return InvalidRequestError(str(exc), param=param or "messages", code="context_length_exceeded")
    if isinstance(exc, QueueFullError):
        return ServiceUnavailableError(str(exc), code="queue_full",
                                       headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, SessionLimitError):
        return TooManySessionsError(str(exc), param=param or "session")
    if isinstance(exc, SchedulerClosedError):  # draining, or the engine (a multi-host process) is gone
        return ServiceUnavailableError(str(exc), headers={"Retry-After": "5"})
    mapped = _media_or_file_error(exc, param)
    if mapped is not None:
        return mapped
    if isinstance(exc, _domain_error_types()[3:]):
        return InvalidRequestError(str(exc), param=param)  # tokenizer/template/media: the request's fault
    return APIError("internal server error (this is a bug; it was logged)", code="internal_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


def _is_union_tag(part: str) -> bool:
    # pydantic names union branches in `loc`: "str", "list[int]", "function-after[...]",
    # or a model class name; our field names are snake_case.
    return (part in _TYPE_TAGS or "[" in part or part[:1].isupper()
            or part.startswith(("function-", "constrained-", "json-or-python", "lax-or-strict")))


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not _is_union_tag(p):
            out += f".{p}" if out else p
    return out or None


def validation_error(exc: RequestValidationError, *, prefix: str | None = None) -> InvalidRequestError:
    """One readable sentence from pydantic errors (the first, plus how many more).

    Args:
        exc: the validation errors.
        prefix: where the validated object sits in the request (e.g.
            "messages[0].content[1].video_url"), prepended to the field's name.
    """
    errors = list(exc.errors())
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "")
        return InvalidRequestError(f"the request body is not valid JSON ({detail})".replace(" ()", ""),
                                   code="invalid_json")
    param = _param_from_loc(first.get("loc", ()))
    if prefix:
        param = f"{prefix}.{param}" if param else prefix
    if kind == "missing":
        message = f"'{param}' is a required property" if param else "a required property is missing"
    elif param is None and kind in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object"
    elif _is_union_mismatch(errors, param):
        message = f"'{param}' does not match any accepted type"
        shown = _short(first.get("input"))
        if shown is not None:
            message += f" (got {shown})"
    else:
        msg = str(first.get("msg", "invalid value"))
        message = f"'{param}': {msg}" if param else msg
        if "input" in first and kind not in ("extra_forbidden",):
            shown = _short(first["input"])
            if shown is not None:
                message += f" (got {shown})"
    if len(errors) > 1 and not _is_union_mismatch(errors, param):
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return InvalidRequestError(message, param=param)


def _is_union_mismatch(errors: list[Any], param: str | None) -> bool:
    """Every error is about the same field, tried against the branches of a union
    (e.g. `prompt`: string | list of strings | list of ids): one sentence is clearer."""
    if param is None or len(errors) < 2:
        return False
    locs = [tuple(e.get("loc", ())) for e in errors]
    same_field = all((_param_from_loc(loc) or "").startswith(param) for loc in locs)
    tagged = any(isinstance(p, str) and _is_union_tag(p) for loc in locs for p in loc)
    return same_field and tagged


def _short(value: Any) -> str | None:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return None
    return text if len(text) <= 60 else text[:57] + "..."


CLIENT_CLOSED = 499  # nginx's code: the client closed the request before the answer


def loggable(text: str) -> str:
    """`text` with control characters escaped: a request path cannot forge log lines."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        log = logger.warning if exc.status >= 500 else logger.info
        log("%s %s -> %d %s", request.method, loggable(request.url.path), exc.status, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        logger.info("%s %s -> 400 %s", request.method, loggable(request.url.path), err.message)
        return error_response(err)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, exc: ClientDisconnect) -> Response:
        # Not a bug: the client went away mid-body (a cut upload). Nobody reads this
        # answer; its status is what metrics and access logs count.
        logger.info("%s %s -> %d the client closed the request mid-body", request.method,
                    loggable(request.url.path), CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: AuthenticationError, 404: NotFoundError, 503: ServiceUnavailableError}
        cls = kinds.get(exc.status_code, InvalidRequestError if exc.status_code < 500 else APIError)
        err = cls(str(exc.detail))
        err.status = exc.status_code
        err.headers = dict(exc.headers or {})
        return error_response(err)

    # Domain errors get their own handlers: the catch-all below runs in Starlette's
    # ServerErrorMiddleware, which re-raises (and logs a traceback) after answering.
    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        logger.info("%s %s -> %d %s", request.method, loggable(request.url.path), err.status, err.message)
        return error_response(err)

    for cls in _domain_error_types():
        app.add_exception_handler(cls, _domain)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        if err.status >= 500:
            logger.exception("unhandled error in %s %s", request.method, loggable(request.url.path), exc_info=exc)
            # After a bug the connection's state is unknown (a body half read): do not reuse it.
            err.headers = {**err.headers, "Connection": "close"}
        return error_response(err)
