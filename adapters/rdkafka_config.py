"""librdkafka configurations from ``KafkaSettings``: one option set, two clients.

The ``kafka://`` URL and its options mean the same whichever client runs
them (``client=rdkafka`` picks this one); this module translates them into
librdkafka's property names for the consumer, the producer (plain or
transactional), the admin client and the group-less changelog reader.
Secrets stay in the dictionaries handed to librdkafka and are never logged
(``redacted`` shows a configuration with them masked).

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> s = KafkaSettings.parse("kafka://k1:9092,k2:9092?client=rdkafka")
    >>> common(s)["bootstrap.servers"]
    'k1:9092,k2:9092'
    >>> consumer_config(s, "g")["enable.auto.commit"], consumer_config(s, "g")["group.id"]
    (False, 'g')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from adapters.kafka_config import KafkaSettings

__all__ = [
    "admin_config",
    "common",
    "consumer_config",
    "describe_error",
    "producer_config",
    "reader_config",
    "redacted",
]

_SECRETS = frozenset({"sasl.password", "ssl.key.password"})

_LOG = logging.getLogger("asyncflow.kafka.librdkafka")


class _QuietLog:
    """librdkafka's log lines, at debug level: what users need (an outage, a fatal error)
    comes as one line from ``BrokerHealth`` and the error callbacks instead."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        _LOG.debug(fmt, *args)


_QUIET = _QuietLog()

PARTITIONER = "murmur2_random"
"""librdkafka's partitioner that picks what Kafka's Java client picks for a key."""


