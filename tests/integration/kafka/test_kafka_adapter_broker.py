"""The Kafka broker on a real broker: topic management and unreachable brokers."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapters.kafka import KafkaBroker
from asyncflow.errors import BrokerUnavailable, TopicMissing
from asyncflow.protocols import PartitionListener, TopicSpec
from tests.integration.kafka import eos_workers
from tests.integration.kafka.broker import TEST_OPTIONS, free_port, unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

broker = eos_workers.broker  # every test taking ``broker`` runs with both clients
client = eos_workers.client


class NoListener:
    async def on_assigned(self, partitions: object) -> None:
        pass

    async def on_revoked(self, partitions: object) -> None:
        pass


async def test_ensure_topics_creates_missing_topics_with_their_partition_count(
    broker: KafkaBroker,
) -> None:
    rides, alerts = unique_name("rides"), unique_name("alerts")
    await broker.ensure_topics([TopicSpec(rides, partitions=4), TopicSpec(alerts, partitions=2)])
    topics = await broker.list_topics()
    assert topics[rides] == 4 and topics[alerts] == 2
    await broker.ensure_topics([TopicSpec(rides, partitions=4)])  # existing: left alone
    assert (await broker.list_topics())[rides] == 4


async def test_missing_topic_with_create_off_raises_topic_missing_and_creates_nothing(
    kafka_url: str,
) -> None:
    broker = KafkaBroker(kafka_url, dict(TEST_OPTIONS, create_topics="false"))
    wanted, declared_off = unique_name("wanted"), unique_name("off")
    try:
        with pytest.raises(TopicMissing, match=wanted):
            await broker.ensure_topics([TopicSpec(wanted, partitions=4)])
        assert wanted not in await broker.list_topics()  # listing did not auto-create it
    finally:
        await broker.close()
    broker = KafkaBroker(kafka_url, TEST_OPTIONS)
    allowed = unique_name("allowed")
    try:
        with pytest.raises(TopicMissing, match="asyncflow topics create"):
            await broker.ensure_topics(
                [TopicSpec(allowed, 1), TopicSpec(declared_off, 1, create=False)]
            )
        topics = await broker.list_topics()
        assert declared_off not in topics and allowed not in topics  # all or nothing
    finally:
        await broker.close()


async def test_topic_config_is_passed_at_creation(broker: KafkaBroker) -> None:
    name = unique_name("compacted")
    await broker.ensure_topics(
        [TopicSpec(name, partitions=1, config={"cleanup.policy": "compact"})]
    )
    assert (await broker.list_topics())[name] == 1


def unreachable_url() -> str:
    return f"kafka://127.0.0.1:{free_port()}?sasl_plain_password=s3cret"


def assert_one_line(exc: BaseException, started: float) -> None:
    assert time.monotonic() - started < 10
    message = str(exc)
    assert message.startswith("cannot reach broker kafka://127.0.0.1:")
    assert "\n" not in message and "s3cret" not in message


async def test_unreachable_broker_fails_source_start_quickly_with_one_line(
    client: str,
) -> None:
    broker = KafkaBroker(unreachable_url(), dict(TEST_OPTIONS, client=client))
    source = broker.source([TopicSpec("t")], "g")
    listener: PartitionListener = NoListener()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await source.start(listener)
    assert_one_line(info.value, started)
    await source.stop()


async def test_unreachable_broker_fails_sink_start_and_topic_calls_quickly(
    client: str,
) -> None:
    broker = KafkaBroker(unreachable_url(), dict(TEST_OPTIONS, client=client))
    for call in (broker.sink().start, broker.list_topics):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            await call()
        assert_one_line(info.value, started)
    await broker.close()


async def test_a_silent_listener_fails_start_within_the_connect_timeout() -> None:
    async def accept_and_say_nothing(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        options = dict(TEST_OPTIONS, connect_timeout_ms="1000")
        broker = KafkaBroker(f"kafka://127.0.0.1:{port}", options)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="no answer within 1000 ms") as info:
            await broker.sink().start()
        assert_one_line(info.value, started)
        assert time.monotonic() - started < 5
    finally:
        server.close()
