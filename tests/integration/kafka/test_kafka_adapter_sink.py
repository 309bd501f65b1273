"""The Kafka sink on a real broker: batch API throughput path, murmur2 placement, headers, errors."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from adapters.kafka import KafkaBroker, KafkaSink, kafka_partition
from asyncflow.errors import SinkError
from asyncflow.protocols import Sink, SinkRecord
from tests.integration.kafka import eos_workers
from tests.integration.kafka.broker import TEST_OPTIONS, consume, create_topic, start_tansu

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

broker = eos_workers.broker  # every test taking ``broker`` runs with both clients
client = eos_workers.client


async def test_sink_satisfies_the_sink_protocol(broker: KafkaBroker) -> None:
    sink = broker.sink()
    assert isinstance(sink, Sink)
    assert sink.max_batch >= 500 and 0 <= sink.linger < 1  # 0: batches adapt to the load


async def started(broker: KafkaBroker) -> Any:
    sink = broker.sink()
    await sink.start()

    def no_single_sends(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the sink must use the batch API, not send()")

    if isinstance(sink, KafkaSink):  # aiokafka; librdkafka's produce() only queues
        sink._producer.send = no_single_sends
    return sink


async def test_sink_writes_100k_records_and_keyed_ones_land_on_their_murmur2_partition(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    n = 100_000
    records = [
        SinkRecord(key=f"sensor-{i % 1000}".encode(), value=b'{"n":%d}' % i, topic=topic4)
        for i in range(n)
    ]
    sink = await started(broker)
    try:
        t0 = time.perf_counter()
        for i in range(0, n, sink.max_batch):
            await sink.write(records[i : i + sink.max_batch])
        elapsed = time.perf_counter() - t0
    finally:
        await sink.stop()
    print(f"sink wrote {n / elapsed:,.0f} records/s")
    got = await consume(kafka_bootstrap, topic4, n, timeout=60)
    assert len(got) == n
    for r in got:
        assert r.partition == kafka_partition(r.key, 4)
    # per key, the values arrive in the order they were written
    last: dict[bytes, int] = {}
    for r in got:
        value = int(r.value[5:-1])
        assert value > last.get(r.key, -1)
        last[r.key] = value


async def test_keyless_records_of_one_write_share_a_partition_and_writes_rotate(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    sink = await started(broker)
    try:
        for w in range(4):
            await sink.write([SinkRecord(None, b"%d" % w, topic=topic4) for _ in range(10)])
    finally:
        await sink.stop()
    got = await consume(kafka_bootstrap, topic4, 40)
    by_write = {r.value: r.partition for r in got}
    assert Counter((r.value, r.partition) for r in got) == Counter(
        {(v, p): 10 for v, p in by_write.items()}
    )
    assert sorted(by_write.values()) == [0, 1, 2, 3]


async def test_explicit_partition_wins_over_the_key(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    key = b"foobar"  # murmur2 puts it on partition 2 of 4
    sink = await started(broker)
    try:
        await sink.write([SinkRecord(key, b"v", topic=topic4, partition=1)])
    finally:
        await sink.stop()
    (got,) = await consume(kafka_bootstrap, topic4, 1)
    assert got.partition == 1


async def test_headers_and_timestamps_round_trip(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    headers = [("trace-id", b"abc123"), ("attempt", b"1"), ("trace-id", b"dup")]
    sink = await started(broker)
    try:
        await sink.write(
            [
                SinkRecord(b"k", b"v", topic=topic4, headers=headers, timestamp=1_700_000_000_123),
                SinkRecord(b"k", b"w", topic=topic4, headers=tuple(headers)),
            ]
        )
    finally:
        await sink.stop()
    first, second = sorted(await consume(kafka_bootstrap, topic4, 2), key=lambda r: r.offset)
    assert list(first.headers) == headers and list(second.headers) == headers
    assert first.timestamp == 1_700_000_000_123
    assert (first.key, first.value) == (b"k", b"v")


async def test_records_that_are_not_bytes_raise_a_sink_error_naming_the_fix(
    broker: KafkaBroker, topic4: str
) -> None:
    sink = await started(broker)
    try:
        with pytest.raises(SinkError, match="bytes"):
            await sink.write([SinkRecord("text-key", b"v", topic=topic4)])
        with pytest.raises(SinkError, match="bytes"):
            await sink.write([SinkRecord(b"k", {"a": 1}, topic=topic4)])
        with pytest.raises(SinkError, match="partition 9 does not exist"):
            await sink.write([SinkRecord(b"k", b"v", topic=topic4, partition=9)])
        with pytest.raises(SinkError, match="no topic"):
            await sink.write([SinkRecord(b"k", b"v")])
    finally:
        await sink.stop()


async def test_write_raises_sink_error_when_the_broker_never_acknowledges(
    client: str,
) -> None:
    with start_tansu() as tansu:
        topic = await create_topic(tansu.bootstrap, partitions=2)
        options = dict(TEST_OPTIONS, request_timeout_ms="2000", retry_backoff_ms="50",
                       client=client)
        sink = KafkaBroker(tansu.url, options).sink()
        await sink.start()
        try:
            await sink.write([SinkRecord(b"k", b"v", topic=topic)])
            tansu.stop(kill=True)
            t0 = time.monotonic()
            with pytest.raises(SinkError) as info:
                await sink.write([SinkRecord(b"k%d" % i, b"v", topic=topic) for i in range(100)])
            assert time.monotonic() - t0 < 15
            assert "100 records" in str(info.value) and "\n" not in str(info.value)
        finally:
            await sink.stop()


async def test_a_record_over_max_request_size_is_refused_with_its_size_and_the_rest_are_written(
    kafka_url: str, kafka_bootstrap: str, topic4: str, client: str
) -> None:
    broker = KafkaBroker(kafka_url, dict(TEST_OPTIONS, max_request_size="10000", client=client))
    sink = broker.sink()
    await sink.start()
    big = SinkRecord(b"k", b"x" * 20_000, topic=topic4)
    try:
        refused = await sink.write(
            [SinkRecord(b"k", b"before", topic=topic4), big, SinkRecord(b"k", b"after", topic=topic4)]
        )
    finally:
        await sink.stop()
        await broker.close()
    assert refused is not None and [r.record for r in refused] == [big]
    assert "20" in refused[0].reason and "max_request_size=10000" in refused[0].reason
    got = sorted(await consume(kafka_bootstrap, topic4, 2), key=lambda r: r.offset)
    assert [r.value for r in got] == [b"before", b"after"]  # in order, on the key's partition


async def test_a_batch_the_broker_refuses_is_sent_again_record_by_record_and_only_the_culprit_is_refused(
    broker: KafkaBroker, kafka_bootstrap: str, topic4: str
) -> None:
    """Tansu enforces no ``max.message.bytes``: the broker's refusal is injected per batch.

    The producer's batches are watched as they are filled; a batch holding a
    ``POISON`` value fails as Apache Kafka fails one over the topic's limit
    (``MESSAGE_SIZE_TOO_LARGE``), without reaching the broker.
    """
    if broker.settings.client != "aiokafka":
        pytest.skip("injects the refusal into aiokafka's producer")
    from aiokafka.errors import MessageSizeTooLargeError

    sink = await started(broker)
    producer = sink._producer
    create_batch, send_batch = producer.create_batch, producer.send_batch
    refused_batches = 0

    def watched_batch() -> Any:
        batch = create_batch()
        append = batch.append
        batch.values = []

        def recording_append(**kwargs: Any) -> Any:
            result = append(**kwargs)
            if result is not None:
                batch.values.append(kwargs["value"])
            return result

        batch.append = recording_append
        return batch

    async def refusing_send_batch(batch: Any, topic: str, partition: int) -> Any:
        nonlocal refused_batches
        if any(v.startswith(b"POISON") for v in batch.values):
            refused_batches += 1
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(MessageSizeTooLargeError())
            return failed
        return await send_batch(batch, topic, partition=partition)

    producer.create_batch = watched_batch
    producer.send_batch = refusing_send_batch
    records = [SinkRecord(b"k%d" % (i % 7), b"v%d" % i, topic=topic4) for i in range(200)]
    records[50] = poison = SinkRecord(b"k1", b"POISON", topic=topic4)
    try:
        refused = await sink.write(records)
    finally:
        await sink.stop()
    assert refused is not None and [r.record for r in refused] == [poison]
    assert "MESSAGE_SIZE_TOO_LARGE" in refused[0].reason
    assert refused_batches == 2  # the batch of k1's partition, then the poison alone
    got = await consume(kafka_bootstrap, topic4, 199)
    assert sorted(r.value for r in got) == sorted(r.value for r in records if r is not poison)


async def test_stop_with_the_broker_gone_ends_within_request_timeout() -> None:
    with start_tansu() as tansu:
        topic = await create_topic(tansu.bootstrap, partitions=1)
        options = dict(TEST_OPTIONS, request_timeout_ms="2000", retry_backoff_ms="50")
        sink = KafkaBroker(tansu.url, options).sink()
        await sink.start()
        await sink.write([SinkRecord(b"k", b"v", topic=topic)])
        producer = sink._producer
        tansu.stop(kill=True)
        batch = producer.create_batch()
        batch.append(key=b"k", value=b"in flight", timestamp=None, headers=[])
        batch.close()
        await producer.send_batch(batch, topic, partition=0)  # never acknowledged
        t0 = time.monotonic()
        await sink.stop()
        assert time.monotonic() - t0 < 10  # request_timeout_ms=2000 bounds it
