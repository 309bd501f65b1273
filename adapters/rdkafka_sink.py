"""The librdkafka sink: ``Sink.write`` through a shared ``RdProducer``.

Keys are partitioned by librdkafka's ``murmur2_random`` partitioner, which
picks what Kafka's Java client picks (``adapters.kafka_sink.kafka_partition``);
``SinkRecord.partition`` overrides it. Records the broker refuses for what
they are (too large, invalid) come back as ``Rejected`` with the same reason
the aiokafka sink gives; everything else that fails after librdkafka's
retries raises ``SinkError``. Under exactly-once the producer is the worker's
transactional one: what ``write`` returns is acknowledged but becomes visible
to ``read_committed`` consumers only when the checkpoint's transaction
commits.

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> sink = RdKafkaSink(KafkaSettings.parse("kafka://k?client=rdkafka&max_batch=5000"))
    >>> sink.max_batch, sink.linger
    (5000, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.kafka_config import KafkaSettings
from adapters.kafka_health import BrokerHealth
from adapters.kafka_sink import refused_reason, unacknowledged
from adapters.rdkafka_producer import RdProducer, is_connection_failure
from asyncflow.errors import SinkError
from asyncflow.protocols import Rejected, SinkRecord


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

    async def start(self) -> None:
        """Connect the producer; ``BrokerUnavailable`` if the cluster is unreachable."""
        await self.producer.start()

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected] | None:
        """Send ``records``; return once every one not refused is acknowledged."""
        if not records:
            return None
        if self.producer.producer is None and not self._owns:
            raise SinkError("RdKafkaSink.write() before start(); start the sink first")
        failures = await self.producer.send(records)
        if not failures:
            self.health.ok()
            return []
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
        return [Rejected(f.record, refused_reason(f.reason, f.record.topic or "?",
                                                  f.record.partition or 0)) for f in refused]

    async def stop(self) -> None:
        """Deliver what is in flight (within ``request_timeout_ms``) and close an own producer."""
        if self._owns:
            await self.producer.stop()
