"""Running ``asyncflow worker`` as a user would: a subprocess with a tiny module in a folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ASYNCFLOW = Path(sys.executable).parent / "asyncflow"
"""The console script of the virtualenv the tests run in."""

TINY_APP = 'import asyncflow as af\n\napp = af.App("tiny")\n'
"""A module whose ``app`` is a valid App with nothing declared."""


def run_worker(
    folder: Path, *args: str, env: dict[str, str] | None = None, module: str = TINY_APP
) -> subprocess.CompletedProcess[str]:
    """``asyncflow worker ARGS`` run in ``folder`` (holding ``tiny.py`` = ``module``)."""
    (folder / "tiny.py").write_text(module)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCFLOW_")}
    environ["ASYNCFLOW_STATE_DIR"] = str(folder / "state")
    environ.update(env or {})
    return subprocess.run(
        [str(ASYNCFLOW), "worker", *args],
        cwd=folder,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``asyncflow: error:`` line on stderr (fails if there is anything else)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("asyncflow: error: "), result.stderr
    return lines[0]
