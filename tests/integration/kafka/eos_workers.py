"""Helpers for the exactly-once tests: a committed-only reader, worker pools with stable ids.

``read_committed`` reads a topic as a ``read_committed`` consumer must see it:
records of committed transactions and records written outside any, never those
of aborted or open transactions. It reads with ``isolation_level=read_committed``
(so it stops at the last stable offset, before any open transaction) **and**
drops aborted transactions itself, from the control records in the log: the
Tansu test broker (0.6.0) does not send the aborted-transaction list in its
fetch responses, so both aiokafka and librdkafka hand out aborted records there
(Apache Kafka filters them). Each record batch says which producer wrote it and
whether it is transactional; a transaction's records are held until its control
record says commit (kept) or abort (dropped).

``client`` and ``broker`` are fixtures that run an adapter test with both Kafka
clients (import them into the test module).

``EosPool`` is ``state_workers.Pool`` for exactly-once workers: every worker
name gets a stable ``transactional_id`` (``<app>-<name>``), so a restarted
worker's ``init_transactions`` aborts what its killed predecessor left open, as
a deployment with stable worker names does (Tansu has no transaction timeout).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer import fetcher as aiokafka_fetcher

from adapters.kafka import KafkaBroker
from tests.integration.kafka.apps_for_tests import SENTINEL, Worker
from tests.integration.kafka.broker import TEST_OPTIONS
from tests.integration.kafka.state_workers import Pool

READ_COMMITTED = aiokafka_fetcher.READ_COMMITTED


class _Control:
    """A transaction's end in the log: ``abort`` or commit, of ``producer`` at ``offset``."""

    __slots__ = ("abort", "offset", "producer")

    def __init__(self, producer: int, abort: bool, offset: int) -> None:
        self.producer, self.abort, self.offset = producer, abort, offset


def _unpack_with_transactions(self: Any) -> Iterator[Any]:
    """``PartitionRecords._unpack_records`` that yields control records and batch producers."""
    tp = self._tp
    records = self._records
    while records.has_next():
        batch = records.next_batch()
        if batch.is_control_batch:
            abort = self._contains_abort_marker(batch)
            yield _Control(batch.producer_id, abort, batch.base_offset)
            self.next_fetch_offset = batch.next_offset
            continue
        producer = batch.producer_id if batch.is_transactional else None
        for record in batch:
            if record.offset < self.next_fetch_offset:
                continue
            consumer_record = self._consumer_record(tp, record)
            self.next_fetch_offset = record.offset + 1
            yield (producer, consumer_record)
        self.next_fetch_offset = batch.next_offset


@contextmanager
def _transaction_aware() -> Iterator[None]:
    original = aiokafka_fetcher.PartitionRecords._unpack_records

    def unpack(self: Any) -> Iterator[Any]:
        if self._isolation_level == READ_COMMITTED:
            return _unpack_with_transactions(self)
        return original(self)  # type: ignore[no-any-return]

    aiokafka_fetcher.PartitionRecords._unpack_records = unpack
    try:
        yield
    finally:
        aiokafka_fetcher.PartitionRecords._unpack_records = original


async def read_committed(
    bootstrap: str, topic: str, partitions: int, timeout: float = 60.0
) -> tuple[list[Any], dict[str, int]]:
    """Every committed record of ``topic`` (partition by partition, in offset order); figures.

    Call it once the writers have stopped (their transactions are over). A
    sentinel appended to each partition marks where to stop. The figures:
    ``committed`` and ``aborted`` transactions seen, ``aborted_records`` dropped.
    """
    mine = SENTINEL + os.urandom(8).hex().encode()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for p in range(partitions):
            await producer.send_and_wait(topic, mine, partition=p)
    finally:
        await producer.stop()
    figures = {"committed": 0, "aborted": 0, "aborted_records": 0}
    with _transaction_aware():
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False,
            isolation_level="read_committed", max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            out: dict[int, list[Any]] = {p: [] for p in range(partitions)}
            held: dict[tuple[int, int], list[Any]] = defaultdict(list)
            open_ = set(range(partitions))
            deadline = time.monotonic() + timeout
            while open_:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no sentinel in partitions {sorted(open_)} of {topic} "
                                         f"after {timeout}s (an open transaction holds them?)")
                got = await consumer.getmany(timeout_ms=200, max_records=50_000)
                for tp, items in got.items():
                    p = tp.partition
                    if p not in open_:
                        continue
                    for item in items:
                        if isinstance(item, _Control):
                            kept = held.pop((p, item.producer), [])
                            if item.abort:
                                figures["aborted"] += 1
                                figures["aborted_records"] += len(kept)
                            else:
                                figures["committed"] += 1
                                out[p].extend(kept)
                            continue
                        pid, r = item
                        if r.value == mine:
                            open_.discard(p)
                            consumer.pause(tp)
                            break
                        if r.value is not None and r.value.startswith(SENTINEL):
                            continue
                        if pid is None:
                            out[p].append(r)
                        else:
                            held[(p, pid)].append(r)
            for p in range(partitions):
                out[p].sort(key=lambda r: r.offset)
            return [r for p in range(partitions) for r in out[p]], figures
        finally:
            await consumer.stop()


class EosPool(Pool):
    """A ``Pool`` whose workers run exactly-once, each name with a stable transactional id."""

    def start(self, name: str, state: str | None = None) -> Worker:
        self.env["E2E_TRANSACTIONAL_ID"] = f"{self.cfg.app_id}-{name}"
        return super().start(name, state)


# -- both Kafka clients for the adapter tests ---------------------------------------------

CLIENTS = ("aiokafka", "rdkafka")


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    """The Kafka client an adapter test runs with (each test runs with both)."""
    return str(request.param)


@pytest_asyncio.fixture
async def broker(kafka_url: str, client: str) -> AsyncIterator[KafkaBroker]:
    """The session broker through ``client`` (the test options, as ``conftest.broker``)."""
    b = KafkaBroker(kafka_url, {**TEST_OPTIONS, "client": client})
    try:
        yield b
    finally:
        await b.close()
