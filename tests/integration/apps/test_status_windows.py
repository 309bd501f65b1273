"""apps.status_windows end to end on Kinesis (moto): readings in, hopping-window results out.

The worker is ``asyncflow worker apps.status_windows:app`` with
``KINESIS_INPUT_STREAM`` (4 shards) and ``KINESIS_OUTPUT_STREAM`` set. The test
puts the derived readings keyed by status, as the app's own demo load does, then
an end mark in every shard: an ``OK`` reading a day later in event time, which
moves the watermark past every window of the readings (a stream has no end).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
import pytest

from apps.status_windows import replay_readings
from tests.integration.apps.helpers import KinesisReader, Workers
from tests.integration.aws.kinesis_util import create_stream, hash_key_of_shard
from tests.integration.aws.moto import REGION
from tests.integration.kafka.broker import unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

SHARDS = 4
READINGS = list(replay_readings(limit=12_000))
LAST_MS = max(round(r["time"] * 1000) for r in READINGS)
DAY_MS = 86_400_000
Windows = dict[tuple[str, int], tuple[int, float]]


def hopping(readings: list[dict[str, Any]]) -> Windows:
    """Plain Python: (status, start ms) -> (count, mean temperature), 60 s windows every 10 s."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in readings:
        t = round(r["time"] * 1000)
        for start in range(t - t % 10_000, t - 60_000, -10_000):
            groups[(r["status"], start)].append(r["temperature"])
    return {k: (len(v), sum(v) / len(v)) for k, v in groups.items()}


def results(records: list[dict[str, Any]]) -> list[tuple[tuple[str, int], tuple[int, float]]]:
    """The window results in the output stream, leaving out windows of the end marks alone."""
    out = []
    for record in records:
        row = orjson.loads(record["Data"])
        start = round(datetime.fromisoformat(row["window_start"]).timestamp() * 1000)
        end = round(datetime.fromisoformat(row["window_end"]).timestamp() * 1000)
        assert end - start == 60_000
        assert record["PartitionKey"] == row["status"]
        if start <= LAST_MS:
            out.append(((row["status"], start), (row["count"], row["average_temperature"])))
    return out


async def put(kinesis: Any, stream: str, entries: list[dict[str, Any]]) -> None:
    for i in range(0, len(entries), 500):
        response = await kinesis.put_records(StreamName=stream, Records=entries[i : i + 500])
        assert response["FailedRecordCount"] == 0


async def test_hopping_counts_and_averages_per_status_match_a_plain_computation(
    moto_endpoint: str, aws: Callable[[str], Any], workers: Workers
) -> None:
    kinesis = aws("kinesis")
    source, sink = unique_name("status-readings"), unique_name("status-windows")
    await create_stream(kinesis, source, SHARDS)
    await create_stream(kinesis, sink, 2)
    expected = hopping(READINGS)
    assert {status for status, _ in expected} == {"OK", "WARNING", "ERROR"}

    await put(
        kinesis,
        source,
        [{"PartitionKey": r["status"], "Data": orjson.dumps(r)} for r in READINGS],
    )
    end = {"id": "~end", "temperature": 0.0, "status": "OK", "time": (LAST_MS + DAY_MS) / 1000}
    await put(
        kinesis,
        source,
        [
            {
                "PartitionKey": "~end",
                "ExplicitHashKey": hash_key_of_shard(shard, SHARDS),
                "Data": orjson.dumps(end),
            }
            for shard in range(SHARDS)
        ],
    )
    worker = workers.start(
        "apps.status_windows:app",
        KINESIS_INPUT_STREAM=source,
        KINESIS_OUTPUT_STREAM=sink,
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_REGION=REGION,
    )
    output = KinesisReader(kinesis, sink)
    await output.read_until(lambda r: len(results(r)) >= len(expected), timeout=60, worker=worker)
    assert await worker.terminate() == 0, worker.describe()

    final = KinesisReader(kinesis, sink)  # everything the stream holds after the stop
    await final.poll()
    got = results(final.records)
    assert len(got) == len(expected)  # one result per (status, window)...
    assert dict(got).keys() == expected.keys()  # ...for each window of the readings
    for key, (count, mean) in got:
        assert count == expected[key][0], key
        assert mean == pytest.approx(expected[key][1], rel=1e-9), key
