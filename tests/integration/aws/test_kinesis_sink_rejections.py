"""KinesisSink refuses what Kinesis can never take, and still retries what fails for a while.

Against a real moto server (5.2.5). Where a refusal is decided:

- client-side, before any request (``KinesisSink._entry``): a value orjson
  cannot encode; a partition key that is not 1 to 256 characters or not valid
  Unicode; data plus partition key over ``max_record_bytes`` (1 MiB by default).
  botocore would refuse an empty partition key itself (``ParamValidationError``)
  and moto a longer one (``InvalidArgumentException``, after writing the records
  before it: checking here first keeps that from duplicating records);
- by the service: moto, like Kinesis, refuses a whole request holding a record
  over 1 MiB (data plus partition key) with ``ValidationException`` and writes
  none of it. The sink meets that only when its own limit is looser than the
  stream's (here ``max_record_bytes`` raised to 4 MiB); it then splits the
  request in halves until the culprit is alone.

The per-record ``ErrorCode`` of a ``PutRecords`` answer is only ever
``ProvisionedThroughputExceededException`` or ``InternalFailure`` (the API
reference); moto never reports either, so they are injected with
``_wrap_client``: they are retried and, after ``max_retries``, raise ``SinkError``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from asyncflow.errors import SinkError
from asyncflow.protocols import SinkRecord
from tests.integration.aws.kinesis_util import create_stream
from tests.integration.aws.test_kinesis_sink import PartlyFailing, make_sink, read_stream

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1 << 20


class Recording(PartlyFailing):
    """PartlyFailing that also keeps the partition keys of every request it passes on."""

    def __init__(
        self,
        client: Any,
        times: int = 0,
        fail: Callable[[int], bool] = bool,
        code: str = "ProvisionedThroughputExceededException",
    ) -> None:
        super().__init__(client, times, fail)
        self.code = code
        self.keys: list[list[str]] = []

    async def put_records(self, StreamName: str, Records: list[Any]) -> dict[str, Any]:
        self.keys.append([r["PartitionKey"] for r in Records])
        response = await super().put_records(StreamName=StreamName, Records=Records)
        for r in response["Records"]:
            if "ErrorCode" in r:
                r["ErrorCode"] = self.code
        return response


def recording(**options: Any) -> tuple[list[Recording], Callable[[str, Any], Any]]:
    made: list[Recording] = []

    def wrap(service: str, client: Any) -> Any:
        made.append(Recording(client, **options))
        return made[-1]

    return made, wrap


def good_records(n: int) -> list[SinkRecord]:
    return [SinkRecord(key=f"good-{i}", value={"i": i}) for i in range(n)]


async def test_bad_records_come_back_rejected_with_reasons_and_the_good_ones_are_in_the_stream(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("mixed")
    await create_stream(aws("kinesis"), stream, 2)
    made, wrap = recording()
    bad = {
        "too big": SinkRecord(key="big", value=b"x" * MIB),  # 1 MiB + the 3-byte key
        "long key": SinkRecord(key="k" * 257, value={"i": -1}),
        "empty key": SinkRecord(key="", value={"i": -2}),
        "no json": SinkRecord(key="obj", value={"f": object()}),
        "surrogate": SinkRecord(key="\ud800", value={"i": -3}),
    }
    good = good_records(30)
    records = [*good[:10], bad["too big"], bad["long key"], *good[10:20], bad["empty key"]]
    records += [bad["no json"], *good[20:], bad["surrogate"]]
    sink = make_sink(moto_endpoint, stream, _wrap_client=wrap)
    await sink.start()
    try:
        rejected = await sink.write(records)
    finally:
        await sink.stop()

    in_order = [r for r in records if any(r is b for b in bad.values())]
    assert [r.record for r in rejected] == in_order
    assert all(r.record is b for r, b in zip(rejected, in_order, strict=True))
    reason = {
        name: next(r.reason for r in rejected if r.record is rec) for name, rec in bad.items()
    }
    assert reason["too big"] == (
        "the record is 1048579 bytes (data and partition key), over the 1048576-byte Kinesis "
        "record limit"
    )
    assert reason["long key"].startswith(
        "a partition key must have 1 to 256 characters, this one has 257: 'kkk"
    )
    assert (
        reason["empty key"] == "a partition key must have 1 to 256 characters, this one has 0: ''"
    )
    assert reason["no json"].startswith("cannot encode a dict as JSON for Kinesis: Type is not")
    assert reason["surrogate"] == "the partition key is not valid Unicode text: '\\ud800'"

    assert made[0].keys == [[r.key for r in good]]  # one request, only the good records
    stored = await read_stream(aws("kinesis"), stream)
    assert sorted(orjson.loads(r["Data"])["i"] for r in stored) == list(range(30))
    assert sink.stats.records_rejected == 5
    assert sink.stats.records_written == 30


async def test_a_request_the_service_refuses_is_split_until_the_culprit_is_alone(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    """With a limit looser than the stream's, moto refuses the whole request (ValidationException)."""
    stream = unique("split")
    await create_stream(aws("kinesis"), stream, 1)
    made, wrap = recording()
    sink = make_sink(
        moto_endpoint,
        stream,
        max_record_bytes=4 * MIB,
        max_request_bytes=16 * MIB,
        _wrap_client=wrap,
    )
    good = good_records(15)
    big = SinkRecord(key="big", value=b"x" * (2 * MIB))
    await sink.start()
    try:
        rejected = await sink.write([*good[:11], big, *good[11:]])
    finally:
        await sink.stop()
    assert [r.record for r in rejected] == [big]
    assert rejected[0].reason.startswith(
        "Kinesis refused the record: ValidationException: 1 validation error detected: "
        "Value at 'records.1.member.data' failed to satisfy constraint: Member must have "
        "length less than or equal to 1048576"
    )
    stored = await read_stream(aws("kinesis"), stream)
    # each good record exactly once, in order (the halves are sent one after the other)
    assert [orjson.loads(r["Data"])["i"] for r in stored] == list(range(15))
    # 16 refused; its first half goes through, the second is refused and split again...
    assert [len(k) for k in made[0].keys] == [16, 8, 8, 4, 2, 2, 1, 1, 4]
    assert sink.stats.requests_split == 4


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "InternalFailure"])
async def test_records_failing_with_a_transient_error_code_are_retried_beside_refused_ones(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str], code: str
) -> None:
    stream = unique("transient")
    await create_stream(aws("kinesis"), stream, 1)
    made, wrap = recording(times=2, fail=lambda i: i % 2 == 0, code=code)
    sink = make_sink(moto_endpoint, stream, _wrap_client=wrap)
    big = SinkRecord(key="big", value=b"x" * (2 * MIB))
    await sink.start()
    try:
        rejected = await sink.write([*good_records(6), big])
    finally:
        await sink.stop()
    assert [r.record for r in rejected] == [big]
    stored = await read_stream(aws("kinesis"), stream)
    assert Counter(orjson.loads(r["Data"])["i"] for r in stored) == Counter(range(6))
    assert [len(k) for k in made[0].keys] == [6, 3, 2]
    assert sink.stats.records_retried == 3 + 2


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "InternalFailure"])
async def test_records_that_keep_failing_with_a_transient_error_code_raise_sink_error(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str], code: str
) -> None:
    stream = unique("stuck")
    await create_stream(aws("kinesis"), stream, 1)
    made, wrap = recording(times=10**9, fail=lambda i: True, code=code)
    sink = make_sink(moto_endpoint, stream, max_retries=2, _wrap_client=wrap)
    await sink.start()
    try:
        with pytest.raises(SinkError, match=f"3 records still failing after 3 attempts \\({code}"):
            await sink.write([*good_records(3), SinkRecord(key="", value=b"refused")])
    finally:
        await sink.stop()


async def test_a_request_that_stays_throttled_raises_sink_error(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    stream = unique("throttled")
    await create_stream(aws("kinesis"), stream, 1)

    class Throttled(Recording):
        async def put_records(self, StreamName: str, Records: list[Any]) -> dict[str, Any]:
            self.keys.append([r["PartitionKey"] for r in Records])
            raise ClientError(
                {
                    "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                "PutRecords",
            )

    made: list[Throttled] = []

    def wrap(service: str, client: Any) -> Any:
        made.append(Throttled(client))
        return made[-1]

    sink = make_sink(moto_endpoint, stream, max_retries=3, _wrap_client=wrap)
    await sink.start()
    try:
        with pytest.raises(SinkError, match=r"PutRecords to .* still failing after 4 attempts"):
            await sink.write(good_records(4))
    finally:
        await sink.stop()
    assert len(made[0].keys) == 4
