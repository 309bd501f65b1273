"""Exactly-once through librdkafka: one transaction per checkpoint, fenced when replaced.

The worker has one transactional producer (``transactional_id``). Its first
write after a commit begins a transaction (``begin_transaction`` is local:
no request); the sink's outputs, the dead letters and the changelog records
of the checkpoint go into it. ``commit`` then, in order:

1. refuses (aborts, raises ``Fenced``) if this process was frozen for longer
   than ``session_timeout_ms`` since the last commit, or if a partition whose
   offsets it would commit is no longer assigned here: the group may have
   given the partitions to another worker, which replays them;
2. ``send_offsets_to_transaction`` with the consumer's group metadata (its
   generation and member id), so a broker that fences by generation
   (KIP-447) refuses a zombie's offsets;
3. ``commit_transaction``, retried while librdkafka says a retry may succeed,
   within ``request_timeout_ms``.

Any other failure aborts the transaction and raises ``TransactionAborted``;
``PRODUCER_FENCED`` and the other fencing errors raise ``Fenced``. Both are
one line, and both stop the worker: the aborted records are never seen by
``read_committed`` readers, and a restart replays from the committed
offsets, restoring state from the changelog's committed records.

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> from adapters.rdkafka_producer import RdProducer
    >>> s = KafkaSettings.parse("kafka://k?client=rdkafka")
    >>> t = KafkaTransactions(RdProducer(s, "kafka://k", transactional_id="app-1"), s)
    >>> t.pending
    False
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTP

from adapters.kafka_config import KafkaSettings
from adapters.rdkafka_config import describe_error
from adapters.rdkafka_producer import RdProducer
from asyncflow.checkpoint import Fenced, TransactionAborted
from asyncflow.metrics import Metrics
from asyncflow.protocols import Partition, Source

log = logging.getLogger("asyncflow.kafka")

FENCING_CODES = frozenset({
    KafkaError.PRODUCER_FENCED, KafkaError._FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.TRANSACTION_COORDINATOR_FENCED, KafkaError.FENCED_INSTANCE_ID,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
})
"""Errors that mean another worker has taken over (a newer producer, a newer group generation)."""


class KafkaTransactions:
    """The worker's transactions (``asyncflow.protocols.Transactions``) on one producer."""

    def __init__(
        self, producer: RdProducer, settings: KafkaSettings, metrics: Metrics | None = None
    ) -> None:
        self.producer = producer
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.open = False
        self._idle = asyncio.Event()
        self._idle.set()
        producer.before_send = self.before_send
        self.committed = 0
        """Transactions committed by this worker."""
        self.failure: Exception | None = None
        """Why the last commit failed (then the worker stops; nothing more is written)."""

    @property
    def pending(self) -> bool:
        """Whether a transaction is open (something was written since the last commit)."""
        return self.open

    @property
    def timeout(self) -> float:
        """Seconds the coordinator keeps a silent transaction open (``transaction_timeout_ms``)."""
        return self.settings.transaction_timeout_ms / 1000

    @property
    def transactional_id(self) -> str:
        return self.producer.transactional_id or ""

    async def before_send(self) -> None:
        """Wait while a commit or an abort is under way, then make sure a transaction is open.

        After a failed commit every write raises that commit's error: nothing more
        goes out on this producer.
        """
        while not self._idle.is_set():
            await self._idle.wait()
        if self.failure is not None:
            raise self.failure
        self.begin()

    def begin(self) -> None:
        """Begin a transaction if none is open (local to librdkafka: no request)."""
        if self.open:
            return
        try:
            self.producer.producer.begin_transaction()
        except KafkaException as exc:
            raise self._fenced_or_aborted(exc, "beginning a transaction") from None
        self.open = True

    async def commit(self, source: Source, positions: Mapping[Partition, int]) -> None:
        """Commit the open transaction with ``positions`` (see the module docstring)."""
        producer = await self.producer.start()
        timeout = self.settings.request_timeout_ms / 1000
        stalled = self.producer.stalled_for()
        session = self.settings.session_timeout_ms / 1000
        group = getattr(source, "group_id", "?")
        if stalled > session:
            raise await self._fail(Fenced(
                f"fenced: this worker (transactional id {self.transactional_id!r}) was frozen "
                f"for {stalled:.1f}s, longer than session_timeout_ms={self.settings.session_timeout_ms}, "
                f"so group {group} may have given its partitions to another worker: its "
                "transaction is aborted, nothing of it is committed, and it stops"
            ))
        owns = getattr(source, "owns", None)
        if positions and owns is not None and not owns(positions):
            raise await self._fail(Fenced(
                f"fenced: partitions of this worker (transactional id {self.transactional_id!r}) "
                f"were assigned to another member of group {group}: its transaction is aborted, "
                "nothing of it is committed, and it stops"
            ))
        if not positions and not self.open:
            return
        self._idle.clear()  # sends wait from here until the commit is over
        try:
            while self.producer.queuing:
                self.producer.queued.clear()
                await self.producer.queued.wait()
            await self._commit(producer, source, positions, timeout)
        finally:
            self._idle.set()

    async def _commit(
        self, producer: Any, source: Source, positions: Mapping[Partition, int], timeout: float
    ) -> None:
        self.begin()
        began = time.monotonic()
        try:
            if positions:
                offsets = [KafkaTP(p[0], p[1], o + 1)  # type: ignore[index]
                           for p, o in positions.items()]
                metadata = await source.group_metadata()  # type: ignore[attr-defined]
                await asyncio.to_thread(
                    producer.send_offsets_to_transaction, offsets, metadata, timeout
                )
            deadline = began + timeout
            while True:
                try:
                    await asyncio.to_thread(producer.commit_transaction, timeout)
                    break
                except KafkaException as exc:
                    err = exc.args[0]
                    if err.retriable() and not err.txn_requires_abort() \
                            and time.monotonic() < deadline:
                        log.debug("committing the transaction: %s; retrying", describe_error(exc))
                        continue
                    raise
        except KafkaException as exc:
            error = self._fenced_or_aborted(exc, "committing the checkpoint's transaction")
            raise await self._fail(error) from None
        self.open = False
        self.committed += 1
        self.metrics.incr("transactions")
        self.metrics.histogram("transaction_commit_seconds").observe(time.monotonic() - began)

    async def _fail(self, error: Exception) -> Exception:
        """Abort, and make every later write raise ``error``; returns it (to raise)."""
        if self.failure is None:
            self.failure = error
        await self.abort(str(error))
        return error

    async def abort(self, reason: str) -> None:
        """Abort the open transaction (its records are never seen by ``read_committed`` readers).

        Writes wait meanwhile; a failed abort is logged (librdkafka's own state
        then says what the next call may do).
        """
        if not self.open:
            return
        producer = self.producer.producer
        if producer is None:
            self.open = False
            return
        was_idle = self._idle.is_set()
        self._idle.clear()
        try:
            while self.producer.queuing:
                self.producer.queued.clear()
                await self.producer.queued.wait()
            self.metrics.incr("transactions_aborted")
            try:
                await asyncio.to_thread(
                    producer.abort_transaction, self.settings.request_timeout_ms / 1000
                )
            except KafkaException as exc:
                log.debug("aborting the transaction (%s) failed: %s", reason, describe_error(exc))
            self.open = False
        finally:
            if was_idle:
                self._idle.set()

    def _fenced_or_aborted(self, exc: KafkaException, doing: str) -> Exception:
        err: Any = exc.args[0] if exc.args else None
        code = err.code() if isinstance(err, KafkaError) else None
        if code in FENCING_CODES or (isinstance(err, KafkaError) and err.fatal()):
            return Fenced(
                f"fenced: another worker took over from this one (transactional id "
                f"{self.transactional_id!r}) while it was {doing} ({describe_error(exc)}): its "
                "transaction is aborted, nothing of it is committed, and it stops"
            )
        return TransactionAborted(
            f"{doing} failed ({describe_error(exc)}): the transaction is aborted and the worker "
            "stops; a restart replays from the committed offsets"
        )
