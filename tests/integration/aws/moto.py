"""Start a real ``moto_server`` (DynamoDB, Kinesis, ...) on a free loopback port.

Reusable from any test::

    from tests.integration.aws.moto import start_moto

    server = start_moto()                 # waits until it answers
    try:
        ...  # endpoint_url=server.endpoint_url, region "us-east-1", any credentials
    finally:
        server.stop()

``start_moto(auth=True)`` starts a server that checks credentials (moto's
``INITIAL_NO_AUTH_ACTION_COUNT=0``): every request with unknown keys gets an
``InvalidClientTokenId`` 403, which lets tests show the "rejected credentials" path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
"""The region tests use (moto accepts any)."""

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
"""Dummy credentials moto accepts (when auth is off)."""


def _moto_executable() -> str:
    candidate = Path(sys.executable).with_name("moto_server")
    return str(candidate) if candidate.exists() else "moto_server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    """A running ``moto_server`` process."""

    endpoint_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def reset(self) -> None:
        """Forget every resource (tables, streams) without restarting."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, even if with an error status
    except OSError:
        return False


def start_moto(
    *, auth: bool = False, timeout: float = 30.0, log_dir: Path | None = None
) -> MotoServer:
    """Start ``moto_server -H 127.0.0.1 -p PORT`` on a free port; return once it answers.

    Raises ``RuntimeError`` (with the server's output) if it exits or does not
    answer within ``timeout`` seconds.
    """
    env = dict(os.environ)
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    else:
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    last_error = ""
    for _ in range(3):  # a port taken between free_port() and the bind: try another
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(log_dir or "/tmp") / f"moto-{port}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [_moto_executable(), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _answers(url):
                return MotoServer(url, process, log_path)
            time.sleep(0.05)
        server = MotoServer(url, process, log_path)
        server.stop()
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto_server did not start: {last_error}")