def common(settings: KafkaSettings) -> dict[str, Any]:
    """Properties every librdkafka client of a broker shares (servers, timeouts, TLS, SASL).

    Example:
        >>> from adapters.kafka_config import KafkaSettings
        >>> c = common(KafkaSettings.parse("kafka://u:p@k?security_protocol=SASL_SSL"))
        >>> c["security.protocol"], c["sasl.username"], c["sasl.mechanism"]
        ('SASL_SSL', 'u', 'PLAIN')
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(settings.bootstrap_servers),
        "client.id": settings.client_id,
        "socket.connection.setup.timeout.ms": settings.connect_timeout_ms,
        "retry.backoff.ms": settings.retry_backoff_ms,
        "security.protocol": settings.security_protocol,
        "log.connection.close": False,
        "logger": _QUIET,
    }
    if settings.security_protocol.endswith("SSL"):
        if settings.ssl_cafile is not None:
            conf["ssl.ca.location"] = settings.ssl_cafile
        if settings.ssl_certfile is not None:
            conf["ssl.certificate.location"] = settings.ssl_certfile
        if settings.ssl_keyfile is not None:
            conf["ssl.key.location"] = settings.ssl_keyfile
        if settings.ssl_password is not None:
            conf["ssl.key.password"] = settings.ssl_password
        conf["ssl.endpoint.identification.algorithm"] = (
            "https" if settings.ssl_check_hostname else "none"
        )
    if settings.security_protocol.startswith("SASL"):
        conf["sasl.mechanism"] = settings.sasl_mechanism
        conf["sasl.username"] = settings.sasl_plain_username
        conf["sasl.password"] = settings.sasl_plain_password
    return conf


def consumer_config(
    settings: KafkaSettings, group_id: str, *, read_committed: bool = False
) -> dict[str, Any]:
    """A group member: manual commits, eager rebalances, the URL's fetch and session options.

    ``read_committed``: only records of committed transactions (exactly-once).

    Example:
        >>> from adapters.kafka_config import KafkaSettings
        >>> s = KafkaSettings.parse("kafka://k?session_timeout_ms=3000")
        >>> conf = consumer_config(s, "g", read_committed=True)
        >>> conf["session.timeout.ms"], conf["heartbeat.interval.ms"], conf["isolation.level"]
        (3000, 1000, 'read_committed')
    """
    conf = common(settings)
    conf.update({
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": settings.heartbeat_interval,
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "fetch.wait.max.ms": settings.fetch_max_wait_ms,
        "fetch.min.bytes": settings.fetch_min_bytes,
        "fetch.max.bytes": settings.fetch_max_bytes,
        "max.partition.fetch.bytes": settings.max_partition_fetch_bytes,
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        "partition.assignment.strategy": "range,roundrobin",
        "enable.partition.eof": False,
    })
    return conf


def producer_config(
    settings: KafkaSettings, *, transactional_id: str | None = None
) -> dict[str, Any]:
    """A producer: Java-compatible keyed partitioning, acks and idempotence from the options.

    With ``transactional_id`` it is transactional (which implies idempotence
    and ``acks=all``).

    Example:
        >>> from adapters.kafka_config import KafkaSettings
        >>> s = KafkaSettings.parse("kafka://k?enable_idempotence=false")
        >>> conf = producer_config(s)
        >>> conf["partitioner"], conf["enable.idempotence"], conf["acks"]
        ('murmur2_random', False, -1)
        >>> producer_config(s, transactional_id="app-w1")["transactional.id"]
        'app-w1'
    """
    conf = common(settings)
    conf.update({
        "partitioner": PARTITIONER,
        "acks": settings.acks,
        "enable.idempotence": settings.enable_idempotence,
        "linger.ms": max(settings.linger_ms, 1),
        "batch.size": settings.max_batch_size,
        "message.max.bytes": settings.max_request_size,
        "request.timeout.ms": settings.request_timeout_ms,
        "message.timeout.ms": 2 * settings.request_timeout_ms,
        "queue.buffering.max.messages": 1_000_000,
        "compression.type": settings.compression_type or "none",
    })
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = settings.transaction_timeout_ms
        conf["message.timeout.ms"] = min(conf["message.timeout.ms"],
                                         settings.transaction_timeout_ms)
        conf["enable.idempotence"] = True
        conf["acks"] = -1
        # every record of a transaction is known at its commit: no need to wait for fuller
        # batches between commits
        conf["linger.ms"] = 5
    return conf


def admin_config(settings: KafkaSettings) -> dict[str, Any]:
    """The admin client's properties (topic management, cluster metadata).

    Example:
        >>> from adapters.kafka_config import KafkaSettings
        >>> "bootstrap.servers" in admin_config(KafkaSettings.parse("kafka://k"))
        True
    """
    return common(settings)


def reader_config(settings: KafkaSettings, *, read_committed: bool) -> dict[str, Any]:
    """A group-less reader of changelog partitions (assign and seek; never commits).

    ``auto.offset.reset=error``: a read from an offset the broker does not have
    is reported instead of silently jumping; restores read committed
    transactions only under exactly-once.

    Example:
        >>> from adapters.kafka_config import KafkaSettings
        >>> conf = reader_config(KafkaSettings.parse("kafka://k"), read_committed=True)
        >>> conf["isolation.level"], conf["auto.offset.reset"], conf["enable.auto.commit"]
        ('read_committed', 'error', False)
    """
    conf = common(settings)
    conf.update({
        "group.id": "asyncflow-changelog-reader",  # librdkafka wants one; nothing joins or commits
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "error",
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        "fetch.wait.max.ms": min(settings.fetch_max_wait_ms, 20),
        "fetch.max.bytes": settings.fetch_max_bytes,
        "max.partition.fetch.bytes": settings.max_partition_fetch_bytes,
        "enable.partition.eof": False,
    })
    return conf


def redacted(conf: Mapping[str, Any]) -> dict[str, Any]:
    """``conf`` with its secrets shown as ``'***'`` (for logs and errors).

    Example:
        >>> redacted({"sasl.password": "pw", "client.id": "x"})
        {'sasl.password': '***', 'client.id': 'x'}
    """
    return {k: ("***" if k in _SECRETS and v is not None else v) for k, v in conf.items()}


def describe_error(exc: BaseException) -> str:
    """One line for a librdkafka error: its name and its text.

    Example:
        >>> from confluent_kafka import KafkaError, KafkaException
        >>> describe_error(KafkaException(KafkaError(KafkaError._TRANSPORT, "down")))
        '_TRANSPORT: down'
    """
    err = exc.args[0] if exc.args else None
    name = getattr(err, "name", None)
    text = getattr(err, "str", None)
    if callable(name) and callable(text):
        return f"{name()}: {text()}".splitlines()[0]
    return (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
