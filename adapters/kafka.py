"""Kafka for asyncflow: a ``Broker`` whose sources are consumer-group members and sinks producers.

Found through the ``asyncflow.brokers`` entry point ``kafka`` (URL scheme
``kafka://``). The pieces live in ``kafka_config`` (URL and options),
``kafka_source`` (consumer), ``kafka_sink`` (producer) and ``kafka_changelog``
(durable state's changelog topics); this module holds the broker and topic
management.

URL: ``kafka://[user:password@]host:port[,host:port][?option=value&...]`` (``user:password``
are the SASL username and password, percent-encoded; never printed). Options, from the
query string or the ``options`` mapping (which wins): ``client_id``,
``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``,
``sasl_plain_password``, ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_password``, ``ssl_check_hostname``, ``connect_timeout_ms`` (10 s),
``request_timeout_ms``, ``session_timeout_ms`` (10 s; the Tansu test broker
holds each group join for half of it, so tests use ~3 s),
``heartbeat_interval_ms``, ``rebalance_timeout_ms`` (60 s: how long the core's
``on_revoked`` may drain before the group evicts this member),
``max_poll_interval_ms``,
``auto_offset_reset`` (earliest), ``max_poll_records``, ``fetch_max_wait_ms`` (100: how
long the broker may hold a fetch; some brokers hold it about half of that even with data
waiting), ``fetch_min_bytes``, ``fetch_max_bytes``, ``max_partition_fetch_bytes``,
``linger_ms`` (how long the sink waits for a fuller batch; 0: it writes as soon as
its previous write is done, so batches grow with the load), ``max_batch`` (records per sink
write, 10,000), ``max_batch_size`` (bytes per produce batch, 512 KiB: with one request in
flight per partition, smaller batches cap the output rate),
``max_request_size``, ``enable_idempotence`` (true; set false for Tansu),
``acks`` (all), ``compression_type``, ``create_topics`` (true),
``replication_factor`` (default: min(3, brokers)), ``client`` (``aiokafka``, the default, or
``rdkafka``: librdkafka through ``confluent-kafka``, see ``adapters.rdkafka``; the only client
with ``processing_guarantee="exactly_once"``), ``transactional_id`` (rdkafka, exactly-once: this
worker's transactional id; give each worker a stable one so a restart aborts what its
predecessor left open; default: the app id and a random token) and
``transaction_timeout_ms`` (60 s).

Example:
    >>> broker = KafkaBroker("kafka://127.0.0.1:9092?enable_idempotence=false", {})
    >>> broker.url, broker.settings.enable_idempotence
    ('kafka://127.0.0.1:9092?enable_idempotence=false', False)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code

from adapters.kafka_changelog import KafkaChangelog
from adapters.kafka_config import URL_FORM, KafkaSettings, describe, redact_url, start_client
from adapters.kafka_health import BrokerHealth
from adapters.kafka_sink import KafkaSink, kafka_partition
from adapters.kafka_source import KafkaSource, KafkaSourceError
from asyncflow.errors import BrokerUnavailable, ConfigError, TopicMissing
from asyncflow.protocols import RawRecord, SinkRecord, TopicSpec

__all__ = [
    "URL_FORM",
    "KafkaBroker",
    "KafkaChangelog",
    "KafkaSettings",
    "KafkaSink",
    "KafkaSource",
    "KafkaSourceError",
    "kafka_partition",
]

log = logging.getLogger("asyncflow.kafka")

_TOPIC_ALREADY_EXISTS = 36
_CLEANUP_POLICY = "cleanup.policy"


class KafkaBroker:
    """A Kafka cluster as an asyncflow ``Broker`` and ``ChangelogBroker`` (see ``protocols``).

    ``KafkaBroker(url, options)`` only parses its settings (``ConfigError`` if
    they are wrong); connections open when a source or sink starts or a topic
    or changelog call is made.

    Example:
        >>> broker = KafkaBroker("kafka://k1:9092,k2:9092", {"client_id": "etl"})
        >>> broker.settings.bootstrap_servers
        ['k1:9092', 'k2:9092']
        >>> KafkaBroker("http://k1:9092", {})
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: bad Kafka URL 'http://k1:9092'; expected kafka://[user:password@]host:port[,host:port...][?option=value&...]
    """

    exactly_once_unsupported: str | None = (
        "the aiokafka client has no exactly-once here; use the librdkafka client "
        "(add client=rdkafka to the Kafka URL)"
    )
    """Why this broker cannot run ``processing_guarantee="exactly_once"`` (the runtime says it)."""

    def __new__(
        cls, url: str, options: Mapping[str, str] | None = None, *args: Any, **kwargs: Any
    ) -> KafkaBroker:
        """``client=rdkafka`` makes an ``adapters.rdkafka.RdKafkaBroker`` (same interface)."""
        if cls is KafkaBroker and KafkaSettings.parse(url, options).client == "rdkafka":
            from adapters.rdkafka import RdKafkaBroker

            return super().__new__(RdKafkaBroker)
        return super().__new__(cls)

    def __init__(self, url: str, options: Mapping[str, str] | None = None) -> None:
        self.settings = KafkaSettings.parse(url, options)
        self.url = redact_url(url)
        self._admin: Any = None
        self._admin_lock: asyncio.Lock | None = None
        self.health = BrokerHealth(
            self.url,
            probe=self._probe,
            probe_timeout=min(5.0, self.settings.request_timeout_ms / 1000),
        )
        """The cluster's reachability, one log line per change (see ``adapters.kafka_health``);
        it listens to the aiokafka clients' logs while one of its clients runs."""
        self._changelog: Any = self._make_changelog()

    def _make_changelog(self) -> Any:
        return KafkaChangelog(self.settings, self.url, self.health)

    def source(self, topics: Sequence[TopicSpec], group_id: str) -> KafkaSource:
        """A consumer-group member reading ``topics`` as ``group_id`` (not started).

        Example:
            >>> KafkaBroker("kafka://localhost", {}).source([TopicSpec("a")], "g").topics
            ['a']
        """
        if not topics:
            raise ConfigError("a Kafka source needs at least one topic")
        if not group_id:
            raise ConfigError("a Kafka source needs a consumer group id")
        return KafkaSource(self.settings, [t.name for t in topics], group_id, self.url, self.health)

    def sink(self) -> KafkaSink:
        """A producer writing ``SinkRecord`` s to their ``topic`` (not started).

        Example:
            >>> KafkaBroker("kafka://localhost", {}).sink().max_batch
            10000
        """
        return KafkaSink(self.settings, self.url, health=self.health)

    async def ensure_topics(self, topics: Sequence[TopicSpec]) -> None:
        """Create missing topics that allow it; raise ``TopicMissing`` for the others.

        A topic may be created when its spec has ``create=True`` and the broker
        option ``create_topics`` is not false. Nothing is created if any missing
        topic may not be. Existing topics are left as they are (a warning says
        so when they have fewer partitions than declared).

        Example:
            >>> async def main():  # doctest: +SKIP
            ...     await broker.ensure_topics([TopicSpec("rides", partitions=4)])
        """
        await self._ensure(
            topics,
            "Kafka topic %r has %d partitions, fewer than the %d declared; "
            "only %d lanes can read it in parallel across workers",
        )

    async def _ensure(self, topics: Sequence[TopicSpec], fewer: str) -> None:
        """Create the missing topics, or none if one may not be; warn (``fewer``) of short ones."""
        existing = await self.list_topics()
        missing: dict[str, TopicSpec] = {}
        for spec in topics:
            count = existing.get(spec.name)
            if count is None:
                missing.setdefault(spec.name, spec)
            elif count < spec.partitions:
                log.warning(fewer, spec.name, count, spec.partitions, count)
        for spec in missing.values():
            if not (spec.create and self.settings.create_topics):
                raise TopicMissing(spec.name, self.url)
        for name, spec in list(missing.items()):
            like = spec.partitions_like
            if like is not None:  # as many partitions as that topic has (or is declared with)
                count = existing.get(like) or (missing[like].partitions if like in missing else 0)
                if count:
                    missing[name] = dataclasses.replace(spec, partitions=count)
        if missing:
            await self._create(list(missing.values()))

    async def ensure_changelogs(self, topics: Sequence[TopicSpec]) -> None:
        """Create missing changelog topics, compacted (``cleanup.policy=compact``).

        The spec's ``config`` is kept and ``cleanup.policy`` added to it; a spec
        whose policy does not include ``compact`` is a ``ConfigError`` (a
        ``delete`` policy would drop state). Like ``ensure_topics``: a missing
        topic whose spec says ``create=False``, or a broker with
        ``create_topics=false``, raises ``TopicMissing`` and nothing is
        created; existing topics are left as they are, with a warning when
        they have fewer partitions than asked (appends for the partitions
        they lack fail). Calling it again, or from several workers at once,
        is harmless.

        Example:
            >>> async def main():  # doctest: +SKIP
            ...     await broker.ensure_changelogs([TopicSpec("app-c-changelog", partitions=4)])
        """
        await self._ensure(
            [_compacted(spec) for spec in topics],
            "changelog topic %r has %d partitions, fewer than the %d asked; "
            "state of source partitions %d and above cannot be written to it",
        )

    async def append(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int:
        """Write ``records`` in order to one changelog partition; the offset of the last one.

        Returns once they are durable (``acks=all``). ``key``/``value`` are bytes,
        ``value=None`` is a tombstone, ``headers`` are kept. Raises
        ``SinkError`` naming the topic and partition if the broker does not
        acknowledge them after the producer's retries. See
        ``KafkaChangelog.append``.

        Example:
            >>> async def main():  # doctest: +SKIP
            ...     await broker.append("app-c-changelog", 0, [SinkRecord(b"k", b"1")])
            41
        """
        return int(await self._changelog.append(topic, partition, records))

    async def read_changelog(
        self, topic: str, partition: int, start: int, *, timeout: float, max_records: int = 10_000
    ) -> list[RawRecord]:
        """Records of one changelog partition from offset ``start`` on, at most ``max_records``.

        ``[]`` if none arrived within ``timeout`` seconds. The records are
        aiokafka ``ConsumerRecord`` s (``offset``, ``key``, ``value``,
        ``timestamp``, ``headers``). No consumer group is joined and nothing is
        committed. Records written by ``append`` can be read as soon as it
        returned. See ``KafkaChangelog.read``.

        Example:
            >>> async def main():  # doctest: +SKIP
            ...     records = await broker.read_changelog("app-c-changelog", 0, 40, timeout=1)
            ...     [r.offset for r in records]
            [40, 41]
        """
        records: list[RawRecord] = await self._changelog.read(
            topic, partition, start, timeout=timeout, max_records=max_records
        )
        return records

    async def _create(self, specs: list[TopicSpec]) -> None:
        admin = await self._admin_client()
        replication = self.settings.replication_factor
        if replication is None:
            cluster = await self._call(admin.describe_cluster())
            replication = max(1, min(3, len(cluster.get("brokers") or [])))
        new = [
            NewTopic(s.name, s.partitions, replication, topic_configs=dict(s.config)) for s in specs
        ]
        response = await self._call(admin.create_topics(new))
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 else None
            if code in (0, _TOPIC_ALREADY_EXISTS):
                if code == 0:
                    log.info("created Kafka topic %r on %s", name, self.url)
                continue
            error = for_code(code)
            raise ConfigError(
                f"creating Kafka topic {name!r} on {self.url} failed: "
                f"{error.__name__}{': ' + message if message else ''}"
            )

    async def list_topics(self) -> dict[str, int]:
        """Topic name to partition count, internal topics left out.

        Asks for all topics at once: brokers that create topics on demand
        (Tansu, Kafka with ``auto.create.topics.enable``) create nothing here.

        Example:
            >>> async def main():  # doctest: +SKIP
            ...     await broker.list_topics()
            {'rides': 4}
        """
        admin = await self._admin_client()
        described = await self._call(admin.describe_topics())
        return {
            t["topic"]: len(t["partitions"])
            for t in described
            if not t.get("is_internal") and t.get("error_code", 0) == 0
        }

    async def close(self) -> None:
        """Close the admin connection and the changelog clients (each within ``request_timeout_ms``).

        Sources and sinks are stopped by their owners. Stops watching the
        clients' logs (``health``).

        Example:
            >>> asyncio.run(KafkaBroker("kafka://localhost", {}).close())
        """
        await self.health.stop_probing()  # a probe would open the admin client again
        admin, self._admin = self._admin, None
        try:
            await self._changelog.close()
            if admin is not None:
                try:
                    async with asyncio.timeout(self.settings.request_timeout_ms / 1000):
                        await admin.close()
                except (TimeoutError, KafkaError, OSError) as exc:
                    log.warning("closing the Kafka admin client for %s failed: %s",
                                self.url, describe(exc))
        finally:
            self.health.unwatch(self)

    async def _probe(self) -> None:
        """One metadata request (what ``health`` asks while the cluster seems unreachable)."""
        admin = await self._admin_client()
        await admin.describe_cluster()

    async def _admin_client(self) -> Any:
        if self._admin is not None:
            return self._admin
        if self._admin_lock is None:
            self._admin_lock = asyncio.Lock()
        async with self._admin_lock:
            if self._admin is None:
                self.health.watch(self)
                settings = self.settings
                admin = AIOKafkaAdminClient(**settings.client_args())
                await start_client(admin, self.url, settings)
                self._admin = admin
        return self._admin

    async def _call(self, request: Any) -> Any:
        """Await an admin request; a lost connection becomes ``BrokerUnavailable``."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_ms / 1000):
                return await request
        except TimeoutError:
            raise BrokerUnavailable(
                self.url, f"no answer within request_timeout_ms={self.settings.request_timeout_ms}"
            ) from None
        except KafkaError as exc:
            raise BrokerUnavailable(self.url, describe(exc)) from None


def _compacted(spec: TopicSpec) -> TopicSpec:
    """``spec`` with ``cleanup.policy=compact`` in its config (a policy without it is an error).

    Example:
        >>> _compacted(TopicSpec("c", config={"retention.ms": "-1"})).config
        {'retention.ms': '-1', 'cleanup.policy': 'compact'}
        >>> _compacted(TopicSpec("c", config={"cleanup.policy": "compact,delete"})).config
        {'cleanup.policy': 'compact,delete'}
    """
    config = dict(spec.config)
    policy = config.setdefault(_CLEANUP_POLICY, "compact")
    if "compact" not in (p.strip() for p in policy.split(",")):
        raise ConfigError(
            f"changelog topic {spec.name!r} has cleanup.policy={policy!r}; a changelog must be "
            "compacted (cleanup.policy=compact, or compact,delete)"
        )
    return dataclasses.replace(spec, config=config)
