"""apps.rides end to end on Kafka (Tansu): CSV lines in, enriched rides and dead letters out.

The worker is ``asyncflow worker apps.rides:app`` with ``ASYNCFLOW_DEMO_LOAD=1``,
so it replays the 6,433 trips into the ``rides`` topic itself; the test adds
malformed lines to the same topic.
"""

from __future__ import annotations

import csv
from collections import Counter
from datetime import datetime
from typing import Any

import orjson
import pytest

from tests.integration.apps.helpers import (
    ROOT,
    TopicReader,
    Workers,
    header,
    kafka_app_url,
    read_all,
    require_absent_topics,
)
from tests.integration.kafka.broker import create_topic, produce

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

DATA = ROOT / "apps" / "data" / "rides_sample.csv"
GOOD = (
    "2019-03-23 20:21:09,2019-03-23 20:27:24,1,1.6,7.0,2.15,0.0,12.95,yellow,credit card,"
    "Lenox Hill West,UN/Turtle Bay South,Manhattan,Manhattan"
)
MALFORMED = {
    b"2019-03-01 08:00:00,oops": "expected 14 CSV fields, got 2",
    GOOD.replace("yellow", "purple").encode(): "field 'color': 'purple' is not one of",
    GOOD.replace(",1.6,", ",1.6 mi,").encode(): "field 'distance': cannot read '1.6 mi'",
    GOOD.replace("credit card", "bitcoin").encode(): "field 'payment'",
    GOOD.replace("2019-03-23 20:27:24", "yesterday").encode(): "field 'dropoff'",
    b"\xff\xfe not text": "not a CSV line",
}
NUMBERS = ("distance", "fare", "tip", "tolls", "total")
TEXTS = ("color", "payment", "pickup_zone", "dropoff_zone", "pickup_borough", "dropoff_borough")


def trip(fields: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a trip, from a CSV row or from the ``ride`` of an enriched ride."""
    return (
        datetime.fromisoformat(fields["pickup"]).strftime("%Y-%m-%d %H:%M:%S"),
        datetime.fromisoformat(fields["dropoff"]).strftime("%Y-%m-%d %H:%M:%S"),
        int(fields["passengers"]),
        *(float(fields[n]) for n in NUMBERS),
        *(fields[n] or None for n in TEXTS),
    )


async def test_every_trip_is_enriched_once_and_malformed_lines_are_dead_lettered_with_the_reason(
    kafka_bootstrap: str, workers: Workers
) -> None:
    await require_absent_topics(kafka_bootstrap, ["rides", "rides-enriched", "rides-dead-letters"])
    await create_topic(kafka_bootstrap, partitions=2, name="rides")
    worker = workers.start(
        "apps.rides:app",
        ASYNCFLOW_BROKER=kafka_app_url(kafka_bootstrap),
        ASYNCFLOW_DEMO_LOAD="1",
        RIDES_PRINT_EVERY="1000",
    )
    await produce(kafka_bootstrap, "rides", [(None, line) for line in MALFORMED])
    with DATA.open(newline="") as f:
        expected = Counter(trip(row) for row in csv.DictReader(f))
    assert sum(expected.values()) == 6433

    async with TopicReader(kafka_bootstrap, "rides-enriched") as enriched:
        await enriched.read_until(lambda r: len(r) >= 6433, timeout=60, worker=worker)
    async with TopicReader(kafka_bootstrap, "rides-dead-letters") as dead:
        await dead.read_until(lambda r: len(r) >= len(MALFORMED), worker=worker)
    assert await worker.terminate() == 0, worker.describe()

    rides = [orjson.loads(r.value) for r in await read_all(kafka_bootstrap, "rides-enriched")]
    assert Counter(trip(e["ride"]) for e in rides) == expected  # each trip once, none other
    for e in rides:
        pickup = datetime.fromisoformat(e["ride"]["pickup"])
        dropoff = datetime.fromisoformat(e["ride"]["dropoff"])
        assert e["duration_min"] == round((dropoff - pickup).total_seconds() / 60, 2)
        assert e["weekday"] == pickup.strftime("%A")

    dead_letters = await read_all(kafka_bootstrap, "rides-dead-letters")
    assert sorted(r.value for r in dead_letters) == sorted(MALFORMED)
    for r in dead_letters:
        assert MALFORMED[r.value] in (header(r, "asyncflow.reason") or ""), r.headers
        assert header(r, "asyncflow.topic") == "rides"
    assert "6433 records" in worker.stdout()  # the console's count, printed at the stop
