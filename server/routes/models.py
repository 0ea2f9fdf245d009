"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_models_handler
from lwm_serve.server.handlers.models import ModelsHandler
from lwm_serve.server.routes._docs import ERRORS
from lwm_serve.server.schemas.models import ModelCard, ModelList

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.get("/v1/models", response_model=ModelList)
async def list_models(handler: Annotated[ModelsHandler, Depends(get_models_handler)]) -> ModelList:
    """The models this server serves (one)."""
    return handler.list()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, handler: Annotated[ModelsHandler, Depends(get_models_handler)]) -> ModelCard:
    """One model by id (ids may contain '/'); 404 for any other id."""
    return handler.get(model_id)
