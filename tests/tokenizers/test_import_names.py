"""Our `tokenizers/` folder is importable only as `lwm_serve.tokenizers`, never as bare `tokenizers`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lwm_serve.tokenizers

REPO = Path(__file__).resolve().parents[2]


def test_lwm_serve_tokenizers_is_our_folder() -> None:
    assert Path(lwm_serve.tokenizers.__file__).resolve().parent == REPO / "tokenizers"


def test_bare_tokenizers_does_not_resolve_into_the_repo() -> None:
    spec = importlib.util.find_spec("tokenizers")
    if spec is not None:
        locations = [spec.origin, *(spec.submodule_search_locations or [])]
        for location in filter(None, locations):
            assert not Path(location).resolve().is_relative_to(REPO), location
