"""Wire types of /v1/models."""

from __future__ import annotations

from typing import Literal

from lwm_serve.server.schemas.common import ResponseModel


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lwm-serve"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
