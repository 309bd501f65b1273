"""KinesisSink against a real moto server on loopback."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from adapters.kinesis import KinesisSink, StreamNotFound
from asyncflow.errors import SinkError
from asyncflow.protocols import SinkRecord
from tests.integration.aws.kinesis_util import create_stream
from tests.integration.aws.moto import CREDENTIALS, REGION

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]


def make_sink(endpoint: str, stream: str, **kwargs: Any) -> KinesisSink:
    options: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region": REGION,
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        **CREDENTIALS,
    }
    options.update(kwargs)
    return KinesisSink(stream, **options)


async def read_stream(kinesis: Any, stream: str) -> list[dict[str, Any]]:
    """Every record of every shard, from TRIM_HORIZON."""
    out = []
    for shard in (await kinesis.list_shards(StreamName=stream))["Shards"]:
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        while True:
            page = await kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            out.extend(page["Records"])
            if not page["Records"]:
                break
            iterator = page["NextShardIterator"]
    return out


class PartlyFailing:
    """PutRecords that, for the first ``times`` calls, stores only some records and reports
    the others as failed with a per-record ErrorCode, as Kinesis does under load."""

    def __init__(self, client: Any, times: int, fail: Callable[[int], bool]) -> None:
        self.client = client
        self.times = times
        self.fail = fail
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    async def put_records(self, StreamName: str, Records: list[Any]) -> dict[str, Any]:
        self.calls.append(len(Records))
        if len(self.calls) > self.times:
            return dict(await self.client.put_records(StreamName=StreamName, Records=Records))
        ok = [r for i, r in enumerate(Records) if not self.fail(i)]
        stored = (
            iter((await self.client.put_records(StreamName=StreamName, Records=ok))["Records"])
            if ok
            else iter([])
        )
        results = []
        for i in range(len(Records)):
            if self.fail(i):
                results.append(
                    {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow"}
                )
            else:
                results.append(next(stored))
        failed = sum(1 for r in results if "ErrorCode" in r)
        return {"FailedRecordCount": failed, "Records": results}


@dataclass
class Reading:
    id: str
    value: float


async def test_records_are_put_as_json_with_the_key_as_partition_key(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("out")
    await create_stream(aws("kinesis"), stream, 2)
    wrapped: list[PartlyFailing] = []

    def wrap(service: str, client: Any) -> Any:
        wrapped.append(PartlyFailing(client, times=0, fail=lambda i: False))
        return wrapped[-1]

    sink = make_sink(moto_endpoint, stream, _wrap_client=wrap)
    records = [SinkRecord(key=f"k{i % 10}", value={"i": i}) for i in range(1_200)]
    records += [
        SinkRecord(key=b"raw", value=b"\x00not json"),
        SinkRecord(key="dc", value=Reading("s1", 0.1)),
    ]
    await sink.start()
    try:
        await sink.write(records)
    finally:
        await sink.stop()
    assert wrapped[0].calls == [500, 500, 202]  # at most 500 records a request
    stored = await read_stream(aws("kinesis"), stream)
    by_key = Counter(r["PartitionKey"] for r in stored)
    assert by_key["k3"] == 120 and by_key["raw"] == 1
    datas = {r["Data"] for r in stored}
    assert b"\x00not json" in datas
    assert orjson.dumps({"id": "s1", "value": 0.1}) in datas
    assert sorted(
        orjson.loads(r["Data"])["i"] for r in stored if r["PartitionKey"][0] == "k"
    ) == list(range(1_200))


async def test_only_failed_records_are_retried_and_none_is_lost_or_duplicated(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("partial")
    await create_stream(aws("kinesis"), stream, 2)
    wrapped: list[PartlyFailing] = []

    def wrap(service: str, client: Any) -> Any:
        wrapped.append(PartlyFailing(client, times=3, fail=lambda i: i % 3 == 0))
        return wrapped[-1]

    sink = make_sink(moto_endpoint, stream, _wrap_client=wrap)
    await sink.start()
    try:
        await sink.write([SinkRecord(key=f"k{i}", value={"i": i}) for i in range(900)])
    finally:
        await sink.stop()
    stored = await read_stream(aws("kinesis"), stream)
    assert Counter(orjson.loads(r["Data"])["i"] for r in stored) == Counter(range(900))
    # 500 sent (167 fail), the 167 again (56 fail), 56 (19 fail), 19 (all stored), then 400
    assert wrapped[0].calls == [500, 167, 56, 19, 400]
    assert sink.stats.records_retried == 167 + 56 + 19
    assert sink.stats.records_written == 900


async def test_records_failing_every_retry_raise_sink_error(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("stuck")
    await create_stream(aws("kinesis"), stream, 1)
    sink = make_sink(
        moto_endpoint,
        stream,
        max_retries=2,
        _wrap_client=lambda s, c: PartlyFailing(c, times=10**9, fail=lambda i: i == 0),
    )
    await sink.start()
    try:
        with pytest.raises(
            SinkError, match=r"1 records still failing after 3 attempts \(Provisioned"
        ):
            await sink.write([SinkRecord(key="a", value={"i": i}) for i in range(5)])
    finally:
        await sink.stop()


async def test_requests_are_split_by_size(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("size")
    await create_stream(aws("kinesis"), stream, 1)
    wrapped: list[PartlyFailing] = []

    def wrap(service: str, client: Any) -> Any:
        wrapped.append(PartlyFailing(client, times=0, fail=lambda i: False))
        return wrapped[-1]

    sink = make_sink(moto_endpoint, stream, max_request_bytes=10_000, _wrap_client=wrap)
    await sink.start()
    try:
        await sink.write([SinkRecord(key="k", value=b"x" * 999) for _ in range(30)])
        [too_big] = await sink.write([SinkRecord(key="k", value=b"x" * (1 << 20))])
    finally:
        await sink.stop()
    assert "over the 1048576-byte Kinesis record limit" in too_big.reason
    assert wrapped[0].calls == [10, 10, 10]  # the record over the limit was never sent
    assert len(await read_stream(aws("kinesis"), stream)) == 30


async def test_missing_stream_gives_a_clear_error(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    stream = unique("absent")
    with pytest.raises(StreamNotFound, match=f"aws kinesis create-stream --stream-name {stream}"):
        await make_sink(moto_endpoint, stream).start()
