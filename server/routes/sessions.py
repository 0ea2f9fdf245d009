"""GET /v1/sessions and DELETE /v1/sessions/{session}: the prefills a `session` keeps warm.

A chat or video-question request with `session: NAME` pins its prompt's prefill
in the prefix cache under NAME (later requests starting with that prompt, such
as follow-up questions about the same video, then prefill only what is new,
however many other prompts pass through the cache meanwhile). The pins stay
until the session is deleted here; at most --max-sessions names at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from lwm_serve.server.auth import require_api_key
from lwm_serve.server.deps import get_services
from lwm_serve.server.errors import NotFoundError
from lwm_serve.server.routes._docs import ERRORS
from lwm_serve.server.schemas.sessions import SessionDeleted, SessionList
from lwm_serve.server.services import Services

router = APIRouter(tags=["sessions"], dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.get("/v1/sessions", response_model=SessionList)
async def list_sessions(services: Annotated[Services, Depends(get_services)]) -> SessionList:
    """The session names pinning prefills now."""
    return SessionList(data=services.engine.sessions(), max_sessions=services.engine.max_sessions)


@router.delete("/v1/sessions/{session}", response_model=SessionDeleted)
async def delete_session(session: str, services: Annotated[Services, Depends(get_services)]) -> SessionDeleted:
    """Releases a session: its prefills become evictable again (404 for an unknown name)."""
    if not services.engine.release_session(session):
        raise NotFoundError(f"no session named {session!r}", param="session", code="session_not_found")
    return SessionDeleted(id=session)
