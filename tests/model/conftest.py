"""Reference-fixture discovery for the model tests.

Cases are found from the files: every `cases/*/data.npz` whose arrays look like
a forward case (logits of both heads) or a generation case (output ids or image
tokens). New cases in the same format are picked up without touching the tests.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "lwm_reference"


def _case_dirs() -> list[Path]:
    return sorted(p.parent for p in (REFERENCE / "cases").glob("*/case.json"))


def _arrays(case_dir: Path) -> dict[str, np.ndarray]:
    path = case_dir / "data.npz"
    return dict(np.load(path)) if path.exists() else {}


def is_forward_case(arrays: dict) -> bool:
    return "position_ids" in arrays and any(k.startswith("text_logits") for k in arrays)


def is_generation_case(case: dict, arrays: dict) -> bool:
    return "output_ids" in arrays or "image_tokens_257" in case


def case_checkpoint(case: dict) -> str:
    """Which params file a case was computed from (default: the scanned fp32 one)."""
    if "checkpoint" in case:
        return Path(case["checkpoint"]).name
    return case.get("computed_with", "params_scan")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    dirs = _case_dirs()
    cases = [(d, json.loads((d / "case.json").read_text()), _arrays(d)) for d in dirs]
    if "forward_case" in metafunc.fixturenames:
        # (case dir, params file, scanned layout?): a case computed from the
        # scanned fp32 file also runs from the per-layer file (same weights).
        runs = []
        for d, case, arrays in cases:
            if is_forward_case(arrays):
                name = case_checkpoint(case)
                runs.append((d, name, True))
                if name == "params_scan":
                    runs.append((d, "params_noscan", False))
        metafunc.parametrize("forward_case", runs,
                             ids=[f"{d.name}-{name}" for d, name, _ in runs])
    if "generation_case" in metafunc.fixturenames:
        chosen = [d for d, case, arrays in cases if is_generation_case(case, arrays)]
        metafunc.parametrize("generation_case", chosen, ids=[d.name for d in chosen])


@functools.cache
def _load_reference_params(name: str, dtype: str = "float32"):
    from lwm_serve.model.checkpoint import load_params
    return load_params(REFERENCE / "model" / name, dtype=dtype, progress=False)


@functools.cache
def _reference_config(scan_layers: bool = True):
    from lwm_serve.model.config import from_reference_json
    return from_reference_json(REFERENCE / "model" / "config.json", scan_layers=scan_layers)


@pytest.fixture
def reference_params():
    """`reference_params(name, dtype="float32")`: a fixture params file, cached."""
    return _load_reference_params


@pytest.fixture
def reference_config():
    """`reference_config(scan_layers=True)`: the fixture model's ModelConfig."""
    return _reference_config
