"""Kafka through librdkafka (``confluent-kafka``): ``kafka://...?client=rdkafka``.

The same ``Broker`` and ``ChangelogBroker`` as ``adapters.kafka.KafkaBroker``
(whose URL, options, topic rules and error messages it shares: it is a
subclass), with librdkafka clients underneath: sources from
``adapters.rdkafka_source``, sinks from ``adapters.rdkafka_sink``, changelogs
from ``adapters.rdkafka_changelog``, topic management through librdkafka's
``AdminClient``. librdkafka does the network and protocol work in its own C
threads; see ``adapters.rdkafka_bridge`` for how it meets the event loop.

It is also a ``TransactionalBroker``: ``exactly_once(app_id)`` gives the
worker one transactional producer (``transactional_id``, default the app id
and a random token) that the sink and the changelog appends write through,
and makes sources and changelog reads ``read_committed``
(``adapters.rdkafka_transactions`` has the lifecycle).

Example:
    >>> from adapters.kafka import KafkaBroker
    >>> broker = KafkaBroker("kafka://127.0.0.1:9092?client=rdkafka", {})
    >>> type(broker).__name__, broker.settings.client
    ('RdKafkaBroker', 'rdkafka')
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from adapters.kafka import KafkaBroker
from adapters.rdkafka_bridge import refuse_fast
from adapters.rdkafka_changelog import RdKafkaChangelog
from adapters.rdkafka_config import admin_config, describe_error
from adapters.rdkafka_producer import RdProducer
from adapters.rdkafka_sink import RdKafkaSink
from adapters.rdkafka_source import RdKafkaSource
from adapters.rdkafka_transactions import KafkaTransactions
from asyncflow.errors import BrokerUnavailable, ConfigError
from asyncflow.protocols import SinkRecord, TopicSpec

__all__ = ["RdKafkaBroker"]

log = logging.getLogger("asyncflow.kafka")


class RdKafkaBroker(KafkaBroker):
    """``KafkaBroker`` on librdkafka; made by ``KafkaBroker(url)`` when the URL says ``client=rdkafka``."""

    exactly_once_unsupported = None

    def _make_changelog(self) -> RdKafkaChangelog:
        self._admin_rd: Any = None
        self._transactions: KafkaTransactions | None = None
        return RdKafkaChangelog(self.settings, self.url, self.health)

    # -- exactly-once ------------------------------------------------------------------------
    def exactly_once(self, app_id: str) -> KafkaTransactions:
        """Turn this broker to transactions for the worker of ``app_id`` (call before sources/sinks)."""
        if self._transactions is None:
            txid = self.settings.transactional_id or f"{app_id}-{secrets.token_hex(4)}"
            producer = RdProducer(self.settings, self.url, self.health, transactional_id=txid,
                                  what="transactional producer")
            self._transactions = KafkaTransactions(producer, self.settings)
            self._changelog.transactional = producer
            self._changelog.read_committed = True
            log.info("exactly-once on %s: transactional id %r", self.url, txid)
        return self._transactions

    async def append_now(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int:
        """Append outside any transaction (readable at once); see ``RdKafkaChangelog.append_now``."""
        return int(await self._changelog.append_now(topic, partition, records))

    # -- sources and sinks --------------------------------------------------------------------
    def source(self, topics: Sequence[TopicSpec], group_id: str) -> RdKafkaSource:  # type: ignore[override]
        """A consumer-group member (``read_committed`` under exactly-once), not started."""
        if not topics:
            raise ConfigError("a Kafka source needs at least one topic")
        if not group_id:
            raise ConfigError("a Kafka source needs a consumer group id")
        return RdKafkaSource(self.settings, [t.name for t in topics], group_id, self.url,
                             self.health, read_committed=self._transactions is not None)

    def sink(self) -> RdKafkaSink:  # type: ignore[override]
        """A producer writing ``SinkRecord`` s to their topic (the transactional one under exactly-once)."""
        tx = self._transactions
        return RdKafkaSink(self.settings, self.url, health=self.health,
                           producer=tx.producer if tx is not None else None)

    # -- topic management -----------------------------------------------------------------------
    def _admin_rd_client(self) -> Any:
        if self._admin_rd is None:
            self.health.watch(self)
            self._admin_rd = AdminClient(admin_config(self.settings))
        return self._admin_rd

    async def _metadata(self) -> Any:
        if self._admin_rd is None:
            await refuse_fast(self.settings, self.url)
        admin = self._admin_rd_client()
        timeout = min(self.settings.request_timeout_ms, self.settings.connect_timeout_ms) / 1000
        try:
            return await asyncio.to_thread(admin.list_topics, timeout=timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(self.url, describe_error(exc)) from None

    async def list_topics(self) -> dict[str, int]:
        """Topic name to partition count, internal topics left out."""
        metadata = await self._metadata()
        return {
            name: len(t.partitions)
            for name, t in metadata.topics.items()
            if t.error is None and not name.startswith("__")
        }

    async def _create(self, specs: list[TopicSpec]) -> None:
        replication = self.settings.replication_factor
        if replication is None:
            metadata = await self._metadata()
            replication = max(1, min(3, len(metadata.brokers)))
        new = [NewTopic(s.name, s.partitions, replication, config=dict(s.config)) for s in specs]
        admin = self._admin_rd_client()
        futures = admin.create_topics(new, request_timeout=self.settings.request_timeout_ms / 1000)
        for name, future in futures.items():
            try:
                await asyncio.wrap_future(future)
                log.info("created Kafka topic %r on %s", name, self.url)
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if err.code() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT):
                    raise BrokerUnavailable(self.url, describe_error(exc)) from None
                raise ConfigError(
                    f"creating Kafka topic {name!r} on {self.url} failed: {describe_error(exc)}"
                ) from None

    async def _probe(self) -> None:
        await self._metadata()

    async def close(self) -> None:
        """Close the transactional producer, the changelog clients and the admin client."""
        await self.health.stop_probing()
        try:
            tx, self._transactions = self._transactions, None
            if tx is not None:
                await tx.abort("closing")
                await tx.producer.stop()
            await self._changelog.close()
            self._admin_rd = None
        finally:
            self.health.unwatch(self)

