"""The Kafka sink: writes ``SinkRecord`` batches with aiokafka's batch API.

One ``write`` groups its records by topic and partition, fills one producer
batch after another per partition (``create_batch`` / ``append`` /
``send_batch``), keeps every partition's batches in flight at once, and
returns when the broker has acknowledged all of them. Keyed records go to the
partition the Java client would pick (``murmur2(key) & 0x7fffffff % n``);
keyless records of one write go to one partition, the next write to the next
one (sticky, round-robin across writes).

Example:
    >>> kafka_partition(b"sensor-1", 4) == kafka_partition(b"sensor-1", 4)
    True
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from adapters.kafka_config import KafkaSettings, describe, start_client
from asyncflow.errors import SinkError
from asyncflow.protocols import SinkRecord

log = logging.getLogger("asyncflow.kafka")

_HASH_CACHE_SIZE = 65_536


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client picks for ``key``: ``toPositive(murmur2(key)) % n``.

    Example:
        >>> kafka_partition(b"foobar", 4), kafka_partition(b"foobar", 7)
        (2, 0)
    """
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


class KafkaSink:
    """A Kafka producer implementing ``asyncflow.protocols.Sink`` for records with a ``topic``.

    ``key`` and ``value`` must be bytes (``key`` may be ``None``); ``partition``
    overrides the key's partition. ``write`` raises ``SinkError`` when the
    broker does not acknowledge a batch after the producer's retries (bounded
    by ``request_timeout_ms``). ``enable_idempotence`` is on by default; turn it
    off for brokers that cannot start an idempotent aiokafka producer (the Tansu
    test broker).

    Example:
        >>> sink = KafkaSink(KafkaSettings.parse("kafka://localhost?max_batch=5000"))
        >>> sink.max_batch, sink.linger
        (5000, 0.0)
        >>> async def send() -> None:  # doctest: +SKIP
        ...     await sink.start()
        ...     await sink.write([SinkRecord(b"sensor-1", b'{"v": 1}', topic="readings")])
        ...     await sink.stop()
    """

    def __init__(self, settings: KafkaSettings, url: str = "", name: str = "kafka") -> None:
        self.settings = settings
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.name = name
        self.max_batch = settings.max_batch
        self.linger = settings.linger_ms / 1000
        self._producer: Any = None
        self._hashes: dict[bytes, int] = {}
        self._keyless_next: dict[str, int] = {}

    async def start(self) -> None:
        """Connect the producer; raise ``BrokerUnavailable`` if the broker is unreachable."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self.settings.producer_args())
        await start_client(producer, self.url, self.settings)
        self._producer = producer

    async def write(self, records: Sequence[SinkRecord]) -> None:
        """Send ``records`` and return once the broker acknowledged every one of them.

        Within a partition the records keep their order.
        """
        if not records:
            return
        if self._producer is None:
            raise SinkError("KafkaSink.write() before start(); start the sink first")
        try:
            groups = await self._group(records)
        except TypeError as exc:
            raise SinkError(
                f"Kafka records need bytes keys and values ({exc}); encode them with the "
                "topic's codec before writing"
            ) from None
        sends = await asyncio.gather(
            *(self._send(topic, p, recs) for (topic, p), recs in groups.items()),
            return_exceptions=True,
        )
        pending: list[tuple[str, int, int, Any]] = []
        failures: list[tuple[str, int, int, BaseException]] = []
        for ((topic, p), recs), sent in zip(groups.items(), sends, strict=True):
            if isinstance(sent, BaseException):
                failures.append((topic, p, len(recs), sent))
            else:
                pending.extend((topic, p, n, fut) for n, fut in sent)
        results = await asyncio.gather(*(fut for *_, fut in pending), return_exceptions=True)
        for (topic, p, n, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failures.append((topic, p, n, result))
        if failures:
            raise self._error(failures, len(records))

    async def _group(
        self, records: Sequence[SinkRecord]
    ) -> dict[tuple[str, int], list[SinkRecord]]:
        groups: dict[tuple[str, int], list[SinkRecord]] = {}
        partitions: dict[str, int] = {}
        keyless: dict[str, int] = {}
        hashes = self._hashes
        for record in records:
            topic = record.topic
            if topic is None:
                raise SinkError("a Kafka sink record has no topic; set SinkRecord.topic")
            n = partitions.get(topic)
            if n is None:
                n = partitions[topic] = await self._partition_count(topic)
            p = record.partition
            if p is None:
                key = record.key
                if key is None:
                    p = keyless.get(topic)
                    if p is None:
                        p = keyless[topic] = self._next_keyless(topic, n)
                else:
                    h = hashes.get(key)
                    if h is None:
                        if len(hashes) >= _HASH_CACHE_SIZE:
                            hashes.clear()
                        h = hashes[key] = murmur2(key) & 0x7FFFFFFF
                    p = h % n
            elif not 0 <= p < n:
                raise SinkError(
                    f"partition {p} does not exist in Kafka topic {topic!r} ({n} partitions)"
                )
            group = groups.get((topic, p))
            if group is None:
                groups[(topic, p)] = [record]
            else:
                group.append(record)
        return groups

    async def _partition_count(self, topic: str) -> int:
        try:
            parts = await self._producer.partitions_for(topic)
        except KafkaError as exc:
            raise SinkError(
                f"cannot write to Kafka topic {topic!r} on {self.url}: {describe(exc)}; "
                f"create it (`asyncflow topics create {topic} --partitions N`)"
            ) from None
        return len(parts)

    def _next_keyless(self, topic: str, partitions: int) -> int:
        p = self._keyless_next.get(topic, 0) % partitions
        self._keyless_next[topic] = p + 1
        return p

    async def _send(
        self, topic: str, partition: int, records: list[SinkRecord]
    ) -> list[tuple[int, Any]]:
        """Queue ``records`` as closed batches for one partition; return (count, future) pairs."""
        producer = self._producer
        futures: list[tuple[int, Any]] = []
        batch = producer.create_batch()
        count = 0
        for r in records:
            headers = r.headers
            if headers.__class__ is not list:  # aiokafka's batch builder takes only lists
                headers = list(headers)
            if batch.append(key=r.key, value=r.value, timestamp=r.timestamp, headers=headers):
                count += 1
                continue
            batch.close()
            futures.append((count, await producer.send_batch(batch, topic, partition=partition)))
            batch = producer.create_batch()
            batch.append(key=r.key, value=r.value, timestamp=r.timestamp, headers=headers)
            count = 1
        if count:
            batch.close()
            futures.append((count, await producer.send_batch(batch, topic, partition=partition)))
        return futures

    def _error(self, failures: list[tuple[str, int, int, BaseException]], total: int) -> SinkError:
        lost = sum(n for _, _, n, _ in failures)
        topic, p, _, exc = failures[0]
        if isinstance(exc, TypeError):
            reason = f"{exc}; Kafka records need bytes keys and values"
        else:
            reason = describe(exc)
        return SinkError(
            f"Kafka did not acknowledge {lost} of {total} records (first: topic {topic!r} "
            f"partition {p} on {self.url}: {reason}) after the producer's retries "
            f"(request_timeout_ms={self.settings.request_timeout_ms}); is the broker up "
            "and does the topic accept writes?"
        )

    async def stop(self) -> None:
        """Wait for batches still in flight, then close the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as exc:
                log.warning("closing the Kafka producer for %s failed: %s", self.url, exc)
