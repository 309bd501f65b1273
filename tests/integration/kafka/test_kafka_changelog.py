"""Durable state's Kafka seams on a real broker: changelog topics and committed positions.

``KafkaBroker`` is a ``ChangelogBroker`` (ensure_changelogs, append, read_changelog) and its
source is ``CommittedPositions``. Reads poll with a deadline and count records or look for
a sentinel: Tansu's end offsets are not exact (see /work/shared/TESTING.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, OffsetOutOfRangeError, RequestTimedOutError
from aiokafka.structs import RecordMetadata

from adapters.kafka import KafkaBroker, KafkaSource, KafkaSourceError
from asyncflow.errors import BrokerUnavailable, ConfigError, SinkError, TopicMissing
from asyncflow.protocols import (
    ChangelogBroker,
    CommittedPositions,
    Partition,
    RawRecord,
    Record,
    SinkRecord,
    TopicPartition,
    TopicSpec,
)
from tests.integration.kafka.broker import TEST_OPTIONS, unique_name, wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

SECRET_URL = (
    "kafka://127.0.0.1:1?security_protocol=SASL_PLAINTEXT"
    "&sasl_plain_username=app&sasl_plain_password=s3cret"
)


async def changelog(broker: KafkaBroker, partitions: int = 2) -> str:
    """A fresh changelog topic, made the way the core makes them."""
    name = unique_name("app-table") + "-changelog"
    await broker.ensure_changelogs([TopicSpec(name, partitions=partitions)])
    return name


def records(n: int, start: int = 0, prefix: str = "k") -> list[SinkRecord]:
    return [
        SinkRecord(f"{prefix}{i % 7}".encode(), f"value-{i}".encode() * 3)
        for i in range(start, start + n)
    ]


async def read_all(
    broker: KafkaBroker, topic: str, partition: int, start: int, count: int, timeout: float = 20.0
) -> list[RawRecord]:
    """Read ``count`` records from ``start`` on, call after call; fail after ``timeout``."""
    out: list[RawRecord] = []
    deadline = time.monotonic() + timeout
    position = start
    while len(out) < count:
        assert time.monotonic() < deadline, (
            f"read {len(out)} of {count} records of {topic}[{partition}]"
        )
        got = await broker.read_changelog(topic, partition, position, timeout=0.5)
        if got:
            position = got[-1].offset + 1
            out.extend(got)
    return out


async def topic_config(kafka_bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    resource = responses[0].resources[0]
    error_code, entries = resource[0], resource[4]
    assert error_code == 0, resource
    return {entry[0]: entry[1] for entry in entries}


# -- the protocols ------------------------------------------------------------------------------


async def test_the_kafka_broker_is_a_changelog_broker_and_its_source_knows_committed_positions(
    broker: KafkaBroker,
) -> None:
    assert isinstance(broker, ChangelogBroker)
    assert isinstance(broker.source([TopicSpec("x")], "g"), CommittedPositions)


# -- ensure_changelogs --------------------------------------------------------------------------


async def test_ensure_changelogs_creates_missing_topics_compacted_with_their_partition_count(
    broker: KafkaBroker, kafka_bootstrap: str
) -> None:
    a, b = unique_name("app-a") + "-changelog", unique_name("app-b") + "-changelog"
    await broker.ensure_changelogs(
        [TopicSpec(a, partitions=4), TopicSpec(b, partitions=2, config={"retention.ms": "-1"})]
    )
    topics = await broker.list_topics()
    assert topics[a] == 4 and topics[b] == 2
    assert (await topic_config(kafka_bootstrap, a))["cleanup.policy"] == "compact"
    assert await topic_config(kafka_bootstrap, b) == {
        "cleanup.policy": "compact",
        "retention.ms": "-1",
    }


async def test_ensure_changelogs_is_idempotent_and_leaves_existing_topics_alone(
    broker: KafkaBroker, kafka_bootstrap: str
) -> None:
    name = await changelog(broker, partitions=2)
    last = await broker.append(name, 1, records(3))
    await broker.ensure_changelogs([TopicSpec(name, partitions=2)])
    await broker.ensure_changelogs([TopicSpec(name, partitions=2)])
    assert (await broker.list_topics())[name] == 2
    assert [r.offset for r in await read_all(broker, name, 1, 0, 3)] == [0, 1, last]


async def test_ensure_changelogs_warns_when_an_existing_topic_has_fewer_partitions_than_asked(
    broker: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    name = await changelog(broker, partitions=2)
    caplog.set_level(logging.WARNING, logger="asyncflow.kafka")
    await broker.ensure_changelogs([TopicSpec(name, partitions=4)])
    assert f"changelog topic {name!r} has 2 partitions, fewer than the 4 asked" in caplog.text
    assert (await broker.list_topics())[name] == 2


async def test_ensure_changelogs_refuses_a_policy_that_would_delete_state(
    broker: KafkaBroker,
) -> None:
    name = unique_name("app-t") + "-changelog"
    with pytest.raises(ConfigError, match="must be compacted"):
        await broker.ensure_changelogs([TopicSpec(name, config={"cleanup.policy": "delete"})])
    assert name not in await broker.list_topics()


async def test_ensure_changelogs_with_create_off_raises_topic_missing(kafka_url: str) -> None:
    broker = KafkaBroker(kafka_url, dict(TEST_OPTIONS, create_topics="false"))
    name = unique_name("app-t") + "-changelog"
    try:
        with pytest.raises(TopicMissing, match=name):
            await broker.ensure_changelogs([TopicSpec(name, partitions=2)])
        assert name not in await broker.list_topics()
    finally:
        await broker.close()


# -- append and read_changelog ------------------------------------------------------------------


async def test_append_returns_the_offset_of_its_last_record_and_offsets_increase(
    broker: KafkaBroker,
) -> None:
    name = await changelog(broker)
    assert await broker.append(name, 0, records(1)) == 0
    assert await broker.append(name, 0, records(4)) == 4
    # many producer batches in one call (64 KiB each): the offset is still the last record's
    big = [SinkRecord(b"k%d" % i, b"x" * 200) for i in range(3000)]
    assert await broker.append(name, 0, big) == 3004
    assert await broker.append(name, 0, records(1)) == 3005


async def test_reading_from_zero_returns_exactly_what_was_appended_in_order(
    broker: KafkaBroker,
) -> None:
    name = await changelog(broker)
    written = [
        SinkRecord(b"a", b"1", headers=[("asyncflow-op", b"put")], timestamp=1_700_000_000_000),
        SinkRecord(b"b", b"2", headers=(("h1", b"x"), ("h2", b""))),
        SinkRecord(b"a", None),  # a tombstone: a deleted key
        SinkRecord(b"c", b""),  # an empty value is not a tombstone
        *records(2500, start=4),
        SinkRecord(b"__marker__", b"checkpoint-1", headers=[("asyncflow-marker", b"1")]),
    ]
    last = await broker.append(name, 1, written)
    assert last == len(written) - 1
    got = await read_all(broker, name, 1, 0, len(written))
    assert len(got) == len(written)
    assert [r.offset for r in got] == list(range(len(written)))
    assert [(r.key, r.value, list(r.headers)) for r in got] == [
        (w.key, w.value, list(w.headers)) for w in written
    ]
    assert got[0].timestamp == 1_700_000_000_000
    assert got[2].value is None and got[3].value == b""
    assert "ConsumerRecord" not in {type(r).__name__ for r in got}  # read without the copy


async def test_reading_from_a_middle_offset_starts_there(broker: KafkaBroker) -> None:
    name = await changelog(broker)
    await broker.append(name, 0, records(10))
    await broker.append(name, 0, records(10, start=10))
    got = await read_all(broker, name, 0, 7, 13)
    assert [r.offset for r in got] == list(range(7, 20))
    assert got[0].value == b"value-7" * 3
    # and back again: a read before the consumer's position seeks back
    again = await read_all(broker, name, 0, 2, 18)
    assert [r.offset for r in again] == list(range(2, 20))


async def test_max_records_bounds_one_read(broker: KafkaBroker) -> None:
    name = await changelog(broker)
    await broker.append(name, 0, records(50))
    got: list[RawRecord] = []
    deadline = time.monotonic() + 10
    while not got:
        assert time.monotonic() < deadline
        got = list(await broker.read_changelog(name, 0, 0, timeout=0.5, max_records=7))
    assert [r.offset for r in got] == list(range(len(got))) and len(got) <= 7


async def test_reading_a_partition_with_nothing_new_returns_nothing_after_the_timeout(
    broker: KafkaBroker,
) -> None:
    name = await changelog(broker)
    started = time.monotonic()
    assert await broker.read_changelog(name, 0, 0, timeout=0.5) == []  # an empty partition
    assert 0.4 < time.monotonic() - started < 5
    last = await broker.append(name, 0, records(5))
    await read_all(broker, name, 0, 0, 5)
    started = time.monotonic()
    assert await broker.read_changelog(name, 0, last + 1, timeout=0.5) == []  # read to the end
    assert 0.4 < time.monotonic() - started < 5


async def test_a_record_is_readable_as_soon_as_append_returned(broker: KafkaBroker) -> None:
    """What a restore relies on: write a sentinel, then read until it shows up."""
    name = await changelog(broker)
    await broker.append(name, 0, records(100))
    restored = await read_all(broker, name, 0, 0, 100)
    for round_ in range(5):
        sentinel = await broker.append(name, 0, [SinkRecord(b"__sentinel__", b"%d" % round_)])
        got = await broker.read_changelog(name, 0, restored[-1].offset + 1, timeout=5)
        assert [(r.offset, r.key, r.value) for r in got] == [
            (sentinel, b"__sentinel__", b"%d" % round_)
        ]
        restored.extend(got)


async def test_two_partitions_are_independent(broker: KafkaBroker) -> None:
    name = await changelog(broker, partitions=2)
    assert await broker.append(name, 0, records(30, prefix="zero-")) == 29
    assert await broker.append(name, 1, records(5, prefix="one-")) == 4
    assert await broker.append(name, 0, records(1, prefix="zero-")) == 30
    # reads alternate between the partitions on the one reader
    zero_head = await read_all(broker, name, 0, 0, 10)
    one = await read_all(broker, name, 1, 0, 5)
    zero_tail = await read_all(broker, name, 0, zero_head[-1].offset + 1, 31 - len(zero_head))
    assert [r.offset for r in one] == list(range(5))
    assert all(r.key is not None and r.key.startswith(b"one-") for r in one)
    zero = zero_head + zero_tail
    assert [r.offset for r in zero] == list(range(31))
    assert all(r.key is not None and r.key.startswith(b"zero-") for r in zero)
    assert await broker.read_changelog(name, 1, 5, timeout=0.3) == []


async def test_concurrent_reads_of_several_partitions_each_get_their_own_records(
    broker: KafkaBroker,
) -> None:
    name = await changelog(broker, partitions=4)
    await asyncio.gather(*(broker.append(name, p, records(500, prefix=f"p{p}-")) for p in range(4)))
    restored = await asyncio.gather(*(read_all(broker, name, p, 0, 500) for p in range(4)))
    for p, got in enumerate(restored):
        assert [r.offset for r in got] == list(range(500))
        assert all(r.key is not None and r.key.startswith(f"p{p}-".encode()) for r in got)


async def test_concurrent_appends_to_one_partition_each_land_contiguously(
    broker: KafkaBroker,
) -> None:
    name = await changelog(broker, partitions=1)
    calls = [[SinkRecord(b"c%d" % c, b"x" * 300) for _ in range(600)] for c in range(4)]
    lasts = await asyncio.gather(*(broker.append(name, 0, call) for call in calls))
    got = await read_all(broker, name, 0, 0, 2400)
    for c, last in enumerate(lasts):
        assert [r.key for r in got[last - 599 : last + 1]] == [b"c%d" % c] * 600


async def test_the_changelog_clients_close_with_the_broker_and_start_again_on_use(
    kafka_url: str,
) -> None:
    broker = KafkaBroker(kafka_url, TEST_OPTIONS)
    try:
        name = await changelog(broker)
        await broker.append(name, 0, records(2))
        await read_all(broker, name, 0, 0, 2)
        await broker.close()
        assert broker._changelog._producer is None and broker._changelog._reader is None
        assert await broker.append(name, 0, records(1)) == 2
        assert [r.offset for r in await read_all(broker, name, 0, 0, 3)] == [0, 1, 2]
    finally:
        await broker.close()


async def test_append_to_a_partition_the_changelog_lacks_raises_sink_error_naming_it(
    broker: KafkaBroker,
) -> None:
    name = await changelog(broker, partitions=2)
    with pytest.raises(
        SinkError, match=rf"changelog topic '{name}' .* has no partition 5 \(2 partitions\)"
    ):
        await broker.append(name, 5, records(1))


async def test_append_of_values_that_are_not_bytes_raises_sink_error(broker: KafkaBroker) -> None:
    name = await changelog(broker)
    with pytest.raises(SinkError, match=rf"topic '{name}' partition 0 .* must be bytes"):
        await broker.append(name, 0, [SinkRecord("text", {"not": "bytes"})])


async def test_append_of_nothing_is_a_caller_error(broker: KafkaBroker) -> None:
    with pytest.raises(ValueError, match="at least one record"):
        await broker.append("t", 0, [])


# -- failures, with stand-ins for aiokafka's clients ---------------------------------------------


class FakeBatch:
    def __init__(self, room: int) -> None:
        self.room = room
        self.records: list[Any] = []

    def append(self, *, key: Any, value: Any, timestamp: Any, headers: Any) -> object | None:
        if len(self.records) >= self.room:
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        pass


class FakeProducer:
    """Acknowledges the first ``good`` batches, then fails (``error``) or never answers."""

    def __init__(self, good: int, error: BaseException | None) -> None:
        self.good = good
        self.error = error
        self.sent: list[FakeBatch] = []
        self.offset = 100

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(room=2)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[Any]:
        self.sent.append(batch)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if len(self.sent) <= self.good:
            tp = TopicPartition(topic, partition)
            future.set_result(RecordMetadata(topic, partition, tp, self.offset, -1, 0, 0))
            self.offset += len(batch.records)
        elif self.error is not None:
            future.set_exception(self.error)
        return future

    async def stop(self) -> None:
        pass


async def test_a_batch_the_broker_does_not_acknowledge_raises_sink_error_and_stops_the_call() -> (
    None
):
    broker = KafkaBroker(SECRET_URL, TEST_OPTIONS)
    producer = FakeProducer(good=1, error=RequestTimedOutError("no leader"))
    broker._changelog._producer = producer
    with pytest.raises(SinkError) as info:
        await broker.append("app-t-changelog", 3, records(6))
    message = str(info.value)
    assert "changelog topic 'app-t-changelog' partition 3" in message
    assert "RequestTimedOutError" in message and "the first 2 records are written" in message
    assert "s3cret" not in message and "sasl_plain_password=***" in message
    assert len(producer.sent) == 2  # nothing after the failed batch was sent
    await broker.close()


async def test_a_batch_never_acknowledged_fails_after_twice_the_request_timeout() -> None:
    broker = KafkaBroker("kafka://127.0.0.1:1", dict(TEST_OPTIONS, request_timeout_ms="100"))
    broker._changelog._producer = FakeProducer(good=0, error=None)
    started = time.monotonic()
    with pytest.raises(SinkError, match="partition 0 .* no acknowledgement within 0.2s"):
        await broker.append("t", 0, records(1))
    assert time.monotonic() - started < 2
    await broker.close()


async def test_offsets_of_a_call_spanning_batches_count_from_each_batch_base() -> None:
    broker = KafkaBroker("kafka://127.0.0.1:1", TEST_OPTIONS)
    producer = FakeProducer(good=10, error=None)
    broker._changelog._producer = producer
    assert await broker.append("t", 0, records(5)) == 104  # batches of 2, 2, 1 from offset 100
    assert [len(b.records) for b in producer.sent] == [2, 2, 1]
    await broker.close()


class FakeReader:
    """A group-less consumer over one partition holding offsets ``first`` to ``end - 1``."""

    def __init__(self, first: int, end: int, error: BaseException | None = None) -> None:
        self.first, self.end, self.error = first, end, error
        self.position = -1
        self.seeks: list[int] = []

    def assign(self, tps: Sequence[Any]) -> None:
        self.position = -1

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append(offset)
        self.position = offset

    async def getmany(
        self, tp: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Record]]:
        if self.error is not None:
            raise self.error
        if not self.first <= self.position <= self.end:
            raise OffsetOutOfRangeError({tp: self.position})
        out = [Record(o, b"k", b"v") for o in range(self.position, self.end)][:max_records]
        if out:
            self.position = out[-1].offset + 1
        return {tp: out} if out else {}

    async def beginning_offsets(self, tps: Sequence[Any]) -> dict[Any, int]:
        return {tp: self.first for tp in tps}

    async def stop(self) -> None:
        pass


async def test_a_read_before_the_start_of_a_cleaned_up_log_starts_at_its_first_offset() -> None:
    broker = KafkaBroker("kafka://127.0.0.1:1", TEST_OPTIONS)
    reader = FakeReader(first=40, end=45)
    broker._changelog._reader = reader
    got = await broker.read_changelog("t", 0, 3, timeout=1)
    assert [r.offset for r in got] == [40, 41, 42, 43, 44]
    assert reader.seeks == [3, 40]
    await broker.close()


async def test_a_read_past_the_end_of_the_log_says_the_changelog_was_lost() -> None:
    broker = KafkaBroker(SECRET_URL, TEST_OPTIONS)
    broker._changelog._reader = FakeReader(first=0, end=10)
    with pytest.raises(
        KafkaSourceError, match="'t' partition 2 .* no offset 500 .* recreated"
    ) as info:
        await broker.read_changelog("t", 2, 500, timeout=1)
    assert "s3cret" not in str(info.value)
    await broker.close()


async def test_consecutive_reads_of_one_partition_do_not_seek_again() -> None:
    broker = KafkaBroker("kafka://127.0.0.1:1", TEST_OPTIONS)
    reader = FakeReader(first=0, end=10)
    broker._changelog._reader = reader
    first = await broker.read_changelog("t", 0, 0, timeout=1, max_records=4)
    second = await broker.read_changelog("t", 0, first[-1].offset + 1, timeout=1, max_records=4)
    assert [r.offset for r in first + second] == list(range(8))
    assert reader.seeks == [0]
    await broker.read_changelog("t", 0, 2, timeout=1)
    assert reader.seeks == [0, 2]
    await broker.close()


async def test_a_transient_read_error_returns_nothing_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncflow.kafka")
    broker = KafkaBroker("kafka://127.0.0.1:1", TEST_OPTIONS)
    broker._changelog._reader = FakeReader(0, 10, error=KafkaConnectionError("gone"))
    assert await broker.read_changelog("t", 0, 0, timeout=0.5) == []
    assert "reading changelog t[0]" in caplog.text
    await broker.close()


# -- committed ----------------------------------------------------------------------------------


class AskingCore:
    """Stands in for the core's durable state: asks what was committed as partitions arrive."""

    def __init__(self) -> None:
        self.source: KafkaSource | None = None
        self.assigned: set[Partition] = set()
        self.committed_on_assign: dict[Partition, int | None] = {}

    async def on_assigned(self, partitions: Collection[Partition]) -> None:
        assert self.source is not None
        self.committed_on_assign.update(await self.source.committed(partitions))
        self.assigned = set(partitions)

    async def on_revoked(self, partitions: Collection[Partition]) -> None:
        self.assigned -= set(partitions)


