"""End to end: outputs an AWS sink refuses become dead letters, and the worker goes on.

An ``asyncflow.App`` on the memory broker (``TestRun``) sends to a
``DynamoDBSink`` (and a ``KinesisSink``) on the session's moto server. Some
outputs cannot be stored (a NaN mean, no key): the run finishes, the good
outputs are in the table (stream), the refused ones are in ``run.dead_letters()``
with a reason naming the sink and the field, and the input is committed past
them (a restart would not meet them again).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson
import pytest

import asyncflow as af
from adapters.dynamodb import DynamoDBSink
from adapters.kinesis import KinesisSink
from asyncflow.testing import TestRun, reason_of
from tests.integration.aws.kinesis_util import create_stream
from tests.integration.aws.moto import CREDENTIALS, REGION
from tests.integration.aws.test_dynamodb_sink import scan
from tests.integration.aws.test_kinesis_sink import read_stream

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

PARTITIONS = 2


def header(record: Any, name: str) -> str | None:
    return next((v.decode() for k, v in record.headers if k == name), None)


def summary_app(sink: Any) -> af.App:
    """Per reading: the mean of its values (NaN when it has none), keyed by sensor."""
    app = af.App("summaries")
    readings = app.topic("readings", partitions=PARTITIONS)
    out = app.sink(sink)

    @app.agent(readings, concurrency=2)
    async def summarise(stream: af.Stream[Any]) -> None:
        async for r in stream:
            xs = r["values"]
            mean = sum(xs) / len(xs) if xs else math.nan
            await out.send(r["sensor"], {"sensor": r["sensor"], "mean": mean, "count": len(xs)})

    return app


def readings() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"sensor": f"s{i:02d}", "values": [] if i % 7 == 3 else [i, i + 1.5]} for i in range(30)
    ]
    out.append({"sensor": None, "values": [1.0]})
    return out


def committed_everything(run: TestRun) -> bool:
    topic = run.broker.topics["readings"]
    return all(
        run.broker.committed("summaries", "readings", p) == (len(topic.partitions[p]) or None)
        for p in range(PARTITIONS)
    )


async def test_outputs_dynamodb_refuses_are_dead_letters_and_the_good_ones_are_in_the_table(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("summaries")
    sink = DynamoDBSink(
        table,
        key="sensor",
        endpoint_url=moto_endpoint,
        region=REGION,
        create_table=True,
        flush_interval=0.05,
        **CREDENTIALS,
    )
    values = readings()
    async with TestRun(summary_app(sink)) as run:
        await run.send_many("readings", values, key=lambda v: v["sensor"])
        await run.finish()
        dead = run.dead_letters()
        assert committed_everything(run)

    good = [v for v in values if v["sensor"] is not None and v["values"]]
    stored = {i["sensor"]: i for i in await scan(aws("dynamodb"), table)}
    assert sorted(stored) == sorted(v["sensor"] for v in good)
    assert all(float(stored[v["sensor"]]["mean"]) == sum(v["values"]) / 2 for v in good)

    nan_sensors = sorted(v["sensor"] for v in values if v["sensor"] and not v["values"])
    assert nan_sensors == ["s03", "s10", "s17", "s24"]
    refused = f"sink dynamodb:{table} refused the record: "
    assert sorted(reason_of(d) for d in dead) == sorted(
        [
            *(
                f"{refused}field 'mean': NaN is not a number DynamoDB can store; "
                f"filter or replace NaN/inf first (sensor='{s}')"
                for s in nan_sensors
            ),
            f"{refused}field 'sensor': missing, and the record has no key; "
            "send it with a key or add the field",
        ]
    )
    assert {header(d, "asyncflow.sink") for d in dead} == {f"dynamodb:{table}"}
    assert sorted(d.key for d in dead if d.key is not None) == [s.encode() for s in nan_sensors]
    assert sink.stats.items_rejected == 5


async def test_outputs_kinesis_refuses_are_dead_letters_and_the_good_ones_are_in_the_stream(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    """Kinesis takes NaN (orjson writes it as null); a key over 256 characters it cannot take."""
    stream = unique("summaries")
    await create_stream(aws("kinesis"), stream, 1)
    sink = KinesisSink(stream, endpoint_url=moto_endpoint, region=REGION, **CREDENTIALS)
    long_keys = [f"long-{i}-" + "x" * 300 for i in range(2)]
    values = [{"sensor": f"s{i}", "values": [float(i)] if i % 3 else []} for i in range(10)]
    values += [{"sensor": k, "values": [1.0]} for k in long_keys]
    async with TestRun(summary_app(sink)) as run:
        await run.send_many("readings", values, key=lambda v: v["sensor"])
        await run.finish()
        dead = run.dead_letters()
        assert committed_everything(run)

    stored = [orjson.loads(r["Data"]) for r in await read_stream(aws("kinesis"), stream)]
    assert sorted(r["sensor"] for r in stored) == sorted(f"s{i}" for i in range(10))
    assert {r["sensor"]: r["mean"] for r in stored}["s0"] is None  # NaN, as orjson writes it
    assert sorted(d.key for d in dead) == sorted(k.encode() for k in long_keys)
    for d in dead:
        assert reason_of(d).startswith(
            f"sink kinesis:{stream} refused the record: a partition key must have 1 to 256 "
            "characters, this one has 307: 'long-"
        )
