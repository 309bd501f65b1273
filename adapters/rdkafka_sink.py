"""The librdkafka sink: ``Sink.write`` through a shared ``RdProducer``.

Keys are partitioned by librdkafka's ``murmur2_random`` partitioner, which
picks what Kafka's Java client picks (``adapters.kafka_sink.kafka_partition``);
``SinkRecord.partition`` overrides it. Records the broker refuses for what
they are (too large, invalid) come back as ``Rejected`` with the same reason
the aiokafka sink gives; everything else that fails after librdkafka's
retries raises ``SinkError``. Under exactly-once the producer is the worker's
transactional one and ``write`` returns once the records are queued: they are
durable, and visible to ``read_committed`` consumers, when the checkpoint's
transaction commits (which waits for each of them, and aborts if one was not
delivered, Kafka's rule for a transaction: so a record the broker refuses
stops the worker; ``max_request_size`` at most the topics' ``max.message.bytes``
lets the sink refuse oversize records itself, to the dead letters).

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> sink = RdKafkaSink(KafkaSettings.parse("kafka://k?client=rdkafka&max_batch=5000"))
    >>> sink.max_batch, sink.linger
    (5000, 0.0)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from confluent_kafka import KafkaException

from adapters.kafka_config import KafkaSettings
from adapters.kafka_health import BrokerHealth
from adapters.kafka_sink import no_partition, refused_reason, too_large_reason, unacknowledged
from adapters.rdkafka_config import describe_error
from adapters.rdkafka_producer import RdProducer, is_connection_failure
from asyncflow.errors import SinkError
from asyncflow.protocols import Rejected, SinkRecord

_RECORD_OVERHEAD = 70
"""Bytes a record batch adds around one record (what ``max_request_size`` is checked with)."""


class RdKafkaSink:
    """A librdkafka producer implementing ``asyncflow.protocols.Sink`` for records with a ``topic``.

    ``producer`` is shared (the broker's transactional producer under
    exactly-once); without one the sink has its own, started by ``start``
    and stopped by ``stop``.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        url: str = "",
        name: str = "kafka",
        health: BrokerHealth | None = None,
        producer: RdProducer | None = None,
    ) -> None:
        self.settings = settings
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.name = name
        self.health = health or BrokerHealth(self.url)
        self.max_batch = settings.max_batch
        self.linger = settings.linger_ms / 1000
        self._owns = producer is None
        self.producer = producer or RdProducer(settings, self.url, self.health, what="producer")
        self._counts: dict[str, int] = {}
        self._keyless_next: dict[str, int] = {}

    async def start(self) -> None:
        """Connect the producer; ``BrokerUnavailable`` if the cluster is unreachable."""
        await self.producer.start()

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected] | None:
        """Send ``records``; return once every one not refused is acknowledged."""
        if not records:
            return None
        if self.producer.producer is None and not self._owns:
            raise SinkError("RdKafkaSink.write() before start(); start the sink first")
        records, rejected = await self._prepare(records)
        if self.producer.transactional_id is not None:
            # exactly-once: durable means committed; the checkpoint's commit waits for every
            # record and aborts if one was not delivered
            failures = await self.producer.queue(records) if records else []
        else:
            failures = await self.producer.send(records) if records else []
        if not failures:
            self.health.ok()
            return rejected
        refused = [f for f in failures if f.refused]
        others = [f for f in failures if not f.refused]
        if others:
            first = others[0]
            if is_connection_failure(first):
                self.health.failed(f"producing: {first.reason}")
            raise unacknowledged(len(others), len(records), first.record.topic or "?",
                                 first.record.partition if first.record.partition is not None
                                 else -1, first.reason, self.url,
                                 self.settings.request_timeout_ms)
        return rejected + [Rejected(f.record, refused_reason(f.reason, f.record.topic or "?",
                                                             f.record.partition or 0))
                           for f in refused]

    async def _prepare(
        self, records: Sequence[SinkRecord]
    ) -> tuple[Sequence[SinkRecord], list[Rejected]]:
        """Check the records (topic, bytes, partition, size); keyless ones get their partition.

        Keyless records of one write share a partition of their topic, and writes
        rotate over the partitions (as the aiokafka sink does). Keyed ones are
        left to librdkafka's Java-compatible partitioner.
        """
        limit = self.settings.max_request_size
        out: list[SinkRecord] | None = None
        rejected: list[Rejected] = []
        keyless: dict[str, int] = {}
        for i, r in enumerate(records):
            topic, key, value = r.topic, r.key, r.value
            if topic is None:
                raise SinkError("a Kafka sink record has no topic; set SinkRecord.topic")
            if (key is not None and key.__class__ is not bytes) or (
                    value is not None and value.__class__ is not bytes):
                raise SinkError(
                    f"Kafka records need bytes keys and values (got {type(key).__name__} and "
                    f"{type(value).__name__}); encode them with the topic's codec before writing"
                )
            size = (len(key) if key else 0) + (len(value) if value else 0) + _RECORD_OVERHEAD
            if r.headers:
                size += sum(len(k) + len(v) for k, v in r.headers)
            replaced: SinkRecord | None = None
            if size > limit:
                rejected.append(Rejected(r, too_large_reason(size - _RECORD_OVERHEAD, limit)))
            elif r.partition is not None:
                n = await self._count(topic)
                if not 0 <= r.partition < n:
                    raise no_partition(r.partition, topic, n)
            elif key is None:
                p = keyless.get(topic)
                if p is None:
                    n = await self._count(topic)
                    p = keyless[topic] = self._keyless_next.get(topic, 0) % n
                    self._keyless_next[topic] = p + 1
                replaced = SinkRecord(None, value, topic, r.headers, r.timestamp, p)
            else:
                if out is not None:
                    out.append(r)
                continue
            if out is None:
                out = list(records[:i])
            if replaced is not None:
                out.append(replaced)
            elif size <= limit:
                out.append(r)
        return (records if out is None else out), rejected

    async def _count(self, topic: str) -> int:
        n = self._counts.get(topic)
        if n is None:
            producer = await self.producer.start()
            timeout = self.settings.request_timeout_ms / 1000
            try:
                metadata = await asyncio.to_thread(producer.list_topics, topic, timeout)
            except KafkaException as exc:
                raise SinkError(f"cannot write to Kafka topic {topic!r} on {self.url}: "
                                f"{describe_error(exc)}") from None
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or not found.partitions:
                raise SinkError(
                    f"cannot write to Kafka topic {topic!r} on {self.url}: it does not exist; "
                    f"create it (`asyncflow topics create {topic} --partitions N`)"
                )
            n = self._counts[topic] = len(found.partitions)
        return n

    async def stop(self) -> None:
        """Deliver what is in flight (within ``request_timeout_ms``) and close an own producer."""
        if self._owns:
            await self.producer.stop()