async def started_source(
    broker: KafkaBroker, topic: str, group: str
) -> tuple[KafkaSource, AskingCore]:
    core = AskingCore()
    source = broker.source([TopicSpec(topic, partitions=4)], group)
    core.source = source
    await source.start(core)
    return source, core


async def test_committed_is_none_before_any_commit_and_the_last_committed_offset_after(
    broker: KafkaBroker, topic4: str
) -> None:
    parts = [TopicPartition(topic4, p) for p in range(4)]
    group = unique_name("g")
    source, core = await started_source(broker, topic4, group)
    try:
        await wait_for(lambda: len(core.assigned) == 4, 30, message="assignment")
        assert core.committed_on_assign == {p: None for p in parts}  # asked inside on_assigned
        assert await source.committed(parts) == {p: None for p in parts}
        await source.commit({parts[0]: 41, parts[2]: 0})
        assert await source.committed(parts) == {
            parts[0]: 41,
            parts[1]: None,
            parts[2]: 0,
            parts[3]: None,
        }
        assert await source.committed([]) == {}
    finally:
        await source.stop()
    # the next member of the group is told the same when the partitions come to it
    source, core = await started_source(broker, topic4, group)
    try:
        await wait_for(lambda: len(core.assigned) == 4, 30, message="second assignment")
        assert core.committed_on_assign == {
            parts[0]: 41,
            parts[1]: None,
            parts[2]: 0,
            parts[3]: None,
        }
    finally:
        await source.stop()


async def test_committed_needs_a_started_source(broker: KafkaBroker) -> None:
    source = broker.source([TopicSpec("t")], "g")
    with pytest.raises(RuntimeError, match="call start"):
        await source.committed([TopicPartition("t", 0)])


class SilentConsumer:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    async def committed(self, tp: Any) -> int | None:
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()  # the coordinator never answers
        return None


async def test_committed_raises_broker_unavailable_when_the_group_coordinator_does_not_answer() -> (
    None
):
    broker = KafkaBroker(SECRET_URL, dict(TEST_OPTIONS, request_timeout_ms="200"))
    for consumer, reason in (
        (SilentConsumer(), "got no answer within request_timeout_ms=200"),
        (SilentConsumer(KafkaConnectionError("gone")), "failed: KafkaConnectionError"),
    ):
        source = broker.source([TopicSpec("t")], "billing")
        source._consumer = consumer
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="committed offsets of group billing") as info:
            await source.committed([TopicPartition("t", 0)])
        assert reason in str(info.value) and "s3cret" not in str(info.value)
        assert time.monotonic() - started < 2
