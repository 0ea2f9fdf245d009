"""Fuzz the server's own /openapi.json at scale (schemathesis, positive + negative cases).

Runs tests/server/test_openapi_fuzz.py (a live server on the fixture model, every
operation, both generation modes) with LWM_FUZZ_EXAMPLES cases per operation and
mode, and prints how many cases were sent, their statuses and any 5xx.

    .venv/bin/python bench/fuzz_openapi.py --examples 420   # >= 10,000 cases
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=420, help="cases per operation and generation mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "LWM_FUZZ_EXAMPLES": str(args.examples), "LWM_FUZZ_REPORT": str(report)}
        start = time.monotonic()
        rc = subprocess.call([str(Path(sys.executable).parent / "pytest"), "-q", "-p", "no:cacheprovider",
                              "tests/server/test_openapi_fuzz.py"], cwd=ROOT, env=env)
        seconds = time.monotonic() - start
        if not report.exists():
            print(f"no report (pytest exit {rc})")
            return rc or 1
        result = json.loads(report.read_text())
    print(f"cases sent: {result['cases']} ({args.examples} per operation and mode) in {seconds:.0f} s")
    print("statuses:", ", ".join(f"{k}: {v}" for k, v in result["statuses"].items()))
    print(f"5xx: {len(result['failures'])}")
    for line in result["failures"][:20]:
        print("  ", line)
    print(json.dumps({"bench": "fuzz_openapi", **result, "seconds": round(seconds, 1), "pytest_exit": rc}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
