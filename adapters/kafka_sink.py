"""The Kafka sink: writes ``SinkRecord`` batches with aiokafka's batch API.

One ``write`` groups its records by topic and partition, fills one producer
batch after another per partition (``create_batch`` / ``append`` /
``send_batch``), keeps every partition's batches in flight at once, and
returns when the broker has acknowledged all of them (``submit`` is the same
in two steps: the writer hands the next batch over while this one waits for
its acknowledgements, as a hand-written loop does). Keyed records go to the
partition the Java client would pick (``murmur2(key) & 0x7fffffff % n``);
keyless records of one write go to one partition, the next write to the next
one (sticky, round-robin across writes).

A record Kafka can never take is refused, not retried: one over the
producer's ``max_request_size`` (checked here, as aiokafka's ``send`` does),
and one the broker refuses for what it is (``MESSAGE_SIZE_TOO_LARGE`` over
the topic's ``max.message.bytes``, ``CORRUPT_MESSAGE``, ``INVALID_RECORD``).
When the broker refuses a batch of several records, each is sent again in a
batch of its own, so only the culprits are refused and the rest are
written. ``write`` returns the refused records (``Rejected``, with the reason)
and the core sends them to the dead-letter output. Everything else that
fails (the broker down, a leader gone, timeouts) is retried by the producer
and then raised as ``SinkError``.

Example:
    >>> kafka_partition(b"sensor-1", 4) == kafka_partition(b"sensor-1", 4)
    True
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from adapters.kafka_config import KafkaSettings, describe, start_client
from adapters.kafka_health import BrokerHealth
from asyncflow.errors import SinkError
from asyncflow.protocols import Rejected, SinkRecord

log = logging.getLogger("asyncflow.kafka")

_HASH_CACHE_SIZE = 65_536

REFUSED_ERRNOS = {2: "CORRUPT_MESSAGE", 10: "MESSAGE_SIZE_TOO_LARGE", 87: "INVALID_RECORD"}
"""Broker error codes that refuse a record for what it is: sending it again cannot help."""


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

    def __init__(
        self,
        settings: KafkaSettings,
        url: str = "",
        name: str = "kafka",
        health: BrokerHealth | None = None,
    ) -> None:
        self.settings = settings
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.name = name
        self.health = health or BrokerHealth(self.url)
        """Where the cluster's reachability is told (``KafkaBroker`` shares one)."""
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
        self.health.watch(self)
        try:
            await start_client(producer, self.url, self.settings)
        except BaseException:
            self.health.unwatch(self)
            raise
        self._producer = producer

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected] | None:
        """Send ``records``; return once the broker acknowledged every one it did not refuse.

        Within a partition the records keep their order, except records of a
        batch the broker refused, which are sent again one by one after the
        others. Returns the refused records (see the module docstring).
        ``submit`` and then awaiting what it returns is the same in two steps.
        """
        return await (await self.submit(records))

    async def submit(
        self, records: Sequence[SinkRecord]
    ) -> Coroutine[Any, Any, list[Rejected] | None]:
        """Hand ``records`` to the producer; return what to await for their acknowledgement.

        Returns once every record is in a producer batch, so records of one
        ``submit`` reach each partition before those of the next: the core's
        writer submits the next batch while this one is unacknowledged. Awaiting
        the result gives what ``write`` returns (it raises ``SinkError`` as
        ``write`` does); records over ``max_request_size`` are refused at once.

        Example:
            >>> async def two_in_flight(sink: KafkaSink) -> None:  # doctest: +SKIP
            ...     first = await sink.submit([SinkRecord(b"k", b"1", topic="t")])
            ...     second = await sink.submit([SinkRecord(b"k", b"2", topic="t")])
            ...     await first, await second  # b"1" is before b"2" in partition of b"k"
        """
        if not records:
            return _nothing_refused()
        if self._producer is None:
            raise SinkError("KafkaSink.write() before start(); start the sink first")
        try:
            groups = await self._group(records)
        except TypeError as exc:
            raise SinkError(
                f"Kafka records need bytes keys and values ({exc}); encode them with the "
                "topic's codec before writing"
            ) from None
        refused: list[Rejected] = []
        sends = await asyncio.gather(
            *(self._send(topic, p, recs, refused) for (topic, p), recs in groups.items()),
            return_exceptions=True,
        )
        return self._acknowledged(groups, sends, refused, len(records))

    async def _acknowledged(
        self,
        groups: dict[tuple[str, int], list[SinkRecord]],
        sends: list[Any],
        refused: list[Rejected],
        total: int,
    ) -> list[Rejected]:
        """Wait for a submitted write's batches; resend refused batches record by record."""
        pending: list[tuple[str, int, list[SinkRecord], Any]] = []
        failures: list[tuple[str, int, int, BaseException]] = []
        for ((topic, p), recs), sent in zip(groups.items(), sends, strict=True):
            if isinstance(sent, BaseException):
                failures.append((topic, p, len(recs), sent))
            else:
                pending.extend((topic, p, chunk, fut) for chunk, fut in sent)
        results = await asyncio.gather(*(fut for *_, fut in pending), return_exceptions=True)
        again: list[tuple[str, int, list[SinkRecord], BaseException]] = []
        for (topic, p, chunk, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if _refusal(result) is not None:
                    again.append((topic, p, chunk, result))
                else:
                    failures.append((topic, p, len(chunk), result))
        if failures:
            raise self._error(failures, total)
        for topic, p, chunk, error in again:
            refused.extend(await self._one_by_one(topic, p, chunk, error))
        return refused

    async def _one_by_one(
        self, topic: str, partition: int, chunk: list[SinkRecord], exc: BaseException
    ) -> list[Rejected]:
        """The broker refused a batch: send each record alone, and return the ones it refuses."""
        if len(chunk) == 1:
            return [Rejected(chunk[0], self._refused(topic, partition, exc))]
        producer = self._producer
        futures = []
        for r in chunk:
            batch = producer.create_batch()
            batch.append(key=r.key, value=r.value, timestamp=r.timestamp, headers=list(r.headers))
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        results = await asyncio.gather(*futures, return_exceptions=True)
        refused: list[Rejected] = []
        failures: list[tuple[str, int, int, BaseException]] = []
        for r, result in zip(chunk, results, strict=True):
            if isinstance(result, BaseException):
                if _refusal(result) is not None:
                    refused.append(Rejected(r, self._refused(topic, partition, result)))
                else:
                    failures.append((topic, partition, 1, result))
        if failures:
            raise self._error(failures, len(chunk))
        return refused

    def _refused(self, topic: str, partition: int, exc: BaseException) -> str:
        return refused_reason(f"{_refusal(exc)}: {describe(exc)}", topic, partition)

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
                raise no_partition(p, topic, n)
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
        self, topic: str, partition: int, records: list[SinkRecord], refused: list[Rejected]
    ) -> list[tuple[list[SinkRecord], Any]]:
        """Queue ``records`` as closed batches for one partition; return (records, future) pairs.

        A record over ``max_request_size`` is not sent: it goes to ``refused``.
        Only the first record of a batch can be over the batch size, so only
        first records are measured (every record, if batches may be larger
        than a request).
        """
        producer = self._producer
        limit = self.settings.max_request_size
        check_all = self.settings.max_batch_size > limit
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        futures: list[tuple[list[SinkRecord], Any]] = []
        batch = producer.create_batch()
        chunk: list[SinkRecord] = []
        for r in records:
            headers = r.headers
            if headers.__class__ is not list:  # aiokafka's batch builder takes only lists
                headers = list(headers)
            if chunk and (not check_all or estimate(r.key, r.value, headers) <= limit) and \
                    batch.append(key=r.key, value=r.value, timestamp=r.timestamp, headers=headers):
                chunk.append(r)
                continue
            if chunk:  # the batch is full: send it, and start the next one with this record
                batch.close()
                futures.append((chunk, await producer.send_batch(batch, topic, partition=partition)))
                batch = producer.create_batch()
                chunk = []
            size = estimate(r.key, r.value, headers)
            if size > limit:
                refused.append(Rejected(r, too_large_reason(size, limit)))
                continue
            batch.append(key=r.key, value=r.value, timestamp=r.timestamp, headers=headers)
            chunk.append(r)
        if chunk:
            batch.close()
            futures.append((chunk, await producer.send_batch(batch, topic, partition=partition)))
        return futures

    def _error(self, failures: list[tuple[str, int, int, BaseException]], total: int) -> SinkError:
        lost = sum(n for _, _, n, _ in failures)
        topic, p, _, exc = failures[0]
        if isinstance(exc, TypeError):
            reason = f"{exc}; Kafka records need bytes keys and values"
        else:
            reason = describe(exc)
        return unacknowledged(lost, total, topic, p, reason, self.url,
                              self.settings.request_timeout_ms)

    async def stop(self) -> None:
        """Wait for batches still in flight (at most ``request_timeout_ms``), then close the producer.

        With the broker unreachable the wait is cut short after
        ``request_timeout_ms``, or by the caller's cancellation (the runtime
        bounds every close at stop): either way the connections are closed,
        and what was in flight, never acknowledged, is covered by no
        checkpoint and replayed.
        """
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await self._stop(producer)
        finally:
            self.health.unwatch(self)

    async def _stop(self, producer: Any) -> None:
        timeout = self.settings.request_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                await producer.stop()
        except TimeoutError:
            log.warning("closing the Kafka producer for %s took over request_timeout_ms=%d; "
                        "records still in flight were not acknowledged and are replayed",
                        self.url, self.settings.request_timeout_ms)
            await _close_connections(producer)
        except asyncio.CancelledError:
            # the caller's own bound ran out first (a stop): still close the connections
            await _close_connections(producer)
            raise
        except KafkaError as exc:
            log.warning("closing the Kafka producer for %s failed: %s", self.url, exc)


