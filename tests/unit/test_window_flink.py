"""Differential tests: the window operator against results computed by Apache Flink 2.3.0.

Each data file holds a keyed event stream in the order Flink read it and the
windows Flink's SQL window TVFs produced (see tests/data/flink_windows/README.md).
We replay the events through one operator (one partition, parallelism 1), moving
the watermark after every event as Flink's watermark assigner would, and end
the input as Flink does for a bounded source (a final watermark).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from asyncflow.windows import (
    Count,
    Hopping,
    Max,
    Mean,
    Min,
    Session,
    Sum,
    Tumbling,
    WindowOperator,
    to_epoch_ms,
)
from asyncflow.windows.assigners import WindowAssigner

DATA = Path(__file__).resolve().parent.parent / "data" / "flink_windows"
FILES = ["tumble5_sensors.json", "hop60_10_by_status.json", "session2.json"]


def load(name: str) -> dict[str, Any]:
    with open(DATA / name, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def assigner_for(window: dict[str, Any]) -> WindowAssigner:
    kind = window["kind"]
    if kind == "tumbling":
        return Tumbling(timedelta(seconds=window["size_s"]))
    if kind == "hopping":
        return Hopping(timedelta(seconds=window["size_s"]), timedelta(seconds=window["slide_s"]))
    if kind == "session":
        return Session(timedelta(seconds=window["gap_s"]))
    raise AssertionError(f"unknown window kind {kind}")


@pytest.mark.parametrize("name", FILES)
def test_operator_matches_flink_window_results(name: str) -> None:
    data = load(name)
    epoch = to_epoch_ms(datetime.fromisoformat(data["epoch"]))
    op = WindowOperator(
        assigner_for(data["window"]),
        {"count": Count(), "sum": Sum(), "mean": Mean(), "min": Min(), "max": Max()},
        wait=timedelta(seconds=data["wait_s"]),
    )
    frontier: int | None = None
    for e in data["events"]:
        t = epoch + e["time_ms"]
        assert op.on_event(e["key"], t, e["value"]), f"Flink dropped nothing, but {e} was late"
        frontier = t if frontier is None else max(frontier, t)
        op.on_watermark(frontier, wall_ms=0)
    fired_by_watermark = len(op.results)
    final_watermark = op.watermark
    op.flush_all()

    got: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in op.results:
        window = (r.key, r.start_ms - epoch, r.end_ms - epoch)
        assert window not in got, f"window {window} emitted twice"
        got[window] = r.value
    expected = {(x["key"], x["start_ms"], x["end_ms"]): x for x in data["expected"]}

    assert not op.late
    assert set(got) == set(expected)
    for window, want in expected.items():
        have = got[window]
        assert have["count"] == want["count"], window
        for field in ("sum", "mean", "min", "max"):
            assert math.isclose(have[field], want[field], rel_tol=1e-9), (window, field)
    # Every window the last watermark passed was fired by a watermark, not by the end of input.
    assert final_watermark is not None
    passed = [w for w in expected if epoch + w[2] - 1 <= final_watermark]
    assert fired_by_watermark == len(passed) > 0.8 * len(expected)
    assert op.open_windows == 0


@pytest.mark.parametrize("name", FILES)
def test_flink_data_has_the_documented_shape(name: str) -> None:
    data = load(name)
    sizes = {
        "tumble5_sensors.json": (20_000, 3_975),
        "hop60_10_by_status.json": (20_000, 198),
        "session2.json": (10_000, 5_208),
    }
    assert (len(data["events"]), len(data["expected"])) == sizes[name]
