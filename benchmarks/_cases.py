"""Running a benchmark's cases one process each, so every case's peak RSS is its own.

Example:
    >>> import sys
    >>> run_case_process([sys.executable, "-c", "print('{\\"case\\": \\"x\\"}')"], "x", limit=30)
    [{'case': 'x'}]
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_case_process(command: list[str], case: str, *, limit: float) -> list[dict[str, Any]]:
    """Run ``command`` (one case) and return the JSON objects it printed, a line each.

    Exits the benchmark with one line when the case fails or outlives ``limit``
    seconds (generous, but never forever).
    """
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=limit
        )
    except subprocess.TimeoutExpired:
        sys.exit(f"case {case} did not finish within {limit:.0f} s")
    if done.returncode != 0:
        sys.exit(f"case {case} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
