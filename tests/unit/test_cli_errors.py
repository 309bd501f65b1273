"""Every mistake in what ``asyncflow worker`` is asked to run is one line and a non-zero exit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.unit.cli_helpers import ASYNCFLOW, one_error_line, run_worker


def test_a_module_that_raises_on_import_is_one_line_naming_the_module_and_line(
    tmp_path: Path,
) -> None:
    module = 'import asyncflow as af\n\nraise RuntimeError("no config file")\n'
    line = one_error_line(run_worker(tmp_path, "tiny:app", module=module))
    assert "cannot import module 'tiny'" in line
    assert "RuntimeError: no config file" in line
    assert "tiny.py, line 3" in line


def test_a_module_with_a_syntax_error_is_one_line_naming_the_file_and_line(
    tmp_path: Path,
) -> None:
    module = "import asyncflow as af\n\napp = af.App(\n"
    line = one_error_line(run_worker(tmp_path, "tiny:app", module=module))
    assert "SyntaxError" in line
    assert "tiny.py, line 3" in line


def test_a_missing_dependency_of_the_module_names_the_import_line_not_the_pythonpath(
    tmp_path: Path,
) -> None:
    module = "import asyncflow as af\nimport no_such_dependency_xyz\n"
    line = one_error_line(run_worker(tmp_path, "tiny:app", module=module))
    assert "No module named 'no_such_dependency_xyz'" in line
    assert "tiny.py, line 2" in line
    assert "PYTHONPATH" not in line


@pytest.mark.parametrize(
    ("attr", "says", "hint"),
    [
        ("SomeClass", "tiny:SomeClass is a class, not an asyncflow App", "name an App"),
        ("needs_args", "tiny:needs_args needs arguments, so it is not an app", "name an App"),
        ("returns_int", "tiny:returns_int() returned a int, not an asyncflow App", "name an App"),
        ("number", "tiny:number is a int, not an asyncflow App", "name an App"),
        ("raises", "app factory tiny:raises raised: ValueError: bad factory", "tiny.py, line 5"),
    ],
)
def test_something_that_is_not_an_app_or_an_app_factory_is_one_line(
    tmp_path: Path, attr: str, says: str, hint: str
) -> None:
    module = (
        "class SomeClass:\n    def __init__(self, x): pass\n"
        "def needs_args(x): return x\n"
        "def returns_int(): return 3\n"
        "def raises(): raise ValueError('bad factory')\n"
        "number = 7\n"
    )
    line = one_error_line(run_worker(tmp_path, f"tiny:{attr}", module=module))
    assert says in line
    assert hint in line


def test_an_unknown_log_level_is_one_line_listing_the_allowed_levels(tmp_path: Path) -> None:
    line = one_error_line(run_worker(tmp_path, "tiny:app", env={"ASYNCFLOW_LOG_LEVEL": "loud"}))
    assert "'loud'" in line and "ASYNCFLOW_LOG_LEVEL" in line
    assert "debug, info, warning, error" in line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "abc", "1.5"])
def test_a_bad_lane_capacity_is_one_line_naming_the_setting_and_what_is_allowed(
    tmp_path: Path, value: str
) -> None:
    result = run_worker(tmp_path, "tiny:app", env={"ASYNCFLOW_LANE_CAPACITY": value})
    line = one_error_line(result)
    assert f"ASYNCFLOW_LANE_CAPACITY={value!r}" in line
    assert "lane_capacity" in line and "an integer >= 1" in line


@pytest.mark.parametrize(
    ("variable", "value"),
    [("ASYNCFLOW_FETCH_MAX", "0"), ("ASYNCFLOW_COMMIT_INTERVAL", "-1")],
)
def test_settings_that_would_spin_are_refused_before_the_worker_starts(
    tmp_path: Path, variable: str, value: str
) -> None:
    line = one_error_line(run_worker(tmp_path, "tiny:app", env={variable: value}))
    assert f"{variable}={value!r}" in line and "allowed:" in line


def test_creating_a_topic_with_no_partitions_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ASYNCFLOW), "topics", "create", "t", "--partitions", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--partitions 0 is not allowed; use an integer >= 1" in one_error_line(result)
