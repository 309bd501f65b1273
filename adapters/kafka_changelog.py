"""Changelog topics for durable state: an ordered appender and a group-less reader.

``KafkaChangelog`` holds the two clients ``KafkaBroker`` uses for
``asyncflow.protocols.ChangelogBroker``: one producer (``acks=all``,
idempotence as the ``enable_idempotence`` option says) that writes a call's
records to one partition, batch after batch, each acknowledged before the
next is sent; and one consumer without a group (no commits, no rebalances)
that reads one partition at a time from a given offset. Both start on first
use and are reused until ``close``.

Order and prefixes: a call's records land contiguously and in order (calls for
the same partition take turns), and because each batch is acknowledged before
the next is sent, a failed call leaves at most a prefix of its records in the
log, never a later record without the earlier ones.

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> changelog = KafkaChangelog(KafkaSettings.parse("kafka://localhost"), "kafka://localhost")
    >>> async def roundtrip() -> None:  # doctest: +SKIP
    ...     last = await changelog.append("app-counts-changelog", 0, [SinkRecord(b"k", b"1")])
    ...     records = await changelog.read("app-counts-changelog", 0, last, timeout=1.0)
    ...     await changelog.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.errors import ConsumerStoppedError, KafkaError, OffsetOutOfRangeError

from adapters.kafka_config import KafkaSettings, describe, start_client, stop_consumer
from adapters.kafka_health import BrokerHealth, is_connection_error
from adapters.kafka_records import hand_over_decoded_records
from adapters.kafka_source import KafkaSourceError
from asyncflow.errors import SinkError
from asyncflow.protocols import RawRecord, SinkRecord

log = logging.getLogger("asyncflow.kafka")

_READ_GRACE = 1.0
"""Seconds a ``getmany`` may overrun ``read``'s timeout before it is cut short."""
_RETRY_PAUSE = 0.1
"""Seconds ``read`` waits (within its timeout) after a transient error before returning ``[]``."""


def invalid_record(topic: str, partition: int, reason: str) -> SinkError:
    """The error of a changelog record that is not bytes (both clients).

    Example:
        >>> str(invalid_record("c", 0, "a str"))[:48]
        "a changelog record for topic 'c' partition 0 is "
    """
    return SinkError(
        f"a changelog record for topic {topic!r} partition {partition} is not valid "
        f"({reason}); changelog keys and values must be bytes (value None for a delete)"
    )


def no_partition(topic: str, url: str, partition: int, partitions: int) -> SinkError:
    """The error of an append to a partition the changelog topic lacks (both clients)."""
    return SinkError(
        f"changelog topic {topic!r} on {url} has no partition {partition} "
        f"({partitions} partitions); it needs one partition per source partition"
    )


