"""apps.status_windows: 60 s windows every 10 s per status, count and average temperature."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.kinesis import KinesisSink, KinesisSource
from apps.status_windows import INPUT, make_app, results_sink, status_of
from asyncflow.testing import CaptureSink, TestRun

ROOT = Path(__file__).resolve().parents[2]
READINGS = ROOT / "apps" / "data" / "sensor_readings.csv"
FLINK = ROOT / "tests" / "data" / "flink_windows" / "hop60_10_by_status.json"
ENV = (
    "ASYNCFLOW_BROKER",
    "ASYNCFLOW_DEMO_LOAD",
    "ASYNCFLOW_LANE_CAPACITY",
    "KINESIS_INPUT_STREAM",
    "KINESIS_OUTPUT_STREAM",
    "STATUS_TIME_SCALE",
    "STATUS_REPLAY_LIMIT",
)


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


def hopping(events: Sequence[tuple[str, int, float]]) -> dict[tuple[str, int], tuple[int, float]]:
    """Plain Python: (status, start ms) -> (count, mean) over 60 s windows every 10 s."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for status, t, value in events:
        last_start = t - t % 10_000
        for start in range(last_start, t - 60_000, -10_000):
            groups[(status, start)].append(value)
    return {k: (len(v), sum(v) / len(v)) for k, v in groups.items()}


def by_window(values: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[int, float]]:
    out = {}
    for v in values:
        assert ms(v["window_end"]) - ms(v["window_start"]) == 60_000
        out[(v["status"], ms(v["window_start"]))] = (v["count"], v["average_temperature"])
    assert len(out) == len(values)  # one result per (status, window)
    return out


def assert_same(got: dict[Any, tuple[int, float]], expected: dict[Any, tuple[int, float]]) -> None:
    assert got.keys() == expected.keys()
    for key, (count, mean) in expected.items():
        assert got[key][0] == count, key
        assert got[key][1] == pytest.approx(mean, rel=1e-9), key


async def test_counts_and_averages_match_a_plain_computation_of_the_replayed_slice() -> None:
    sink = CaptureSink("status")
    async with TestRun(make_app(sink=sink, load=True, limit=8000)) as run:
        await run.wait_stopped(20)

    with READINGS.open(newline="") as f:
        rows = list(csv.DictReader(f))[:8000]
    anchor = None
    events = []
    for r in rows:
        real = int(datetime.fromisoformat(r["timestamp"]).replace(tzinfo=UTC).timestamp() * 1000)
        anchor = real if anchor is None else anchor
        temp = float(r["temperature"])
        status = status_of(r["sensor_id"], temp, r["in_anomaly_window"] == "true")
        events.append((status, anchor + (real - anchor) // 86_400, temp))
    assert {s for s, _, _ in events} == {"OK", "WARNING", "ERROR"}
    assert_same(by_window(sink.values), hopping(events))


async def test_results_match_apache_flink_on_its_hop_60s_every_10s_by_status_case() -> None:
    case = json.loads(FLINK.read_text())
    assert case["window"] == {"kind": "hopping", "size_s": 60, "slide_s": 10}
    assert case["wait_s"] == 5
    epoch = ms(datetime.fromisoformat(case["epoch"]))
    sink = CaptureSink("status")
    async with TestRun(make_app(sink=sink, load=False)) as run:
        for e in case["events"]:
            await run.send(
                INPUT,
                {
                    "id": "flink",
                    "temperature": e["value"],
                    "status": e["key"],
                    "time": (epoch + e["time_ms"]) / 1000,
                },
            )
        await run.finish()
    assert run.dead_letters() == []
    expected = {
        (w["key"], epoch + w["start_ms"]): (w["count"], w["mean"]) for w in case["expected"]
    }
    assert_same(by_window(sink.values), expected)


def test_status_comes_from_the_anomaly_label_and_the_sensors_normal_band() -> None:
    assert status_of("office_ambient", 70.0, False) == "OK"
    assert status_of("office_ambient", 70.0, True) == "WARNING"  # labelled, in band
    assert status_of("office_ambient", 80.0, False) == "WARNING"  # out of band, unlabelled
    assert status_of("machine_internal", 2.1, True) == "ERROR"  # the shutdown
    assert status_of("machine_internal", 104.0, False) == "WARNING"
    assert status_of("unknown", 1e6, False) == "OK"  # no band known: only the label counts


def test_kinesis_streams_are_used_when_their_variables_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KINESIS_INPUT_STREAM", "readings")
    monkeypatch.setenv("KINESIS_OUTPUT_STREAM", "status-windows")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    app = make_app()
    source = app.channels[INPUT].source
    assert isinstance(source, KinesisSource) and source.stream == "readings"
    sink = results_sink()
    assert isinstance(sink, KinesisSink) and sink.stream == "status-windows"
    # No "demo-load" sink into the input stream without ASYNCFLOW_DEMO_LOAD=1:
    assert list(app.sinks) == ["kinesis:status-windows"]
