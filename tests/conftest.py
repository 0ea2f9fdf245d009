"""Shared test setup: 8 simulated CPU devices, fixture paths, tiny models.

XLA_FLAGS must be set before jax is first imported, so it is done here at
collection time: every test run (CI included) sees 8 CPU devices, and the
dense paths simply use the first one.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
LWM_REFERENCE = FIXTURES / "lwm_reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The copied LWM reference fixture set (byte-identical to the shared one)."""
    return LWM_REFERENCE