class KafkaChangelog:
    """Appends to and reads back changelog partitions (one producer, one group-less consumer).

    Example:
        >>> from adapters.kafka_config import KafkaSettings
        >>> c = KafkaChangelog(KafkaSettings.parse("kafka://k:9092?enable_idempotence=false"))
        >>> c.url, c.producer_args()["acks"], c.producer_args()["enable_idempotence"]
        ('kafka://k:9092', -1, False)
    """

    def __init__(
        self, settings: KafkaSettings, url: str = "", health: BrokerHealth | None = None
    ) -> None:
        self.settings = settings
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.health = health or BrokerHealth(self.url)
        """Where connection errors are told (``KafkaBroker`` shares one with its clients)."""
        self._producer: Any = None
        self._producer_lock = asyncio.Lock()
        self._append_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._reader: Any = None
        self._reader_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._reading: KafkaTP | None = None
        """The partition the reader is assigned (it reads one at a time)."""
        self._next: int | None = None
        """Where the reader's position stands in ``_reading``; ``None``: unknown, seek first."""

    def producer_args(self) -> dict[str, Any]:
        """The changelog producer's arguments: the sink's, with ``acks=all`` always.

        Example:
            >>> from adapters.kafka_config import KafkaSettings
            >>> KafkaChangelog(KafkaSettings.parse("kafka://k?acks=1")).producer_args()["acks"]
            -1
        """
        return self.settings.changelog_producer_args()

    async def append(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int:
        """Write ``records`` in order to one partition; return the offset of the last one.

        Returns once every record is durable (acknowledged by all in-sync
        replicas). ``key`` and ``value`` must be bytes; ``value=None`` writes a
        tombstone. ``SinkRecord.topic`` and ``.partition`` are ignored: the
        arguments say where the records go. Raises ``SinkError`` naming the
        topic and partition when the broker does not acknowledge a batch after
        the producer's retries (at most ``2 × request_timeout_ms`` per batch);
        the records before that batch are then written, the ones from it on
        may or may not be. ``BrokerUnavailable`` if the producer cannot start.

        Example:
            >>> async def write(changelog: KafkaChangelog) -> int:  # doctest: +SKIP
            ...     return await changelog.append(
            ...         "app-c-changelog", 3, [SinkRecord(b"k", b"1"), SinkRecord(b"gone", None)]
            ...     )
        """
        if not records:
            raise ValueError("append() needs at least one record")
        key = (topic, partition)
        lock = self._append_locks.get(key)
        if lock is None:
            lock = self._append_locks[key] = asyncio.Lock()
        producer = await self._producer_client()
        async with lock:
            await self._check_partition(producer, topic, partition)
            total = len(records)
            written = 0
            batch = producer.create_batch()
            count = 0
            for r in records:
                if self._add(batch, r, topic, partition):
                    count += 1
                    continue
                await self._send(producer, batch, topic, partition, count, written, total)
                written += count
                batch = producer.create_batch()
                self._add(batch, r, topic, partition)  # the first record always fits
                count = 1
            return await self._send(producer, batch, topic, partition, count, written, total)

    def _add(self, batch: Any, record: SinkRecord, topic: str, partition: int) -> bool:
        headers = record.headers
        if headers.__class__ is not list:  # aiokafka's batch builder takes only lists
            headers = list(headers)
        try:
            added = batch.append(
                key=record.key, value=record.value, timestamp=record.timestamp, headers=headers
            )
        except (TypeError, ValueError) as exc:
            raise invalid_record(topic, partition, str(exc)) from None
        return added is not None

    async def _check_partition(self, producer: Any, topic: str, partition: int) -> None:
        try:
            parts = await producer.partitions_for(topic)
        except KafkaError as exc:
            raise SinkError(
                f"cannot append to changelog topic {topic!r} partition {partition} on "
                f"{self.url}: {describe(exc)}; create it first (ensure_changelogs)"
            ) from None
        if partition not in parts:
            raise no_partition(topic, self.url, partition, len(parts))

    async def _send(
        self,
        producer: Any,
        batch: Any,
        topic: str,
        partition: int,
        count: int,
        written: int,
        total: int,
    ) -> int:
        """Send one closed batch and wait for its acknowledgement; the offset of its last record."""
        batch.close()
        bound = 2 * self.settings.request_timeout_ms / 1000
        try:
            future = await producer.send_batch(batch, topic, partition=partition)
            done, _ = await asyncio.wait([future], timeout=bound)
            if not done:
                raise SinkError(
                    self._failed(
                        topic, partition, written, total, f"no acknowledgement within {bound:g}s"
                    )
                )
            metadata = future.result()
        except KafkaError as exc:
            raise SinkError(self._failed(topic, partition, written, total, describe(exc))) from None
        return int(metadata.offset) + count - 1

    def _failed(self, topic: str, partition: int, written: int, total: int, reason: str) -> str:
        return (
            f"appending {total} records to changelog topic {topic!r} partition {partition} on "
            f"{self.url} failed after the producer's retries "
            f"(request_timeout_ms={self.settings.request_timeout_ms}): {reason}; the first "
            f"{written} records are written, the rest may be missing"
        )

    async def read(
        self, topic: str, partition: int, start: int, *, timeout: float, max_records: int = 10_000
    ) -> list[RawRecord]:
        """Records of one partition from offset ``start`` on, at most ``max_records``.

        Returns as soon as any record is there, ``[]`` if none arrived within
        ``timeout`` seconds (also after a transient error, which is logged).
        Consecutive reads of one partition that go on where the last stopped
        (``start`` = last offset + 1) keep the consumer's prefetched data;
        other reads seek. Calls take turns on the one consumer. If ``start`` is
        below the partition's first offset (the log was cleaned up to there),
        the read starts at the first offset. Raises ``KafkaSourceError`` if
        ``start`` is past the end of the log (the topic was deleted and
        recreated, or ``start`` never came from this log) or for errors
        retrying cannot fix (authorization).

        Example:
            >>> async def restore(changelog: KafkaChangelog) -> None:  # doctest: +SKIP
            ...     start = 0
            ...     while records := await changelog.read("app-c-changelog", 0, start, timeout=1.0):
            ...         start = records[-1].offset + 1
        """
        if start < 0:
            raise ValueError(f"read(start={start}): offsets start at 0")
        if max_records < 1:
            raise ValueError(f"read(max_records={max_records}): read at least one record")
        tp = KafkaTP(topic, partition)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        async with self._read_lock:
            consumer = await self._reader_client()
            if self._reading != tp:
                consumer.assign([tp])
                self._reading, self._next = tp, None
            if self._next != start:
                consumer.seek(tp, start)
                self._next = start
            while True:
                remaining = max(0.0, deadline - loop.time())
                try:
                    async with asyncio.timeout(remaining + _READ_GRACE):
                        data = await consumer.getmany(
                            tp, timeout_ms=int(remaining * 1000), max_records=max_records
                        )
                except OffsetOutOfRangeError:
                    first = await self._first_offset(consumer, tp, remaining)
                    if first is not None and start < first:
                        log.info(
                            "changelog %s[%d] starts at %d, not %d: reading from there",
                            topic,
                            partition,
                            first,
                            start,
                        )
                        consumer.seek(tp, first)
                        self._next = start = first
                        continue
                    self._next = None
                    raise KafkaSourceError(
                        f"changelog topic {topic!r} partition {partition} on {self.url} has no "
                        f"offset {start} (it is past the end of the log): was the topic deleted "
                        "and recreated? Rebuild the state from the start of the changelog"
                    ) from None
                except (TimeoutError, ConsumerStoppedError):
                    self._next = None
                    return []
                except KafkaError as exc:
                    self._next = None
                    if not exc.retriable:
                        raise KafkaSourceError(
                            f"reading changelog topic {topic!r} partition {partition} on "
                            f"{self.url} failed: {describe(exc)}"
                        ) from exc
                    if is_connection_error(exc):
                        self.health.failed(f"reading changelog {topic}[{partition}]: "
                                           f"{describe(exc)}")
                    log.log(
                        logging.DEBUG if self.health.lost else logging.WARNING,
                        "reading changelog %s[%d] from %s failed (%s); returning no records",
                        topic,
                        partition,
                        self.url,
                        describe(exc),
                    )
                    await asyncio.sleep(min(_RETRY_PAUSE, max(0.0, deadline - loop.time())))
                    return []
                records: list[RawRecord] = data.get(tp, [])
                if records:
                    self._next = records[-1].offset + 1
                return records

    async def _first_offset(self, consumer: Any, tp: KafkaTP, remaining: float) -> int | None:
        try:
            async with asyncio.timeout(max(remaining, self.settings.request_timeout_ms / 1000)):
                offsets = await consumer.beginning_offsets([tp])
        except (TimeoutError, KafkaError) as exc:
            log.warning("cannot ask %s where %s starts: %s", self.url, tp, describe(exc))
            return None
        first = offsets.get(tp)
        return None if first is None else int(first)

    async def close(self) -> None:
        """Stop the producer (after its batches in flight) and the reader, if they started.

        Each within ``request_timeout_ms``: a broker that does not answer
        cannot hold up a worker's exit.

        Example:
            >>> from adapters.kafka_config import KafkaSettings
            >>> asyncio.run(KafkaChangelog(KafkaSettings.parse("kafka://k")).close())
        """
        producer, self._producer = self._producer, None
        reader, self._reader = self._reader, None
        self._reading, self._next = None, None
        timeout = self.settings.request_timeout_ms / 1000
        if reader is not None:
            await stop_consumer(reader, self.url, timeout, leave_group=False)
        if producer is not None:
            try:
                async with asyncio.timeout(timeout):
                    await producer.stop()
            except (TimeoutError, KafkaError, OSError) as exc:
                log.warning("closing the changelog producer for %s failed (%s); what it had "
                            "in flight was not acknowledged", self.url, describe(exc))
                try:
                    async with asyncio.timeout(1.0):
                        await producer.client.close()
                except (TimeoutError, KafkaError, OSError) as err:
                    log.debug("closing the changelog producer's connections failed: %s", err)

    async def _producer_client(self) -> Any:
        if self._producer is not None:
            return self._producer
        async with self._producer_lock:
            if self._producer is None:
                producer = AIOKafkaProducer(**self.producer_args())
                await start_client(producer, self.url, self.settings)
                self._producer = producer
        return self._producer

    async def _reader_client(self) -> Any:
        if self._reader is not None:
            return self._reader
        async with self._reader_lock:
            if self._reader is None:
                reader = AIOKafkaConsumer(**self.settings.reader_args())
                await start_client(reader, self.url, self.settings)
                hand_over_decoded_records(reader)  # a restore reads without the copy too
                self._reader = reader
        return self._reader
