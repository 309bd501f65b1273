"""One librdkafka producer, its delivery-report thread, and writes awaited on the loop.

``RdProducer.send(records)`` queues records with librdkafka (``produce`` only
copies them into its queue) and returns a future that the delivery-report
thread resolves, with one ``call_soon_threadsafe`` per write once every
record is acknowledged or failed. The sink, the changelog and exactly-once
transactions share this class; a transactional producer is the same with a
``transactional_id`` (``init_transactions`` runs at start).

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> p = RdProducer(KafkaSettings.parse("kafka://k?client=rdkafka"), "kafka://k")
    >>> p.transactional_id is None
    True
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from adapters.kafka_config import KafkaSettings
from adapters.kafka_health import BrokerHealth
from adapters.rdkafka_bridge import CONNECTION_CODES, error_callback, refuse_fast, soon
from adapters.rdkafka_config import describe_error, producer_config
from asyncflow.errors import BrokerUnavailable, ConfigError, SinkError
from asyncflow.protocols import SinkRecord

log = logging.getLogger("asyncflow.kafka")

REFUSED_CODES = {
    KafkaError.MSG_SIZE_TOO_LARGE: "MESSAGE_SIZE_TOO_LARGE",
    KafkaError.INVALID_MSG: "CORRUPT_MESSAGE",
    KafkaError.INVALID_RECORD: "INVALID_RECORD",
}
"""Broker errors that refuse a record for what it is (as ``kafka_sink.REFUSED_ERRNOS``)."""


@dataclass(slots=True)
class Failure:
    """One record librdkafka could not deliver: where it was going and why."""

    record: SinkRecord
    code: int
    reason: str
    refused: bool


@dataclass(slots=True, eq=False)
class _Write:
    """The delivery reports of one ``send``: resolved on the loop when the last one came."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Failure]]
    pending: int
    failures: list[Failure] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_offset: int = -1

    def report(self, err: Any, msg: Any) -> None:
        if err is None:
            offset = msg.offset()
            if offset is not None and offset > self.last_offset:
                self.last_offset = offset
        else:
            code = err.code()
            self.failures.append(Failure(
                SinkRecord(msg.key(), msg.value(), msg.topic(), msg.headers() or (),
                           None, msg.partition()),
                code, f"{err.name()}: {err.str()}", code in REFUSED_CODES,
            ))
        with self.lock:
            self.pending -= 1
            done = self.pending == 0
        if done:
            soon(self.loop, _resolve, self.future, self.failures)


def _resolve(future: asyncio.Future[list[Failure]], failures: list[Failure]) -> None:
    if not future.done():
        future.set_result(failures)


