"""DynamoDBSink against a real moto server on loopback."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from botocore.exceptions import ClientError

from adapters._aws import AwsCredentialsError, AwsUnavailable
from adapters.dynamodb import DynamoDBSink, TableNotFound, item_from_dynamodb
from asyncflow.errors import ConfigError, SinkError
from asyncflow.protocols import SinkRecord
from tests.integration.aws.moto import CREDENTIALS, REGION, free_port, start_moto

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

EPOCH = datetime(2024, 2, 6, 16, 58, tzinfo=UTC)


def make_sink(endpoint: str, table: str, **kwargs: Any) -> DynamoDBSink:
    options: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region": REGION,
        "create_table": True,
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        **CREDENTIALS,
    }
    options.update(kwargs)
    return DynamoDBSink(table, **options)


async def scan(client: Any, table: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table}
    while True:
        page = await client.scan(**kwargs)
        items.extend(item_from_dynamodb(i) for i in page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def window_results(sensors: int, windows: int) -> list[SinkRecord]:
    """Window-result-shaped records; the key attribute ("id") only in SinkRecord.key."""
    out = []
    for w in range(windows):
        start = EPOCH + timedelta(seconds=5 * w)
        for s in range(sensors):
            values = [20.0 + s / 7 + w / 3, 21.5 + s / 11, 19.25 - w / 13]
            out.append(
                SinkRecord(
                    key=f"sensor-{s:03d}",
                    value={
                        "window_start": start,
                        "window_end": start + timedelta(seconds=5),
                        "count": len(values),
                        "mean": sum(values) / len(values),
                        "min": min(values),
                        "max": max(values),
                    },
                )
            )
    return out


def expected_item(rec: SinkRecord) -> dict[str, Any]:
    v = rec.value
    return {
        "id": rec.key,
        "window_start": v["window_start"].isoformat(),
        "window_end": v["window_end"].isoformat(),
        "count": Decimal(v["count"]),
        "mean": Decimal(repr(v["mean"])),
        "min": Decimal(repr(v["min"])),
        "max": Decimal(repr(v["max"])),
    }


class Wrapped:
    """Delegates to the real client; a test overrides single operations."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


