"""The web playground: static HTML/CSS/JS shipped in the package, at / and /playground.

No build step and nothing fetched from elsewhere (the server may run offline):
the page is plain ES modules that talk to this server's own OpenAI-compatible
API with relative URLs (so it also works behind a path-prefixing proxy). The
page itself holds no secret and needs no key; the API calls it makes send the
key the user types (`config.json` tells it whether one is needed, so the page
asks before its first call instead of collecting a 401, and whether the model can
draw, so generation controls show only where a request would not be refused).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "playground"
ASSETS_PATH = "/playground/static"
_NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a server upgrade shows the new page at once

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def playground_page() -> FileResponse:
    """The page (index.html); its assets are under /playground/static/."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)


@router.get("/playground/config.json")
async def playground_config(request: Request) -> JSONResponse:
    """What the page needs before its first API call: whether to ask for a key, and
    which generation routes can answer (they are always mounted, but without a VQGAN
    they refuse every request; `null` while the model is still loading)."""
    settings = request.app.state.settings
    services = getattr(request.app.state, "services", None)
    generation = None
    if services is not None:
        can_draw = services.images.drawer.vqgan is not None
        generation = {"image": can_draw, "video": can_draw}
    return JSONResponse({"auth_required": bool(settings.accepted_keys), "version": request.app.version,
                         "generation": generation}, headers=_NO_CACHE)


def install_playground(app: FastAPI) -> None:
    """Adds the page routes and its static assets to `app`."""
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="playground-static")
