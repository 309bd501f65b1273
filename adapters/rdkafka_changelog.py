"""Changelog topics through librdkafka: appends (in the transaction under exactly-once), reads.

Same contract as ``adapters.kafka_changelog.KafkaChangelog``. Appends go
through the changelog producer (``acks=all``), or, under exactly-once, through
the worker's transactional producer, so a checkpoint's changelog records
commit or abort with its outputs and offsets; ``append_now`` always writes
outside any transaction (a restore's sentinel). Reads use one group-less
consumer (assign and seek, never commit), ``read_committed`` under
exactly-once; each ``consume`` call waits at most 50 ms in a worker thread,
so a read returns soon after records are there.

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> c = RdKafkaChangelog(KafkaSettings.parse("kafka://k:9092?client=rdkafka"))
    >>> c.read_committed
    False
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTP

from adapters.kafka_changelog import invalid_record, no_partition
from adapters.kafka_config import KafkaSettings
from adapters.kafka_health import BrokerHealth
from adapters.kafka_source import KafkaSourceError
from adapters.rdkafka_bridge import CONNECTION_CODES
from adapters.rdkafka_config import describe_error, reader_config
from adapters.rdkafka_producer import RdProducer
from asyncflow.errors import SinkError
from asyncflow.protocols import RawRecord, Record, SinkRecord

log = logging.getLogger("asyncflow.kafka")

_SLICE = 0.05
"""Seconds one ``consume`` call of a read waits."""


class RdKafkaChangelog:
    """Appends to and reads back changelog partitions through librdkafka."""

    def __init__(
        self, settings: KafkaSettings, url: str = "", health: BrokerHealth | None = None
    ) -> None:
        self.settings = settings
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.health = health or BrokerHealth(self.url)
        self.producer = RdProducer(settings, self.url, self.health, what="changelog producer",
                                   acks_all=True)
        self.transactional: RdProducer | None = None
        """Exactly-once: the worker's transactional producer, which ``append`` writes through."""
        self.read_committed = False
        self._reader: Any = None
        self._read_lock = asyncio.Lock()
        self._append_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._counts: dict[str, int] = {}
        self._reading: tuple[str, int] | None = None
        self._next: int | None = None

    async def append(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int:
        """Write ``records`` in order to one partition; the offset of the last one."""
        return await self._append(self.transactional or self.producer, topic, partition, records)

    async def append_now(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int:
        """``append`` outside any transaction: readable at once, also ``read_committed``."""
        return await self._append(self.producer, topic, partition, records)

    async def _append(
        self, producer: RdProducer, topic: str, partition: int, records: Sequence[SinkRecord]
    ) -> int:
        if not records:
            raise ValueError("append() needs at least one record")
        key = (topic, partition)
        lock = self._append_locks.get(key)
        if lock is None:
            lock = self._append_locks[key] = asyncio.Lock()
        for r in records:
            if r.key.__class__ is not bytes or (r.value is not None
                                                 and r.value.__class__ is not bytes):
                raise invalid_record(topic, partition, f"key {type(r.key).__name__}, value "
                                     f"{type(r.value).__name__}")
        count = await self._partitions(producer, topic, partition)
        if not 0 <= partition < count:
            raise no_partition(topic, self.url, partition, count)
        async with lock:
            failures, last = await producer.deliver(records, topic=topic, partition=partition)
        if failures:
            first = failures[0]
            raise SinkError(
                f"appending {len(records)} records to changelog topic {topic!r} partition "
                f"{partition} on {self.url} failed after the producer's retries "
                f"(request_timeout_ms={self.settings.request_timeout_ms}): {first.reason}; "
                f"{len(failures)} of them may be missing"
            )
        return last

    async def _partitions(self, producer: RdProducer, topic: str, partition: int) -> int:
        """The changelog topic's partition count (asked once per topic)."""
        count = self._counts.get(topic)
        if count is None:
            client = await producer.start()
            try:
                metadata = await asyncio.to_thread(
                    client.list_topics, topic, self.settings.request_timeout_ms / 1000
                )
            except KafkaException as exc:
                raise SinkError(
                    f"cannot append to changelog topic {topic!r} partition {partition} on "
                    f"{self.url}: {describe_error(exc)}; create it first (ensure_changelogs)"
                ) from None
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise SinkError(
                    f"cannot append to changelog topic {topic!r} partition {partition} on "
                    f"{self.url}: it does not exist; create it first (ensure_changelogs)"
                )
            count = self._counts[topic] = len(found.partitions)
        return count

    async def read(
        self, topic: str, partition: int, start: int, *, timeout: float, max_records: int = 10_000
    ) -> list[RawRecord]:
        """Records of one partition from ``start`` on, at most ``max_records``; ``[]`` after ``timeout``."""
        if start < 0:
            raise ValueError(f"read(start={start}): offsets start at 0")
        if max_records < 1:
            raise ValueError(f"read(max_records={max_records}): read at least one record")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        async with self._read_lock:
            consumer = await self._reader_client()
            if self._reading != (topic, partition) or self._next != start:
                await asyncio.to_thread(consumer.assign, [KafkaTP(topic, partition, start)])
                self._reading, self._next = (topic, partition), start
            while True:
                wait = min(_SLICE, max(0.0, deadline - loop.time()))
                try:
                    messages = await asyncio.to_thread(consumer.consume, max_records, wait)
                except KafkaException as exc:
                    self._next = None
                    raise KafkaSourceError(
                        f"reading changelog topic {topic!r} partition {partition} on {self.url} "
                        f"failed: {describe_error(exc)}"
                    ) from exc
                records: list[RawRecord] = []
                for m in messages:
                    err = m.error()
                    if err is None:
                        ts = m.timestamp()
                        records.append(Record(m.offset(), m.key(), m.value(),
                                              ts[1] if ts[0] else None, m.headers() or ()))
                        continue
                    start = await self._failed(consumer, err, topic, partition, start)
                if records:
                    self._next = records[-1].offset + 1
                    return records
                if loop.time() >= deadline:
                    return []

    async def _failed(
        self, consumer: Any, err: KafkaError, topic: str, partition: int, start: int
    ) -> int:
        """A read error: start again at the log's first offset, wait out a transient one, or raise."""
        code = err.code()
        if code == KafkaError._AUTO_OFFSET_RESET or code == KafkaError.OFFSET_OUT_OF_RANGE:
            low, _ = await asyncio.to_thread(
                consumer.get_watermark_offsets, KafkaTP(topic, partition),
                self.settings.request_timeout_ms / 1000,
            )
            if start < low:
                log.info("changelog %s[%d] starts at %d, not %d: reading from there",
                         topic, partition, low, start)
                await asyncio.to_thread(consumer.assign, [KafkaTP(topic, partition, low)])
                self._next = low
                return int(low)
            self._next = None
            raise KafkaSourceError(
                f"changelog topic {topic!r} partition {partition} on {self.url} has no offset "
                f"{start} (it is past the end of the log): was the topic deleted and recreated? "
                "Rebuild the state from the start of the changelog"
            )
        if code in CONNECTION_CODES or err.retriable():
            self.health.failed(f"reading changelog {topic}[{partition}]: {err.str()}")
            return start
        self._next = None
        raise KafkaSourceError(
            f"reading changelog topic {topic!r} partition {partition} on {self.url} failed: "
            f"{err.name()}: {err.str()}"
        )

    async def _reader_client(self) -> Any:
        if self._reader is None:
            self._reader = Consumer(reader_config(self.settings,
                                                  read_committed=self.read_committed))
        return self._reader

    async def close(self) -> None:
        """Stop the producers (after what they have in flight) and the reader."""
        reader, self._reader = self._reader, None
        self._reading = self._next = None
        if reader is not None:
            await asyncio.to_thread(reader.close)
        await self.producer.stop()
