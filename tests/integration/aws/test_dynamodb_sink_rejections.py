"""DynamoDBSink refuses what it can never store, and still retries what fails for a while.

Against a real moto server (5.2.5). Where a refusal is decided:

- client-side, before any request (``DynamoDBSink._item``): a value that is not
  a mapping; no key field and no ``SinkRecord.key``; no sort key; NaN,
  infinities, numbers outside DynamoDB's range, unknown types (the reason names
  the field, nested as ``readings.mean`` or ``xs[1]``); a key attribute that is
  not a string, number or bytes;
- by the service (moto enforces these as DynamoDB does, with
  ``ValidationException``): an item over the size limit (moto's is 405,000
  bytes, DynamoDB's 400 KB = 409,600; a 420,000-byte item is over both), an
  empty string as a key, a key of another type than the table's (a number for a
  string key). moto refuses the whole ``BatchWriteItem`` but, unlike DynamoDB,
  has written the items before the bad one; the sink's item-by-item ``PutItem``
  writes them again, which changes nothing.

Transient failures (throttling, an endpoint that does not answer) are injected
with the ``_wrap_client`` hook: they are retried, and after ``max_retries`` the
write raises ``SinkError`` and returns nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from asyncflow.errors import SinkError
from asyncflow.protocols import SinkRecord
from tests.integration.aws.test_dynamodb_sink import Wrapped, make_sink, scan

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

BIG = "x" * 420_000
"""Over moto's item limit (405,000 bytes) and DynamoDB's (409,600)."""


def throttled(operation: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        },
        operation,
    )


class Counting(Wrapped):
    """Counts requests; the first ``throttle_puts`` PutItem calls (and, if
    ``throttle_batches``, every BatchWriteItem) fail with throttling."""

    def __init__(self, client: Any, throttle_puts: int = 0, throttle_batches: bool = False) -> None:
        super().__init__(client)
        self.throttle_puts = throttle_puts
        self.throttle_batches = throttle_batches
        self.batch_calls = 0
        self.put_calls = 0

    async def batch_write_item(self, **kwargs: Any) -> dict[str, Any]:
        self.batch_calls += 1
        if self.throttle_batches:
            raise throttled("BatchWriteItem")
        return dict(await self.client.batch_write_item(**kwargs))

    async def put_item(self, **kwargs: Any) -> dict[str, Any]:
        self.put_calls += 1
        if self.put_calls <= self.throttle_puts:
            raise throttled("PutItem")
        return dict(await self.client.put_item(**kwargs))


def wrapper(**options: Any) -> tuple[list[Counting], Callable[[str, Any], Any]]:
    made: list[Counting] = []

    def wrap(service: str, client: Any) -> Any:
        made.append(Counting(client, **options))
        return made[-1]

    return made, wrap


def good_records(n: int) -> list[SinkRecord]:
    return [SinkRecord(key=f"good-{i:02d}", value={"n": i, "mean": i / 4}) for i in range(n)]


async def test_bad_records_come_back_rejected_with_reasons_and_the_good_ones_are_in_the_table(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    """40 good records (two chunks of 25) with client-side and service-side refusals in both."""
    table = unique("mixed")
    bad = {
        "nan": SinkRecord(key="nan", value={"readings": {"mean": math.nan}}),
        "inf": SinkRecord(key="inf", value={"xs": [1.0, math.inf]}),
        "no key": SinkRecord(key=None, value={"n": 4}),
        "scalar": SinkRecord(key="scalar", value=42),
        "big": SinkRecord(key="big", value={"blob": BIG}),
        "empty key": SinkRecord(key="", value={"n": 5}),
        "number key": SinkRecord(key=7, value={"n": 6}),
        "big too": SinkRecord(key="big-2", value={"blob": BIG}),
    }
    good = good_records(40)
    records = [*good[:5], bad["nan"], bad["big"], *good[5:12], bad["inf"], bad["no key"]]
    records += [*good[12:20], bad["scalar"], bad["empty key"], *good[20:], bad["number key"]]
    records += [bad["big too"]]
    sink = make_sink(moto_endpoint, table)
    await sink.start()
    try:
        rejected = await sink.write(records)
    finally:
        await sink.stop()

    in_order = [r for r in records if any(r is b for b in bad.values())]
    assert [r.record for r in rejected] == in_order
    assert all(r.record is b for r, b in zip(rejected, in_order, strict=True))  # the very objects
    reason = {
        name: next(r.reason for r in rejected if r.record is rec) for name, rec in bad.items()
    }
    assert reason["nan"] == (
        "field 'readings.mean': NaN is not a number DynamoDB can store; "
        "filter or replace NaN/inf first (id='nan')"
    )
    assert reason["inf"].startswith("field 'xs[1]': Infinity is not a number")
    assert reason["no key"] == (
        "field 'id': missing, and the record has no key; send it with a key or add the field"
    )
    assert reason["scalar"].startswith("the value is a int, not a dict, dataclass or record")
    # refused by moto, with its message
    assert reason["big"] == (
        "DynamoDB refused the item (id='big'): Item size has exceeded the maximum allowed size"
    )
    assert reason["big too"].startswith("DynamoDB refused the item (id='big-2'): Item size")
    assert reason["empty key"].startswith("DynamoDB refused the item (id=''): ")
    assert "empty string" in reason["empty key"]
    assert reason["number key"] == (
        "DynamoDB refused the item (id=7): One or more parameter values were invalid: "
        "Type mismatch for key id expected: S actual: N"
    )

    stored = {i["id"]: i for i in await scan(aws("dynamodb"), table)}
    assert stored == {
        r.key: {"id": r.key, "n": Decimal(r.value["n"]), "mean": Decimal(repr(r.value["mean"]))}
        for r in good
    }
    assert sink.stats.items_rejected == 8
    assert sink.stats.items_written == 40
    assert sink.stats.batches_split == 2  # each chunk held an item the service refused


async def test_values_refused_client_side_send_no_request(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    made, wrap = wrapper()
    sink = make_sink(moto_endpoint, unique("client"), _wrap_client=wrap)
    records = [
        SinkRecord(key="a", value={"f": object()}),
        SinkRecord(key="b", value={"n": 1e300}),
        SinkRecord(key="c", value={"tags": set()}),
        SinkRecord(key=None, value={"id": ["a", "list"]}),
    ]
    await sink.start()
    try:
        rejected = await sink.write(records)
    finally:
        await sink.stop()
    assert [r.record for r in rejected] == records
    reasons = [r.reason for r in rejected]
    assert reasons[0].startswith("field 'f': values of type object cannot be stored")
    assert reasons[1].startswith("field 'n': 1E+300 is outside DynamoDB's numbers")
    assert reasons[2].startswith("field 'tags': DynamoDB cannot store an empty set")
    assert reasons[3].startswith("field 'id': a key attribute must be a string, number or bytes")
    assert (made[0].batch_calls, made[0].put_calls, sink.stats.requests) == (0, 0, 0)


async def test_a_record_without_its_sort_key_is_refused_naming_the_sort_key(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("sorted")
    sink = make_sink(moto_endpoint, table, sort_key="window_start")
    ok = SinkRecord(key="a", value={"window_start": "2024-02-06T16:58:00", "mean": 1})
    missing = SinkRecord(key="a", value={"mean": 2})
    await sink.start()
    try:
        rejected = await sink.write([ok, missing])
    finally:
        await sink.stop()
    assert [(r.record, r.reason) for r in rejected] == [
        (missing, "field 'window_start': the sort key is missing (id='a')")
    ]
    assert len(await scan(aws("dynamodb"), table)) == 1


async def test_a_refused_last_write_of_a_key_leaves_the_previous_write_of_that_key(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    """As if the refused record had not been sent: the write before it of its key is stored.

    ``k``'s last write is refused by the service (too large), ``m``'s by the
    sink (NaN); ``e`` has no refusal and keeps last-write-wins. Writes
    superseded by a stored one are neither stored nor returned.
    """
    table = unique("superseded")
    k1, k2 = SinkRecord("k", {"v": 1}), SinkRecord("k", {"v": 2, "blob": BIG})
    m1, m2 = SinkRecord("m", {"v": 1}), SinkRecord("m", {"v": math.nan})
    e1, e2 = SinkRecord("e", {"v": 1}), SinkRecord("e", {"v": 2})
    sink = make_sink(moto_endpoint, table)
    await sink.start()
    try:
        rejected = await sink.write([k1, m1, e1, k2, m2, e2])
    finally:
        await sink.stop()
    assert [r.record for r in rejected] == [k2, m2]
    stored = {i["id"]: i["v"] for i in await scan(aws("dynamodb"), table)}
    assert stored == {"k": 1, "m": 1, "e": 2}
    assert sink.stats.duplicates_collapsed == 2  # k1 and e1 (m2 never became an item)


async def test_numeric_keys_equal_as_numbers_are_one_key(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    """DynamoDB compares numbers by value (``1`` and ``1.0`` are one key, a batch may not hold
    both), so the collapse does too."""
    table = unique("numeric")
    sink = make_sink(moto_endpoint, table, key_type="N")
    await sink.start()
    try:
        rejected = await sink.write([SinkRecord(1, {"v": "a"}), SinkRecord(1.0, {"v": "b"})])
    finally:
        await sink.stop()
    assert rejected == []
    assert [(i["id"], i["v"]) for i in await scan(aws("dynamodb"), table)] == [(1, "b")]
    assert (sink.stats.duplicates_collapsed, sink.stats.batches_split) == (1, 0)


async def test_throttling_of_the_item_by_item_writes_is_retried(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("throttled-puts")
    made, wrap = wrapper(throttle_puts=4)
    sink = make_sink(moto_endpoint, table, _wrap_client=wrap)
    big = SinkRecord(key="big", value={"blob": BIG})
    good = good_records(10)
    await sink.start()
    try:
        rejected = await sink.write([*good[:3], big, *good[3:]])
    finally:
        await sink.stop()
    assert [r.record for r in rejected] == [big]
    assert sorted(i["id"] for i in await scan(aws("dynamodb"), table)) == [r.key for r in good]
    assert made[0].put_calls == 11 + 4  # each of the chunk's 11 items once, and 4 throttled


async def test_item_by_item_writes_that_stay_throttled_raise_sink_error(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    made, wrap = wrapper(throttle_puts=10**9)
    sink = make_sink(moto_endpoint, unique("stuck-puts"), max_retries=2, _wrap_client=wrap)
    await sink.start()
    try:
        with pytest.raises(SinkError, match=r"PutItem on .* still failing after 3 attempts"):
            await sink.write([*good_records(3), SinkRecord(key="big", value={"blob": BIG})])
    finally:
        await sink.stop()
    assert made[0].put_calls == 3


async def test_batches_that_stay_throttled_raise_sink_error_even_with_refusable_records(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    """A write that raises returns nothing: its refusals are found again when it is replayed."""
    made, wrap = wrapper(throttle_batches=True)
    sink = make_sink(moto_endpoint, unique("stuck-batches"), max_retries=3, _wrap_client=wrap)
    await sink.start()
    try:
        with pytest.raises(SinkError, match=r"BatchWriteItem on .* still failing after 4 attempts"):
            await sink.write([*good_records(3), SinkRecord(key="nan", value={"v": math.nan})])
    finally:
        await sink.stop()
    assert made[0].batch_calls == 4


async def test_an_endpoint_that_stops_answering_raises_sink_error(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    class Gone(Wrapped):
        async def batch_write_item(self, **kwargs: Any) -> dict[str, Any]:
            raise EndpointConnectionError(endpoint_url=moto_endpoint)

    sink = make_sink(
        moto_endpoint, unique("gone"), max_retries=2, _wrap_client=lambda s, c: Gone(c)
    )
    await sink.start()
    try:
        with pytest.raises(SinkError, match="cannot reach dynamodb"):
            await sink.write(good_records(3))
    finally:
        await sink.stop()
