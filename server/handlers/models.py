"""/v1/models: the one model this server serves."""

from __future__ import annotations

from lwm_serve.server.errors import ModelNotFoundError
from lwm_serve.server.schemas.models import ModelCard, ModelList


class ModelsHandler:
    def __init__(self, model_name: str, created: int) -> None:
        self.card = ModelCard(id=model_name, created=created)

    def list(self) -> ModelList:
        return ModelList(data=[self.card])

    def get(self, model_id: str) -> ModelCard:
        if model_id != self.card.id:
            raise ModelNotFoundError(model_id, [self.card.id])
        return self.card
