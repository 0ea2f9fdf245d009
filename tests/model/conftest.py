"""Reference sets for the model tests: the public fixture set and a generated one.

Every test that checks the model against reference outputs runs on both sets
(`reference_set` fixture; `forward_case` / `generation_case` parameters), and
reads each fact (sizes, layouts, file names, cases) from the set's own
config.json, manifest.json and cases, never from the public set's values. The
second set (tests/model/reference_sets.py) differs from the public one in every
size, in the primary file's layout and in record order, so a test cannot pass
only because of the public set's literals.

Cases are found from the files: every `cases/*/case.json` (each must have its
data.npz, or collection fails) whose arrays look like a forward case (logits of
both heads) or a generation case (output ids or image tokens).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "lwm_reference"
SET_NAMES = ("public", "generated")

_spec = importlib.util.spec_from_file_location("lwm_test_reference_sets",
                                               Path(__file__).with_name("reference_sets.py"))
reference_sets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_sets)  # type: ignore[union-attr]


@functools.cache
def get_reference_set(name: str):
    """The named reference set (the generated one is written once per session)."""
    if name == "public":
        return reference_sets.ReferenceSet(name, REFERENCE)
    if name == "generated":
        root = Path(tempfile.mkdtemp(prefix="lwm_generated_reference_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        return reference_sets.ReferenceSet(name, reference_sets.generate_reference_set(root))
    raise KeyError(name)


def _set_of_root(root: Path):
    for name in SET_NAMES:
        rs = get_reference_set(name)
        if rs.root == root:
            return rs
    raise KeyError(f"no reference set at {root}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "forward_case" in metafunc.fixturenames:
        # (case dir, params file, that file's layer layout); the set is the case's root
        runs = []
        for s in SET_NAMES:
            rs = get_reference_set(s)
            runs += [(d, f, rs.files[f]["scan_layers"]) for d, f in rs.forward_runs()]
        metafunc.parametrize("forward_case", runs,
                             ids=[f"{d.parents[1].name}-{d.name}-{f}" for d, f, _ in runs])
    if "generation_case" in metafunc.fixturenames:
        chosen = [d for s in SET_NAMES for d in get_reference_set(s).generation_cases()]
        metafunc.parametrize("generation_case", chosen,
                             ids=[f"{d.parents[1].name}-{d.name}" for d in chosen])


def _case_set(request: pytest.FixtureRequest):
    """The set of the test's forward/generation case, else the public set."""
    callspec = getattr(request.node, "callspec", None)
    for name in ("forward_case", "generation_case"):
        if callspec is not None and name in callspec.params:
            value = callspec.params[name]
            case_dir = value[0] if isinstance(value, tuple) else value
            return _set_of_root(case_dir.parents[1])
    return get_reference_set("public")


@pytest.fixture(scope="session", params=SET_NAMES)
def reference_set(request):
    """Each reference set in turn (see the module docstring)."""
    return get_reference_set(request.param)


@pytest.fixture(scope="session")
def public_set():
    """The public reference set, for tests that need a model but check no reference output."""
    return get_reference_set("public")


@pytest.fixture
def reference_params(request):
    """`reference_params(name=None, dtype="float32")`: a params file of the test case's
    set (the public set outside case tests; default: the primary fp32 file), cached."""
    return _case_set(request).params


@pytest.fixture
def reference_config(request):
    """`reference_config(scan_layers=None)`: the ModelConfig of the test case's set (the
    public set outside case tests)."""
    return _case_set(request).config


@pytest.fixture
def reference_case_set(request):
    """The ReferenceSet of the test's forward/generation case."""
    return _case_set(request)
