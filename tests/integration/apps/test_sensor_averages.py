"""apps.sensor_averages end to end: readings on Kafka (Tansu) -> 5 s windows -> DynamoDB (moto).

The worker is ``asyncflow worker apps.sensor_averages:app`` with the environment of
its docstring. The test produces the replayed readings, then an end mark per
partition: a reading of the sensor ``~end`` a day later in event time, which
moves the watermark past every window of the real sensors (a Kafka topic has
no end of input). The table then holds each sensor's last window.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from apps.sensor_averages import replay_readings
from tests.integration.apps.helpers import (
    ROOT,
    TopicReader,
    Workers,
    kafka_app_url,
    scan,
)
from tests.integration.aws.moto import REGION
from tests.integration.kafka.broker import create_topic, produce, unique_name, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

DATA = ROOT / "apps" / "data" / "sensor_readings.csv"
PARTITIONS = 3
END_SENSOR = "~end"
READINGS = list(replay_readings())
LAST_MS = max(round(r["time"] * 1000) for r in READINGS)
DAY_MS = 86_400_000


def last_window_per_sensor() -> dict[str, dict[str, Any]]:
    """Plain Python: each sensor's last 5 s window on the replay's timeline (CSV times as UTC,
    compressed 86,400 times from the first reading)."""
    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))
    anchor = int(datetime.fromisoformat(rows[0]["timestamp"]).replace(tzinfo=UTC).timestamp())
    windows: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        real = int(datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC).timestamp())
        t = anchor * 1000 + (real - anchor) * 1000 // 86_400
        windows[(row["sensor_id"], t - t % 5000)].append((t, float(row["temperature"])))
    last: dict[str, dict[str, Any]] = {}
    for (sensor, start), items in sorted(windows.items()):
        last[sensor] = {
            "window_start": start,
            "count": len(items),
            "average": sum(v for _, v in items) / len(items),
            "first": min(t for t, _ in items),
            "last": max(t for t, _ in items),
        }
    return last


def as_expected(item: dict[str, Any]) -> dict[str, Any]:
    """A table item in the shape of ``last_window_per_sensor``."""

    def ms(text: str) -> int:
        return round(datetime.fromisoformat(text).timestamp() * 1000)

    assert ms(item["window_end"]) - ms(item["window_start"]) == 5000
    return {
        "window_start": ms(item["window_start"]),
        "count": int(item["count"]),
        "average": float(item["average"]),
        "first": ms(item["first"]),
        "last": ms(item["last"]),
    }


def same_windows(items: list[dict[str, Any]], expected: dict[str, dict[str, Any]]) -> bool:
    got = {i["sensor_id"]: as_expected(i) for i in items if i["sensor_id"] != END_SENSOR}
    if got.keys() != expected.keys():
        return False
    return all(
        got[s]["average"] == pytest.approx(w["average"], rel=1e-9)
        and {k: v for k, v in got[s].items() if k != "average"}
        == {k: v for k, v in w.items() if k != "average"}
        for s, w in expected.items()
    )


async def create_table(dynamodb: Any) -> str:
    """A table keyed as the docstring says: hash key ``sensor_id`` (string)."""
    table = unique_name("sensor-averages")
    await dynamodb.create_table(
        TableName=table,
        AttributeDefinitions=[{"AttributeName": "sensor_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "sensor_id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return table


async def produce_readings_then_end_marks(bootstrap: str, topic: str) -> None:
    """The replay, keyed by sensor id, then an ``~end`` reading a day later in each partition."""
    await produce(bootstrap, topic, [(r["sensor_id"].encode(), orjson.dumps(r)) for r in READINGS])
    end = {"sensor_id": END_SENSOR, "temperature": 0.0, "time": (LAST_MS + DAY_MS) / 1000}
    await produce(
        bootstrap, topic, [(END_SENSOR.encode(), orjson.dumps(end), p) for p in range(PARTITIONS)]
    )


def worker_settings(
    kafka_bootstrap: str, moto_endpoint: str, topic: str, table: str
) -> dict[str, str]:
    return {
        "ASYNCFLOW_BROKER": kafka_app_url(kafka_bootstrap),
        "SENSOR_TOPIC": topic,
        "SENSOR_TABLE": table,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_REGION": REGION,
    }


async def test_each_sensors_last_window_is_upserted_into_dynamodb_keyed_by_sensor_id(
    kafka_bootstrap: str, moto_endpoint: str, aws: Callable[[str], Any], workers: Workers
) -> None:
    dynamodb = aws("dynamodb")
    table = await create_table(dynamodb)
    topic = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("sensor-readings"))
    expected = last_window_per_sensor()
    assert expected.keys() == {"office_ambient", "machine_internal"}

    worker = workers.start(
        "apps.sensor_averages:app", **worker_settings(kafka_bootstrap, moto_endpoint, topic, table)
    )
    await produce_readings_then_end_marks(kafka_bootstrap, topic)

    items: list[dict[str, Any]] = []

    async def table_is_complete() -> bool:
        items[:] = await scan(dynamodb, table)
        return same_windows(items, expected) or worker.process.poll() is not None

    # the sink writes every 5 s (its default flush interval) while the worker runs
    await wait_for(table_is_complete, timeout=60, interval=0.2, message="the expected table")
    assert same_windows(items, expected), (items, worker.describe())
    assert await worker.terminate() == 0, worker.describe()


async def test_sigterm_flushes_buffered_dynamodb_writes_before_the_worker_exits_0(
    kafka_bootstrap: str, moto_endpoint: str, aws: Callable[[str], Any], workers: Workers
) -> None:
    dynamodb = aws("dynamodb")
    table = await create_table(dynamodb)
    topic = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("sensor-readings"))
    settings = worker_settings(kafka_bootstrap, moto_endpoint, topic, table)
    # no checkpoint before the SIGTERM either: a checkpoint flushes every sink first
    worker = workers.start("apps.sensor_averages:app", **settings, SENSOR_FLUSH_INTERVAL="600",
                           ASYNCFLOW_COMMIT_INTERVAL="600")
    await produce_readings_then_end_marks(kafka_bootstrap, topic)

    # Know that the worker has read the end marks: a reading of ``~end`` an hour after the
    # last real one is late only once their watermark is in its lane (one sent with the
    # marks' fetch is not late yet: send another until one shows up as a dead letter).
    marker = unique_name("probe").encode()
    async with TopicReader(kafka_bootstrap, "sensors-dead-letters") as dead_letters:
        for attempt in range(100):
            probe = {
                "sensor_id": END_SENSOR,
                "temperature": float(attempt),
                "time": (LAST_MS + 3_600_000) / 1000,
                "recorded_at": marker.decode(),
            }
            await produce(kafka_bootstrap, topic, [(END_SENSOR.encode(), orjson.dumps(probe), 0)])
            try:
                await dead_letters.read_until(
                    lambda records: any(marker in (r.value or b"") for r in records),
                    timeout=1.0,
                    worker=worker,
                )
                break
            except AssertionError:
                if worker.process.poll() is not None:
                    raise
        else:
            raise AssertionError(f"no probe was dead-lettered\n{worker.describe()}")

    assert await scan(dynamodb, table) == []  # every window result is still buffered...
    assert await worker.terminate() == 0, worker.describe()
    items = await scan(dynamodb, table)  # ...and written on SIGTERM, before the exit
    assert same_windows(items, last_window_per_sensor()), (items, worker.describe())
