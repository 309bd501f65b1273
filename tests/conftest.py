"""What every test shares: its own state directory, so no test sees another's local stores."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``ASYNCFLOW_STATE_DIR`` for this test (and the worker processes it starts)."""
    path = tmp_path / "asyncflow-state"
    monkeypatch.setenv("ASYNCFLOW_STATE_DIR", str(path))
    return path