async def _close_connections(producer: Any) -> None:
    """Close a producer's connections without waiting for what it has in flight (at most 1 s)."""
    try:
        async with asyncio.timeout(1.0):
            await producer.client.close()
    except (TimeoutError, KafkaError, OSError) as exc:
        log.debug("closing the Kafka producer's connections failed: %s", exc)


def too_large_reason(size: int, limit: int) -> str:
    """The dead-letter reason of a record over ``max_request_size`` (both clients).

    Example:
        >>> too_large_reason(20_000, 10_000)[:40]
        'a record of 20000 bytes (key, value and '
    """
    return (f"a record of {size} bytes (key, value and headers) is larger than "
            f"max_request_size={limit}; send smaller records, or raise max_request_size "
            "in the broker URL and the topic's max.message.bytes")


def no_partition(partition: int, topic: str, partitions: int) -> SinkError:
    """The error of a record for a partition its topic does not have (both clients)."""
    return SinkError(f"partition {partition} does not exist in Kafka topic {topic!r} "
                     f"({partitions} partitions)")


def refused_reason(detail: str, topic: str, partition: int) -> str:
    """The dead-letter reason of a record Kafka refused for what it is (both clients).

    Example:
        >>> refused_reason("MESSAGE_SIZE_TOO_LARGE: too big", "out", 2)[:52]
        'Kafka refused the record (MESSAGE_SIZE_TOO_LARGE: to'
    """
    return (f"Kafka refused the record ({detail}; topic {topic!r} partition {partition}); a "
            "record over the topic's max.message.bytes must be made smaller, or the topic's "
            "limit raised")


def unacknowledged(
    lost: int, total: int, topic: str, partition: int, reason: str, url: str, timeout_ms: int
) -> SinkError:
    """The error of a write whose records Kafka did not acknowledge (both clients).

    Example:
        >>> str(unacknowledged(2, 5, "out", 0, "down", "kafka://k", 100))[:44]
        'Kafka did not acknowledge 2 of 5 records (fi'
    """
    return SinkError(
        f"Kafka did not acknowledge {lost} of {total} records (first: topic {topic!r} "
        f"partition {partition} on {url}: {reason}) after the producer's retries "
        f"(request_timeout_ms={timeout_ms}); is the broker up and does the topic accept writes?"
    )


async def _nothing_refused() -> list[Rejected] | None:
    return None


def _refusal(exc: BaseException) -> str | None:
    """The name of the broker's error if it refuses a record for what it is, else ``None``."""
    errno = getattr(exc, "errno", None)
    return REFUSED_ERRNOS.get(errno) if isinstance(errno, int) else None
