"""Depends getters: the handlers built at startup, read from `app.state`."""

from __future__ import annotations

from fastapi import Request

from lwm_serve.server.errors import ServiceUnavailableError
from lwm_serve.server.handlers.chat import ChatHandler
from lwm_serve.server.handlers.completions import CompletionHandler
from lwm_serve.server.handlers.files import FilesHandler
from lwm_serve.server.handlers.models import ModelsHandler
from lwm_serve.server.handlers.video_questions import VideoQuestionHandler
from lwm_serve.server.services import Services


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise ServiceUnavailableError("the model is still loading", code="model_loading",
                                      headers={"Retry-After": "5"})
    return services


def get_chat_handler(request: Request) -> ChatHandler:
    return get_services(request).chat


def get_completion_handler(request: Request) -> CompletionHandler:
    return get_services(request).completions


def get_models_handler(request: Request) -> ModelsHandler:
    return get_services(request).models


def get_files_handler(request: Request) -> FilesHandler:
    return get_services(request).files


def get_video_handler(request: Request) -> VideoQuestionHandler:
    return get_services(request).video
