"""Property-based fuzzing of the server's own /openapi.json (schemathesis): for every
operation, cases generated from the schema (positive: valid by the schema; negative:
violating it) are sent to a live server; no answer may be a 5xx, and every 4xx is the
OpenAI error object.

CI runs LWM_FUZZ_EXAMPLES per operation and mode (default below, about a minute on a
2-core machine); `bench/fuzz_openapi.py` runs the same check with a larger count (the
acceptance run: >= 10,000 cases) and prints how many were sent.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

DEFAULT_EXAMPLES = 12


def fuzz_server(base_url: str, headers: dict[str, str], examples: int,
                on_case: Callable[[str, int], None] | None = None) -> tuple[Counter, list[str]]:
    """Sends `examples` generated cases per operation and mode; returns (statuses, failures)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    statuses: Counter = Counter()
    failures: list[str] = []
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            name = f"{operation.label} [{mode.value}]"

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(base_url=base_url, session=session, headers=headers, timeout=120)
                statuses[response.status_code] += 1
                if on_case is not None:
                    on_case(name, response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{name}: {response.status_code} for {case.as_curl_command()[:600]}")
                elif response.status_code >= 400:
                    body = response.json()
                    assert set(body["error"]) == {"message", "type", "param", "code"}, (name, body)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:  # nothing negative to generate for a parameterless route
                pass
    return statuses, failures


@pytest.fixture(scope="module")
def server(launch, vision_runtime):
    srv = launch(vision_runtime, media_url_allowlist=["127.0.0.1"], default_max_tokens=2)
    yield srv
    srv.stop()


def test_generated_requests_never_get_a_5xx(server, auth_headers, find_leftovers):
    examples = int(os.environ.get("LWM_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
    statuses, failures = fuzz_server(server.base_url, auth_headers, examples)
    if os.environ.get("LWM_FUZZ_REPORT"):  # bench/fuzz_openapi.py reads it
        with open(os.environ["LWM_FUZZ_REPORT"], "w") as f:
            json.dump({"examples_per_operation_and_mode": examples, "cases": sum(statuses.values()),
                       "statuses": {str(k): v for k, v in sorted(statuses.items())}, "failures": failures}, f)
    assert not failures, "\n".join(failures[:10])
    assert sum(statuses.values()) >= examples * 10  # every operation was exercised
    assert any(400 <= s < 500 for s in statuses) and any(s < 300 for s in statuses), statuses
    assert find_leftovers(server.data_dir) == []
    assert requests.get(f"{server.base_url}/ready", timeout=30).status_code == 200
