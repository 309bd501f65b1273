"""apps.sensor_averages: 5 s per-sensor windows over the replayed NAB readings."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.dynamodb import DynamoDBSink
from apps import sensor_averages
from apps.sensor_averages import TOPIC, make_app, results_sink
from asyncflow.testing import CaptureSink, TestRun, reason_of, wait_for

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "apps" / "data" / "sensor_readings.csv"
ENV = (
    "ASYNCFLOW_BROKER",
    "ASYNCFLOW_DEMO_LOAD",
    "ASYNCFLOW_LANE_CAPACITY",
    "SENSOR_TABLE",
    "SENSOR_TOPIC",
    "SENSOR_FLUSH_INTERVAL",
    "SENSOR_TIME_SCALE",
    "SENSOR_REPLAY_LIMIT",
)


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def expected_windows(
    limit: int | None = None, scale: int = 86_400
) -> dict[tuple[str, int], dict[str, Any]]:
    """The same windows computed in plain Python: times as UTC, compressed by ``scale``."""
    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    anchor = None
    groups: dict[tuple[str, int], list[tuple[int, float, str]]] = defaultdict(list)
    for row in rows:
        real = int(datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC).timestamp() * 1000)
        anchor = real if anchor is None else anchor
        t = anchor + (real - anchor) // scale
        groups[(row["sensor_id"], t - t % 5000)].append(
            (t, float(row["temperature"]), row["timestamp"])
        )
    out = {}
    for key, items in groups.items():
        first = min(items, key=lambda i: i[0])  # min/max keep the earliest arrival on ties...
        last = max(reversed(items), key=lambda i: i[0])  # ...so reverse for the latest
        out[key] = {
            "count": len(items),
            "average": sum(v for _, v, _ in items) / len(items),
            "first": first[0],
            "last": last[0],
            "recorded_from": first[2].replace(" ", "T") + "Z",
            "recorded_to": last[2].replace(" ", "T") + "Z",
        }
    return out


def ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


async def run_replay(app: Any) -> TestRun:
    async with TestRun(app) as run:
        await run.wait_stopped(20)
    return run


async def test_window_results_match_a_plain_computation_of_the_replayed_slice() -> None:
    sink = CaptureSink("averages")
    await run_replay(make_app(sink=sink, load=True, limit=6000))

    got = {(v["sensor_id"], ms(v["window_start"])): v for v in sink.values}
    expected = expected_windows(6000)
    assert {s for s, _ in expected} == {"office_ambient", "machine_internal"}
    assert got.keys() == expected.keys()
    assert len(sink.values) == len(expected)  # one result per (sensor, window)
    for key, want in expected.items():
        v = got[key]
        assert ms(v["window_end"]) - ms(v["window_start"]) == 5000
        assert v["count"] == want["count"]
        assert v["average"] == pytest.approx(want["average"], rel=1e-9)
        assert (ms(v["first"]), ms(v["last"])) == (want["first"], want["last"])
        assert (v["recorded_from"], v["recorded_to"]) == (
            want["recorded_from"],
            want["recorded_to"],
        )


async def test_a_reading_more_than_10s_behind_the_newest_is_dead_lettered() -> None:
    sink = CaptureSink("averages")
    app = make_app(sink=sink, load=False)
    async with TestRun(app) as run:
        await run.send(TOPIC, {"sensor_id": "s1", "temperature": 20.0, "time": 1_000_100})
        await wait_for(lambda: app.metrics.get("events_in") >= 1)
        await run.send(TOPIC, {"sensor_id": "s1", "temperature": 99.0, "time": 1_000_080})
        await run.send(TOPIC, {"sensor_id": "s1", "temperature": 30.0, "time": 1_000_092})
        await run.finish()
    assert sorted((ms(v["window_start"]), v["count"], v["average"]) for v in sink.values) == [
        (1_000_090_000, 1, 30.0),
        (1_000_100_000, 1, 20.0),
    ]
    [dead] = run.dead_letters()
    assert "late event" in reason_of(dead)
    assert b'"temperature":99.0' in (dead.value or b"")


async def test_a_restart_in_the_middle_of_the_replay_gives_the_same_windows_once() -> None:
    from asyncflow.memory import MemoryBroker

    rows = list(sensor_averages.replay_readings(86_400, 6000))
    broker = MemoryBroker()
    first, second = CaptureSink("averages"), CaptureSink("averages")
    app = make_app(sink=first, load=False)
    async with TestRun(app, broker=broker) as run:
        for r in rows[:3500]:
            await run.send(TOPIC, r, key=r["sensor_id"])
        await wait_for(lambda: app.metrics.get("events_in") >= 3500)
        await run.stop()
    async with TestRun(make_app(sink=second, load=False), broker=broker) as run:
        for r in rows[3500:]:
            await run.send(TOPIC, r, key=r["sensor_id"])
        await run.finish()
    values = first.values + second.values
    got = {(v["sensor_id"], ms(v["window_start"])): v for v in values}
    assert len(values) == len(got)  # no window emitted twice
    expected = expected_windows(6000)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        v = got[key]
        assert v["count"] == want["count"]
        assert v["average"] == pytest.approx(want["average"], rel=1e-9)
        assert (ms(v["first"]), ms(v["last"])) == (want["first"], want["last"])
        assert (v["recorded_from"], v["recorded_to"]) == (want["recorded_from"], want["recorded_to"])


def test_results_are_upserted_into_dynamodb_keyed_by_sensor_when_SENSOR_TABLE_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SENSOR_TABLE", "sensor-averages")
    sink = results_sink()
    assert isinstance(sink, DynamoDBSink)
    assert (sink.table, sink.key, sink.sort_key) == ("sensor-averages", "sensor_id", None)


def test_csv_timestamps_are_read_as_utc() -> None:
    first = next(sensor_averages.replay_readings(limit=1))
    assert first["time"] == datetime(2013, 7, 4, tzinfo=UTC).timestamp()
    assert first["recorded_at"] == "2013-07-04T00:00:00Z"


def test_cli_run_exits_0_and_prints_one_line_per_sensor_window() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("asyncflow")), "worker", "apps.sensor_averages:app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = re.compile(r"^(\w+)\s+\[(\S+ \S+), \S+\)\s+n=(\d+)\s+avg=\s*([\d.]+)")
    printed = {}
    for text in proc.stdout.splitlines():
        m = line.match(text)
        assert m, text
        start = datetime.fromisoformat(m[2]).replace(tzinfo=UTC)
        printed[(m[1], ms(start))] = (int(m[3]), m[4])
    expected = expected_windows()
    assert len(proc.stdout.splitlines()) == len(expected) == len(printed)
    assert printed == {k: (w["count"], f"{w['average']:.2f}") for k, w in expected.items()}
