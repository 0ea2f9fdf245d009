"""Wire types of /v1/sessions (prefills kept warm by name: the `session` request extra)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lwm_serve.server.schemas.common import ResponseModel


class SessionList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[str] = Field(description="session names pinning prefills now")
    max_sessions: int = Field(description="most names allowed at once (--max-sessions)")


class SessionDeleted(ResponseModel):
    id: str
    object: Literal["session"] = "session"
    deleted: bool = True
