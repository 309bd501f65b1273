"""apps.rides: parse CSV trips (malformed -> dead letter), transform, enrich."""

from __future__ import annotations

import csv
import zlib
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from apps.rides import EnrichedRide, make_app, sorted_lines
from asyncflow.testing import CaptureSink, TestRun, reason_of

DATA = Path(__file__).resolve().parents[2] / "apps" / "data" / "rides_sample.csv"
DRIVERS = DATA.with_name("drivers.csv")
NYC = ZoneInfo("America/New_York")
BUCKETS = (
    ["night"] * 6 + ["morning rush"] * 4 + ["midday"] * 6 + ["evening rush"] * 4 + ["evening"] * 4
)
GOOD = (
    "2019-03-23 20:21:09,2019-03-23 20:27:24,1,1.6,7.0,2.15,0.0,12.95,yellow,credit card,"
    "Lenox Hill West,UN/Turtle Bay South,Manhattan,Manhattan"
)


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ASYNCFLOW_BROKER",
        "ASYNCFLOW_DEMO_LOAD",
        "ASYNCFLOW_LANE_CAPACITY",
        "RIDES_PRINT_EVERY",
    ):
        monkeypatch.delenv(name, raising=False)


def expected_ride(row: dict[str, str]) -> dict[str, Any]:
    """Plain Python: what the pipeline derives from one CSV row."""
    pickup = datetime.fromisoformat(row["pickup"]).replace(tzinfo=NYC)
    dropoff = datetime.fromisoformat(row["dropoff"]).replace(tzinfo=NYC)
    seconds = dropoff.timestamp() - pickup.timestamp()
    distance, fare, tip = float(row["distance"]), float(row["fare"]), float(row["tip"])
    return {
        "pickup": pickup.isoformat(),
        "duration_min": round(seconds / 60, 2),
        "speed_mph": round(distance / (seconds / 3600), 2) if seconds else None,
        "tip_pct": round(100 * tip / fare, 1) if fare else None,
        "fare_per_mile": round(fare / distance, 2) if distance else None,
        "borough_pair": f"{row['pickup_borough'] or '?'} -> {row['dropoff_borough'] or '?'}",
        "time_of_day": BUCKETS[pickup.hour],
        "weekday": pickup.strftime("%A"),
        "payment": row["payment"] or None,
    }


def derived(e: EnrichedRide) -> dict[str, Any]:
    return {
        "pickup": e.ride.pickup.isoformat(),
        "duration_min": e.duration_min,
        "speed_mph": e.speed_mph,
        "tip_pct": e.tip_pct,
        "fare_per_mile": e.fare_per_mile,
        "borough_pair": e.borough_pair,
        "time_of_day": e.time_of_day,
        "weekday": e.weekday,
        "payment": e.ride.payment,
    }


async def test_enriched_rides_match_a_plain_computation_of_the_sample() -> None:
    echo = CaptureSink()
    async with TestRun(make_app(echo=echo, load=True)) as run:
        await run.wait_stopped(20)
    assert run.dead_letters() == []
    got = [derived(e) for e in run.outputs("rides-enriched")]
    with DATA.open(newline="") as f:
        expected = [expected_ride(row) for row in csv.DictReader(f)]
    assert len(got) == len(expected) == 6433
    assert Counter(tuple(d.items()) for d in got) == Counter(tuple(d.items()) for d in expected)
    assert len(echo.values) == 6433


async def test_each_drivers_rides_keep_the_replays_pickup_order() -> None:
    async with TestRun(make_app(echo=CaptureSink(), load=True, limit=2000)) as run:
        await run.wait_stopped(20)
    drivers: dict[str, list[datetime]] = {}
    for e in run.outputs("rides-enriched"):
        drivers.setdefault(e.driver_id, []).append(e.ride.pickup)
    assert sum(map(len, drivers.values())) == 2000
    assert all(times == sorted(times) for times in drivers.values())


def batch_drivers() -> dict[tuple[str, str], dict[str, Any] | None]:
    """Plain Python: per trip (pickup, zone), its driver's row as of the pickup (or None)."""
    with DRIVERS.open(newline="") as f:
        updates = list(csv.DictReader(f))
    out: dict[tuple[str, str], dict[str, Any] | None] = {}
    with DATA.open(newline="") as f:
        for row in csv.DictReader(f):
            text = f"{row['pickup']}|{row['pickup_zone']}"
            driver = f"D{zlib.crc32(text.encode()) % 150:03d}"
            seen = [
                u for u in updates if u["driver_id"] == driver and u["updated"] <= row["pickup"]
            ]
            last = max(seen, key=lambda u: u["updated"]) if seen else None
            out[(row["pickup"], row["pickup_zone"])] = (
                None
                if last is None or last["active"] != "true"
                else {
                    "driver_id": driver,
                    "name": last["name"],
                    "vehicle": last["vehicle"],
                    "rating": float(last["rating"]),
                }
            )
    return out


async def test_each_ride_has_its_driver_as_of_its_pickup_as_a_batch_join_finds() -> None:
    async with TestRun(make_app(echo=CaptureSink(), load=True)) as run:
        await run.wait_stopped(20)
    got = {
        (f"{e.ride.pickup:%Y-%m-%d %H:%M:%S}", e.ride.pickup_zone or ""): None
        if e.driver is None
        else {
            "driver_id": e.driver.driver_id,
            "name": e.driver.name,
            "vehicle": e.driver.vehicle,
            "rating": e.driver.rating,
        }
        for e in run.outputs("rides-enriched")
    }
    expected = batch_drivers()
    assert got == expected
    with_driver = sum(v is not None for v in expected.values())
    assert 0 < with_driver < len(expected)  # some rides have no driver on record (retired)


async def test_malformed_lines_are_dead_lettered_with_the_reason() -> None:
    bad = {
        b"2019-03-01 08:00:00,oops": "expected 14 CSV fields, got 2",
        GOOD.replace("yellow", "purple").encode(): "field 'color': 'purple' is not one of",
        GOOD.replace(",1.6,", ",1.6 mi,").encode(): "field 'distance': cannot read '1.6 mi'",
        GOOD.replace("credit card", "bitcoin").encode(): "field 'payment'",
        GOOD.replace("2019-03-23 20:27:24", "yesterday").encode(): "field 'dropoff'",
    }
    async with TestRun(make_app(echo=CaptureSink(), load=False)) as run:
        for line in bad:
            run.send_raw("rides", line)
        run.send_raw("rides", GOOD.encode())
        await run.finish()
    [ok] = run.outputs("rides-enriched")
    assert (ok.duration_min, ok.speed_mph, ok.tip_pct, ok.time_of_day) == (
        6.25,
        15.36,
        30.7,
        "evening",
    )
    dead = run.dead_letters()
    assert [d.value for d in dead] == list(bad)
    for d, reason in zip(dead, bad.values(), strict=True):
        assert reason in reason_of(d)


def test_the_replay_is_sorted_by_pickup() -> None:
    lines = sorted_lines()
    assert len(lines) == 6433
    pickups = [line[:19] for line in lines]
    assert pickups == sorted(pickups) and pickups[0] == "2019-02-28 23:29:03"
