"""The rides app's driver join on the Kafka-protocol broker (Tansu): output equals a batch join.

Driver updates (JSON, keyed by driver id) and ride lines (CSV, no key) are
produced to two topics of two partitions; the app (``apps.rides.make_app``, its
own topic names) forwards both into its join topic and joins each ride with its
driver as of its pickup. The enriched rides read back from Kafka must be
exactly what a plain batch as-of join of the same two inputs gives: every
ride once, each with the driver row it had at pickup (or none).
"""

from __future__ import annotations

import asyncio
import csv
import uuid
import zlib
from collections import Counter
from datetime import datetime
from typing import Any

import orjson
import pytest

from apps._support import DATA
from apps.rides import DRIVERS, read_drivers, sorted_lines
from apps.rides import make_app as rides_app
from asyncflow.codecs import JsonCodec
from asyncflow.testing import CaptureSink
from tests.integration.kafka.broker import TEST_OPTIONS, consume, create_topic, produce, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(180)]

RIDES = 1_500  # the first trips of the month: a few seconds on the test broker


def batch_join(lines: list[str]) -> Counter[tuple[Any, ...]]:
    """Per ride (pickup, zone): the driver's (name, vehicle, rating) as of its pickup, or None."""
    with (DATA / "drivers.csv").open(newline="") as f:
        updates = list(csv.DictReader(f))
    out: Counter[tuple[Any, ...]] = Counter()
    for row in csv.reader(lines):
        pickup, zone = row[0], row[10]
        driver = f"D{zlib.crc32(f'{pickup}|{zone}'.encode()) % DRIVERS:03d}"
        seen = [u for u in updates if u["driver_id"] == driver and u["updated"] <= pickup]
        last = max(seen, key=lambda u: u["updated"]) if seen else None
        row_of = (
            None
            if last is None or last["active"] != "true"
            else (last["name"], last["vehicle"], float(last["rating"]))
        )
        out[(pickup, zone, driver, row_of)] += 1
    return out


def enriched_key(value: bytes) -> tuple[Any, ...]:
    e = orjson.loads(value)
    pickup = datetime.fromisoformat(e["ride"]["pickup"]).strftime("%Y-%m-%d %H:%M:%S")
    d = e["driver"]
    row_of = None if d is None else (d["name"], d["vehicle"], float(d["rating"]))
    return (pickup, e["ride"]["pickup_zone"] or "", e["driver_id"], row_of)


async def test_the_rides_apps_driver_join_on_kafka_equals_a_batch_join_of_its_inputs(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    prefix = f"e2e-rj-{uuid.uuid4().hex[:8]}-"
    for name in ("rides", "drivers"):
        await create_topic(kafka_bootstrap, partitions=2, name=f"{prefix}{name}")
    codec: JsonCodec[Any] = JsonCodec()
    drivers = [(d.driver_id.encode(), codec.encode(d)) for d in read_drivers()]
    lines = sorted_lines()[:RIDES]
    assert await produce(kafka_bootstrap, f"{prefix}drivers", drivers) == len(drivers)
    assert await produce(kafka_bootstrap, f"{prefix}rides", [(None, ln.encode()) for ln in lines])

    app = rides_app(echo=CaptureSink(), load=False, prefix=prefix)
    app.set_broker(kafka_url)
    app.broker_options = dict(TEST_OPTIONS)
    out_topic = f"{prefix}rides-enriched"
    worker = asyncio.create_task(app.run())

    def written() -> int:
        if worker.done():
            worker.result()  # a worker that stopped early: its error
        return sum(n for (_, t), n in app.metrics.labeled("events_out").items() if t == out_topic)

    try:
        await wait_for(lambda: written() >= RIDES, timeout=120)
    finally:
        app.stop()
        await worker
    assert written() == RIDES  # each ride once
    assert app.metrics.get("late_events") == 0 and app.metrics.get("dead_letters") == 0
    records = await consume(kafka_bootstrap, out_topic, RIDES)
    got = Counter(enriched_key(r.value) for r in records)
    expected = batch_join(lines)
    assert got == expected
    assert sum(1 for k in expected.elements() if k[3] is not None) > RIDES // 2
