"""Bearer API keys (`Authorization: Bearer <key>`), as the OpenAI SDK sends them."""

from __future__ import annotations

import hmac

from fastapi import Request

from lwm_serve.server.errors import AuthenticationError


def check_bearer(header: str | None, keys: frozenset[str]) -> None:
    """Raises AuthenticationError unless `header` carries one of `keys` (no keys: open)."""
    if not keys:
        return
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer <key>'",
                                  headers={"WWW-Authenticate": "Bearer"})
    # Compare against every key in constant time (no early exit on a match).
    if not any([hmac.compare_digest(token.encode(), k.encode()) for k in keys]):
        raise AuthenticationError("invalid API key", headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request) -> None:
    """FastAPI dependency guarding the /v1 routes."""
    check_bearer(request.headers.get("authorization"), request.app.state.settings.accepted_keys)