class HalfUnprocessed(Wrapped):
    """The first ``times`` BatchWriteItem calls store only half the items and
    return the rest as ``UnprocessedItems``, as DynamoDB does when throttling.

    A single item always goes through: halving would return all of it, and
    whether one chunk then runs out of retries would depend on how the sink's
    concurrent chunk writes interleave (the test failed once on a loaded machine).
    """

    def __init__(self, client: Any, times: int) -> None:
        super().__init__(client)
        self.times = times
        self.calls = 0

    async def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        ((table, requests),) = RequestItems.items()
        if self.calls > self.times or len(requests) < 2:
            return dict(await self.client.batch_write_item(RequestItems=RequestItems))
        keep, back = requests[: len(requests) // 2], requests[len(requests) // 2 :]
        if keep:
            await self.client.batch_write_item(RequestItems={table: keep})
        return {"UnprocessedItems": {table: back}}


class Throttled(Wrapped):
    """The first ``times`` BatchWriteItem calls fail with ProvisionedThroughputExceeded."""

    def __init__(self, client: Any, times: int) -> None:
        super().__init__(client)
        self.times = times
        self.calls = 0

    async def batch_write_item(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.times:
            raise ClientError(
                {
                    "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                "BatchWriteItem",
            )
        return dict(await self.client.batch_write_item(**kwargs))


@pytest.mark.slow
async def test_ten_thousand_window_results_land_as_exactly_the_expected_items(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("windows")
    sink = make_sink(moto_endpoint, table, key="id", sort_key="window_start")
    records = window_results(sensors=100, windows=100)
    await sink.start()
    try:
        for i in range(0, len(records), sink.max_batch):
            await sink.write(records[i : i + sink.max_batch])
    finally:
        await sink.stop()
    stored = await scan(aws("dynamodb"), table)

    def order(item: dict[str, Any]) -> tuple[str, str]:
        return (item["id"], item["window_start"])

    assert len(stored) == 10_000
    assert sorted(stored, key=order) == sorted(map(expected_item, records), key=order)
    assert sink.stats.items_written == 10_000


async def test_unprocessed_items_are_retried_and_nothing_is_lost(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("unprocessed")
    wrappers: list[HalfUnprocessed] = []

    def wrap(service: str, client: Any) -> Any:
        wrappers.append(HalfUnprocessed(client, times=30))
        return wrappers[-1]

    sink = make_sink(moto_endpoint, table, key="id", sort_key="window_start", _wrap_client=wrap)
    records = window_results(sensors=10, windows=50)
    await sink.start()
    try:
        await sink.write(records)
    finally:
        await sink.stop()
    stored = await scan(aws("dynamodb"), table)
    assert len(stored) == 500
    assert sorted(i["mean"] for i in stored) == sorted(expected_item(r)["mean"] for r in records)
    assert sink.stats.unprocessed_retried > 0
    assert wrappers[0].calls > 20  # 20 chunks of 25, and the retries


async def test_throttling_errors_are_retried_with_backoff(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("throttled")
    sink = make_sink(
        moto_endpoint, table, concurrency=1, _wrap_client=lambda s, c: Throttled(c, times=3)
    )
    await sink.start()
    try:
        await sink.write([SinkRecord(key=f"k{i}", value={"n": i}) for i in range(60)])
    finally:
        await sink.stop()
    assert len(await scan(aws("dynamodb"), table)) == 60


async def test_items_that_stay_unprocessed_raise_sink_error_after_bounded_retries(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    sink = make_sink(
        moto_endpoint,
        unique("stuck"),
        max_retries=3,
        _wrap_client=lambda s, c: HalfUnprocessed(c, times=10**9),
    )
    await sink.start()
    try:
        with pytest.raises(SinkError, match=r"still unprocessed after 4 attempts.*capacity"):
            await sink.write([SinkRecord(key=f"k{i}", value={"n": i}) for i in range(10)])
    finally:
        await sink.stop()


async def test_floats_round_trip_exactly(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("floats")
    floats = [
        0.1,
        1 / 3,
        2 / 3,
        0.30000000000000004,
        1e-7,
        math.pi,
        -2.5,
        123456.789,
        2.0**53 + 2,
        1e125,
        1.5e-130,
        5e-324 * 2**1000,
        17.0,
        6.02214076e23,
    ]
    sink = make_sink(moto_endpoint, table)
    await sink.start()
    try:
        await sink.write(
            [
                SinkRecord(key=f"f{i}", value={"x": x, "nested": {"xs": [x]}})
                for i, x in enumerate(floats)
            ]
        )
    finally:
        await sink.stop()
    client = aws("dynamodb")
    for i, x in enumerate(floats):
        raw = (await client.get_item(TableName=table, Key={"id": {"S": f"f{i}"}}))["Item"]
        assert float(raw["x"]["N"]) == x, raw["x"]
        assert Decimal(raw["x"]["N"]) == Decimal(repr(x))
        assert float(raw["nested"]["M"]["xs"]["L"][0]["N"]) == x


@pytest.mark.parametrize(
    ("value", "problem"),
    [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "Infinity"), (1e300, "outside")],
)
async def test_nan_infinity_and_out_of_range_numbers_are_rejected_naming_the_field(
    moto_endpoint: str, unique: Callable[[str], str], value: float, problem: str
) -> None:
    sink = make_sink(moto_endpoint, unique("nan"))
    record = SinkRecord(key="a", value={"readings": {"mean": value}})
    await sink.start()
    try:
        [rejected] = await sink.write([record])
    finally:
        await sink.stop()
    assert rejected.record is record
    assert rejected.reason.startswith("field 'readings.mean': ")
    assert problem in rejected.reason
    assert rejected.reason.endswith("(id='a')")


async def test_duplicate_keys_in_a_batch_collapse_to_the_last_write(
    moto_endpoint: str, aws: Callable[[str], Any], unique: Callable[[str], str]
) -> None:
    table = unique("dups")
    sink = make_sink(moto_endpoint, table)
    batch = [SinkRecord(key=f"k{i % 7}", value={"version": i}) for i in range(40)]
    await sink.start()
    try:
        await sink.write(batch)
    finally:
        await sink.stop()
    stored = {i["id"]: i["version"] for i in await scan(aws("dynamodb"), table)}
    assert stored == {f"k{k}": max(i for i in range(40) if i % 7 == k) for k in range(7)}
    assert sink.stats.duplicates_collapsed == 33


async def test_missing_table_error_names_the_table_and_how_to_create_it(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    table = unique("absent")
    sink = make_sink(moto_endpoint, table, create_table=False, sort_key="window_start")
    with pytest.raises(TableNotFound) as info:
        await sink.start()
    message = str(info.value)
    assert repr(table) in message
    assert f"aws dynamodb create-table --table-name {table}" in message
    assert "AttributeName=window_start,KeyType=RANGE" in message
    assert "create_table=True" in message


async def test_table_with_another_key_schema_is_refused(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    table = unique("schema")
    first = make_sink(moto_endpoint, table, key="id")
    await first.start()
    await first.stop()
    with pytest.raises(ConfigError, match="keyed by"):
        await make_sink(moto_endpoint, table, key="sensor").start()


async def test_rejected_credentials_give_a_clear_error(unique: Callable[[str], str]) -> None:
    # moto checks credentials only with INITIAL_NO_AUTH_ACTION_COUNT set: a second,
    # authenticating server answers unknown keys with InvalidClientTokenId (403).
    server = start_moto(auth=True)
    try:
        sink = make_sink(server.endpoint_url, unique("auth"), max_retries=1)
        with pytest.raises(AwsCredentialsError) as info:
            await sink.start()
    finally:
        server.stop()
    message = str(info.value)
    assert "rejected the AWS credentials (InvalidClientTokenId)" in message
    assert "AWS_ACCESS_KEY_ID" in message


async def test_missing_credentials_give_a_clear_error(
    moto_endpoint: str, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    sink = DynamoDBSink(unique("nocreds"), endpoint_url=moto_endpoint, region=REGION)
    with pytest.raises(AwsCredentialsError, match="no usable AWS credentials"):
        await sink.start()


async def test_missing_region_gives_a_clear_error(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ConfigError, match="AWS_REGION"):
        await DynamoDBSink("t", endpoint_url=moto_endpoint).start()


async def test_unreachable_endpoint_gives_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    sink = make_sink(url, "t", max_retries=2)
    with pytest.raises(AwsUnavailable, match=f"cannot reach dynamodb at {url}"):
        await sink.start()


async def test_values_that_cannot_become_items_are_rejected_and_misuse_is_a_sink_error(
    moto_endpoint: str, unique: Callable[[str], str]
) -> None:
    sink = make_sink(moto_endpoint, unique("types"))
    with pytest.raises(SinkError, match=r"dynamodb:types-\w+: write\(\) before start\(\)"):
        await sink.write([SinkRecord(key="a", value={"n": 1})])
    await sink.start()
    try:
        [wrong_type] = await sink.write([SinkRecord(key="a", value={"f": object()})])
        [no_key] = await sink.write([SinkRecord(key=None, value={"n": 1})])
    finally:
        await sink.stop()
    assert "values of type object cannot be stored" in wrong_type.reason
    assert "field 'id': missing, and the record has no key" in no_key.reason


async def test_endpoint_region_and_credentials_come_from_the_environment(
    moto_endpoint: str,
    aws: Callable[[str], Any],
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    table = unique("env")
    sink = DynamoDBSink(table, create_table=True)
    await sink.start()
    try:
        await sink.write([SinkRecord(key="a", value={"n": 1})])
    finally:
        await sink.stop()
    assert await scan(aws("dynamodb"), table) == [{"id": "a", "n": Decimal(1)}]
