"""The asyncflow command: one clear line for what a user can fix, exit codes, clean shutdown."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "asyncflow.cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "asyncflow 0.1.0"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:app", "cannot import module 'no_such_module_xyz'"),
        ("apps.sensor_averages:nope", "module 'apps.sensor_averages' has no attribute 'nope'"),
        ("apps.sensor_averages", "expected module:attr"),
        ("asyncflow.cli:log", "is a Logger, not an asyncflow App"),
    ],
)
def test_a_bad_app_reference_prints_one_line_and_exits_2(target: str, message: str) -> None:
    result = run_cli("worker", target)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_broker_url_without_a_known_scheme_is_a_clear_error() -> None:
    result = run_cli("worker", "apps.sensor_averages:app", "--broker", "nats://localhost:4222")
    assert result.returncode == 2
    assert "no broker for scheme 'nats'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_main_job_runs_to_the_end_of_its_input_and_exits_0() -> None:
    result = run_cli("worker", "apps.sensor_averages:app", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "office_ambient" in result.stdout
    assert "worker sensors stopped" in result.stderr


def test_sigterm_drains_flushes_commits_and_exits_0(tmp_path: Path) -> None:
    app_file = tmp_path / "forever_app.py"
    app_file.write_text(
        "import asyncflow as af\n"
        "app = af.App('forever')\n"
        "numbers = app.topic('numbers')\n"
        "@app.task\n"
        "async def generate():\n"
        "    for n in range(1000):\n"
        "        await numbers.send(None, n)\n"
        "@app.agent(numbers)\n"
        "async def show(stream):\n"
        "    async for n in stream:\n"
        "        if n == 999:\n"
        "            print('processed all', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [*CLI, "worker", "forever_app:app"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while "processed all" not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM received: draining, flushing and committing" in err
    assert "worker forever stopped" in err


def test_sigterm_while_the_app_module_is_still_importing_exits_0_with_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "slow_app.py").write_text(
        "import sys, time\n"
        "print('importing', flush=True)\n"
        "time.sleep(30)  # a slow import: the worker's own handlers are not in place yet\n"
        "import asyncflow as af\n"
        "app = af.App('slow')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [*CLI, "worker", "slow_app:app"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "importing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "SIGTERM before the worker started: nothing was read" in err
    assert "Traceback" not in err