class RdProducer:
    """A ``confluent_kafka.Producer`` bridged to asyncio (see the module docstring)."""

    def __init__(
        self,
        settings: KafkaSettings,
        url: str,
        health: BrokerHealth | None = None,
        *,
        transactional_id: str | None = None,
        what: str = "producer",
        acks_all: bool = False,
    ) -> None:
        self.settings = settings
        self.url = url
        self.health = health or BrokerHealth(url)
        self.transactional_id = transactional_id
        self.what = what
        self.acks_all = acks_all
        """``acks=all`` whatever the ``acks`` option says (changelogs)."""
        self.producer: Any = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._start_lock: asyncio.Lock | None = None
        self.before_send: Any = None
        """Awaited before records are queued (exactly-once: waits out a commit, begins a transaction)."""
        self.queuing = 0
        """Sends queuing records now (a transaction's commit waits until none is)."""
        self.queued = asyncio.Event()
        self._last_poll = 0.0
        self._max_gap = 0.0

    async def start(self) -> Any:
        """Create the producer (and ``init_transactions``); ``BrokerUnavailable`` if unreachable."""
        if self.producer is not None:
            return self.producer
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.producer is not None:
                return self.producer
            loop = asyncio.get_running_loop()
            await refuse_fast(self.settings, self.url)
            conf = producer_config(self.settings, transactional_id=self.transactional_id)
            conf["error_cb"] = error_callback(loop, self.health, self.what)
            if self.acks_all:
                conf["acks"] = -1
            try:
                producer = Producer(conf)
            except KafkaException as exc:
                raise ConfigError(
                    f"librdkafka refused the {self.what}'s settings for {self.url}: "
                    f"{describe_error(exc)}"
                ) from None
            timeout = self.settings.connect_timeout_ms / 1000
            try:
                await asyncio.to_thread(producer.list_topics, timeout=timeout)
                if self.transactional_id is not None:
                    await asyncio.to_thread(
                        producer.init_transactions, max(timeout, self.settings.request_timeout_ms
                                                        / 1000)
                    )
            except KafkaException as exc:
                raise BrokerUnavailable(self.url, describe_error(exc)) from None
            self.producer = producer
            self._running = True
            self._thread = threading.Thread(target=self._serve, name=f"rdkafka-{self.what}",
                                            daemon=True)
            self._thread.start()
            self.health.watch(self)
        return producer

    def _serve(self) -> None:
        producer = self.producer
        self._last_poll = time.monotonic()
        while self._running:
            now = time.monotonic()
            gap = now - self._last_poll
            if gap > self._max_gap:
                self._max_gap = gap
            self._last_poll = now
            try:
                producer.poll(0.05)
            except RuntimeError:
                return
            except KafkaException as exc:  # an error callback raised; already logged there
                log.debug("delivery-report poll: %s", describe_error(exc))

    def stalled_for(self) -> float:
        """The longest gap (s) between two delivery-report polls since the last call, or now.

        This thread never waits for the core, so a long gap means the whole
        process was frozen (SIGSTOP, a paused VM) or starved: longer than
        ``session_timeout_ms`` and the group may have replaced this worker.
        """
        gap = max(self._max_gap, time.monotonic() - self._last_poll) if self._last_poll else 0.0
        self._max_gap = 0.0
        return gap

    async def send(self, records: Sequence[SinkRecord], *, topic: str | None = None,
                   partition: int | None = None) -> list[Failure]:
        """Queue ``records`` and wait for their delivery reports; the ones that failed (see ``deliver``)."""
        failures, _ = await self.deliver(records, topic=topic, partition=partition)
        return failures

    async def queue(self, records: Sequence[SinkRecord]) -> list[Failure]:
        """Queue ``records`` without waiting for their delivery: the ones refused at once.

        For a transactional producer: ``commit_transaction`` waits for every
        record and fails (the transaction aborts) if one was not delivered.
        """
        producer = await self.start()
        if self.before_send is not None:
            await self.before_send()
        self.queuing += 1
        try:
            failures, _ = await self._deliver(producer, records, None, None, wait=False)
            return failures
        finally:
            self.queuing -= 1
            if not self.queuing:
                self.queued.set()

    async def deliver(self, records: Sequence[SinkRecord], *, topic: str | None = None,
                      partition: int | None = None) -> tuple[list[Failure], int]:
        """Queue ``records``, wait for their delivery reports: the failures, the last offset.

        ``topic``/``partition`` override the records' own. A record
        librdkafka refuses at once (larger than ``max_request_size``) is a
        refused ``Failure`` too. ``SinkError`` for records that are not bytes.
        """
        producer = await self.start()
        if self.before_send is not None:
            await self.before_send()
        self.queuing += 1
        try:
            return await self._deliver(producer, records, topic, partition)
        finally:
            self.queuing -= 1
            if not self.queuing:
                self.queued.set()

    async def _deliver(self, producer: Any, records: Sequence[SinkRecord], topic: str | None,
                       partition: int | None, wait: bool = True) -> tuple[list[Failure], int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Failure]] = loop.create_future()
        write = _Write(loop, future, len(records) + 1)
        report = write.report if wait else None
        produce = producer.produce
        immediate: list[Failure] = []
        for r in records:
            t = topic or r.topic
            if t is None:
                raise SinkError("a Kafka sink record has no topic; set SinkRecord.topic")
            p = partition if partition is not None else r.partition
            headers = r.headers
            if headers and headers.__class__ is not list:
                headers = list(headers)
            while True:
                try:
                    if headers:
                        produce(t, r.value, r.key, -1 if p is None else p, report,
                                timestamp=r.timestamp or 0, headers=headers)
                    else:
                        produce(t, r.value, r.key, -1 if p is None else p, report,
                                r.timestamp or 0)
                    break
                except BufferError:  # librdkafka's queue is full: let deliveries drain it
                    await asyncio.sleep(0.005)
                except KafkaException as exc:
                    err = exc.args[0]
                    immediate.append(Failure(r, err.code(), describe_error(exc),
                                             err.code() in REFUSED_CODES))
                    if wait:
                        _count_down(write)
                    break
                except TypeError as exc:
                    raise SinkError(
                        f"Kafka records need bytes keys and values ({exc}); encode them with "
                        "the topic's codec before writing"
                    ) from None
        if not wait:
            return immediate, -1
        _count_down(write)  # the extra one: every record is queued
        failures = await future
        return immediate + failures, write.last_offset

    async def stop(self) -> None:
        """Deliver what is queued (within ``request_timeout_ms``), then let the producer go."""
        producer, self.producer = self.producer, None
        if producer is None:
            return
        timeout = self.settings.request_timeout_ms / 1000
        try:
            left = await asyncio.to_thread(producer.flush, timeout)
            if left:
                log.warning("closing the Kafka %s for %s: %d records were not acknowledged "
                            "within request_timeout_ms and are replayed", self.what, self.url,
                            left)
        finally:
            self._running = False
            thread = self._thread
            if thread is not None:
                await asyncio.to_thread(thread.join, 1.0)
            self.health.unwatch(self)


def _count_down(write: _Write) -> None:
    with write.lock:
        write.pending -= 1
        done = write.pending == 0
    if done:
        soon(write.loop, _resolve, write.future, write.failures)


def is_connection_failure(failure: Failure) -> bool:
    """Whether a delivery failed because the cluster could not be reached."""
    return failure.code in CONNECTION_CODES or failure.code == KafkaError._MSG_TIMED_OUT
