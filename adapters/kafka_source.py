"""The Kafka source: a consumer-group member that reads batches and commits done positions.

Rebalances are *eager* (aiokafka's protocol): on every rebalance all of this
member's partitions are revoked, then the new assignment (which often contains
the same partitions again) is assigned. Before aiokafka releases the revoked
partitions it awaits ``listener.on_revoked(partitions)``; the core drains and
calls ``commit`` from inside that call, which works because the member still
belongs to the old generation at that point. Until ``on_assigned`` has returned,
``fetch`` returns ``[]`` (after its timeout), so the core never sees a record of
a partition it has not been told about; nor one aiokafka handed over before a
revoke began (the new assignment reads it again from the committed offsets).

Backpressure (``pause``) holds partitions back in the source, not in the
client: ``fetch`` asks aiokafka for the other partitions only
(``getmany(*partitions)``), so what aiokafka prefetched for a held partition
stays buffered and is there at once on ``resume``. aiokafka's own ``pause``
drops a paused partition's prefetched records and fetches them again on
resume, which left the consumer waiting on the broker after every full lane
(0.55 of the hand-written loop and a peak of 161 MB at 1,000,000 events,
against 0.73 and 81 MB this way). Only when every partition has been held for
``HOLD_AT_CLIENT_AFTER`` seconds are they paused in the client, so that
``fetch`` can go on polling (a consumer that stops polling for
``max_poll_interval_ms`` leaves its group).

Records reach the core as aiokafka decoded them (``adapters.kafka_records``),
not copied once more into a ``ConsumerRecord`` each: 10-15% of a worker's
time at 1,000,000 events.

Example:
    >>> from adapters.kafka import KafkaBroker
    >>> from asyncflow.protocols import TopicSpec
    >>> broker = KafkaBroker("kafka://localhost:9092", {})
    >>> source = broker.source([TopicSpec("rides", partitions=4)], group_id="billing")
    >>> type(source).__name__
    'KafkaSource'
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
)
from aiokafka.protocol.group import JoinGroupRequest

from adapters.kafka_config import KafkaSettings, describe, start_client, stop_consumer
from adapters.kafka_health import BrokerHealth, is_connection_error
from adapters.kafka_records import hand_over_decoded_records
from asyncflow.checkpoint import CommitFailed
from asyncflow.errors import AsyncflowError, BrokerUnavailable
from asyncflow.protocols import Partition, PartitionListener, RawBatch, TopicPartition

UNKNOWN_MEMBER_ID = JoinGroupRequest.UNKNOWN_MEMBER_ID

log = logging.getLogger("asyncflow.kafka")

_FETCH_GRACE = 1.0
"""Seconds a ``getmany`` may overrun ``fetch``'s timeout before it is cut short."""
_MAX_BACKOFF = 5.0

HOLD_AT_CLIENT_AFTER = 5.0
"""Seconds every partition may be held back before they are paused in the client too."""


class KafkaSourceError(AsyncflowError):
    """Reading from Kafka failed in a way retrying cannot fix (authorization, bad offsets)."""


class KafkaSource:
    """A Kafka consumer-group member implementing ``asyncflow.protocols.Source``.

    Offsets are committed only through ``commit`` (auto-commit is off); a
    newly assigned partition starts at the group's committed offset, else at
    ``auto_offset_reset``. After a rebalance every assigned partition starts
    resumed: the core re-pauses what it still cannot take.

    Example:
        >>> source = KafkaSource(KafkaSettings.parse("kafka://localhost"), ["rides"], "g")
        >>> source.topics
        ['rides']
        >>> async def read(core: PartitionListener) -> None:  # doctest: +SKIP
        ...     await source.start(core)  # core.on_assigned([...]) follows the join
        ...     for batch in await source.fetch(0.2):
        ...         last = batch.records[-1].offset
        ...         await source.commit({batch.partition: last})  # commits last + 1
        ...     await source.stop()
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        group_id: str,
        url: str = "",
        health: BrokerHealth | None = None,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.group_id = group_id
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.health = health or BrokerHealth(self.url)
        """Where connection errors and successful calls are told (``KafkaBroker`` shares one)."""
        self._consumer: Any = None
        self._listener: PartitionListener | None = None
        self._owned: dict[KafkaTP, TopicPartition] = {}
        self._ready = asyncio.Event()
        self._stash: dict[Any, list[Any]] = {}
        self._revocations = 0
        """Revokes begun so far: what a ``getmany`` drained before one belongs to the old owner."""
        self._listener_error: BaseException | None = None
        self._failures = 0
        self.fetch_max: int | None = None
        """Records one ``fetch`` returns at most (the core sets it; ``None``: max_poll_records)."""
        self._held: set[KafkaTP] = set()  # held back by the core (full lanes): not fetched
        self._paused_in_client: set[KafkaTP] = set()  # held so long they are paused in aiokafka
        self._all_held_since: float | None = None
        self._resumed = asyncio.Event()

    async def start(self, listener: PartitionListener) -> None:
        """Connect, then join the group; raise ``BrokerUnavailable`` if the broker is unreachable.

        Joining completes in the background: ``listener.on_assigned`` reports it.
        """
        if self._consumer is not None:
            raise RuntimeError("KafkaSource.start() called twice")
        self._listener = listener
        consumer = AIOKafkaConsumer(**self.settings.consumer_args(self.group_id))
        self.health.watch(self)
        try:
            await start_client(consumer, self.url, self.settings)
        except BaseException:
            self.health.unwatch(self)
            raise
        hand_over_decoded_records(consumer)  # before any partition is assigned
        self._consumer = consumer
        consumer.subscribe(topics=self.topics, listener=_Rebalance(self))

    async def fetch(self, timeout: float) -> list[RawBatch]:
        """Records from the partitions that are assigned and not paused; ``[]`` after ``timeout``.

        Transient errors (connection loss, leader moves) are logged and retried
        with a backoff; they never escape. Errors the core must hear about
        (a failing partition listener, authorization) are raised.
        """
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("KafkaSource.fetch() while not running; call start() first")
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        if self._stash:
            data, self._stash = self._stash, {}
        else:
            wanted: list[KafkaTP] = []
            if self._held:
                self._held.intersection_update(self._owned)  # revoked ones are not held
                wanted = [tp for tp in self._owned if tp not in self._held]
                if not wanted:
                    if not await self._wait_for_resume(timeout):
                        return []
                    # resumed meanwhile (or all paused in the client: then none is fetched)
                    wanted = [tp for tp in self._owned if tp not in self._held]
            try:
                async with asyncio.timeout(timeout + _FETCH_GRACE):
                    data, drained_at = await self._getmany(wanted, timeout)
            except TimeoutError:
                return []  # a rebalance began while waiting; the next fetch waits for it
            except ConsumerStoppedError:
                return []  # stop() ran while this fetch waited
            except KafkaError as exc:
                await self._fetch_failed(exc, timeout)
                return []
            if drained_at != self._revocations:
                # taken from aiokafka's buffer before a revoke that began while this task
                # waited to run again: the partitions' next owner (this member too, if they
                # come back) reads them again from the committed offsets
                log.debug("dropping %d records fetched before the rebalance",
                          sum(len(r) for r in data.values()))
                return []
            if not self._ready.is_set():
                # a rebalance finished inside getmany but the core has not heard of it yet
                self._stash = data
                return []
        if self._failures:
            log.info("Kafka fetch recovered after %d failed attempts", self._failures)
            self._failures = 0
        owned = self._owned
        batches = []
        for tp, records in data.items():
            partition = owned.get(tp)
            if partition is not None and records:
                batches.append(RawBatch(tp.topic, partition, records))
        if batches:
            self.health.ok()
        return batches

    async def _fetch_failed(self, exc: BaseException, timeout: float) -> None:
        if isinstance(exc, KafkaError) and not (
            exc.retriable or isinstance(exc, KafkaConnectionError)
        ):
            raise KafkaSourceError(
                f"reading {', '.join(self.topics)} from {self.url} failed: "
                f"{describe(exc)} (check the topic's ACLs and the group's offsets)"
            ) from exc
        self._failures += 1
        delay = min(_MAX_BACKOFF, 0.1 * 2 ** min(self._failures, 6), max(timeout, 0.1))
        if is_connection_error(exc):
            self.health.failed(f"fetching: {describe(exc)}")  # one line per outage, not per try
            log.debug("Kafka fetch from %s failed (%s); retrying in %.1fs",
                      self.url, describe(exc), delay)
        else:
            log.warning(
                "Kafka fetch from %s failed (%s); retrying in %.1fs",
                self.url,
                describe(exc),
                delay,
            )
        await asyncio.sleep(delay)

    async def _getmany(
        self, wanted: list[KafkaTP], timeout: float
    ) -> tuple[dict[KafkaTP, list[Any]], int]:
        """aiokafka's ``getmany`` of ``wanted`` (all partitions when empty), and when it drained.

        When: the count of revokes begun at the moment the records left
        aiokafka's buffer. The fetch task resumes a turn of the event loop or
        more after that, and a revoke (even the whole rebalance) may run in
        between: those records were read for the old assignment, and aiokafka
        reads them again from the committed offsets for the new one. Handed
        to the core, they would be applied twice.

        While some partitions are held back, a ``resume`` cuts the wait short,
        so a partition let go again is read at once, not after ``timeout``
        (``getmany`` takes records out of its buffer only when it returns, so
        cancelling the wait loses none).
        """
        consumer = self._consumer
        ms = int(timeout * 1000)
        if not wanted or not self._held:
            return await self._drain(consumer, (), ms)
        self._resumed.clear()
        fetch = asyncio.ensure_future(self._drain(consumer, wanted, ms))
        resumed = asyncio.ensure_future(self._resumed.wait())
        try:
            await asyncio.wait((fetch, resumed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            resumed.cancel()
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        if fetch.cancelled():
            return {}, self._revocations
        got: tuple[dict[KafkaTP, list[Any]], int] = fetch.result()
        return got

    async def _drain(
        self, consumer: Any, wanted: Sequence[KafkaTP], ms: int
    ) -> tuple[dict[KafkaTP, list[Any]], int]:
        # getmany returns in the same step as it takes the records: the count read here is
        # the one they were taken under
        data: dict[KafkaTP, list[Any]] = await consumer.getmany(
            *wanted, timeout_ms=ms, max_records=self.fetch_max)
        return data, self._revocations

    async def _wait_for_resume(self, timeout: float) -> bool:
        """Every partition is held back: wait for a ``resume``; whether to fetch after all.

        What aiokafka prefetched stays buffered meanwhile. Held longer than
        ``HOLD_AT_CLIENT_AFTER``, the partitions are paused in the client and
        the fetch goes on (it returns nothing, but the consumer keeps polling).
        """
        now = time.monotonic()
        if self._all_held_since is None:
            self._all_held_since = now
        if now - self._all_held_since >= HOLD_AT_CLIENT_AFTER:
            newly = self._held - self._paused_in_client
            if newly:
                self._consumer.pause(*newly)
                self._paused_in_client |= newly
            return True
        self._resumed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._resumed.wait()
        except TimeoutError:
            return False
        return True

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Stop delivering records of these partitions (ignored for ones not assigned here).

        They are held back here, not paused in aiokafka (see the module docstring).
        """
        if self._consumer is None:
            return
        self._held.update(self._assigned(partitions))

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Deliver records of these partitions again (ignored for ones not assigned here)."""
        consumer = self._consumer
        if consumer is None:
            return
        tps = self._assigned(partitions)
        if not tps:
            return
        self._held.difference_update(tps)
        self._all_held_since = None
        in_client = [tp for tp in tps if tp in self._paused_in_client]
        if in_client:
            self._paused_in_client.difference_update(in_client)
            consumer.resume(*in_client)
        self._resumed.set()

    def end_offsets_now(self) -> dict[Partition, int]:
        """Per assigned partition, the offset after its last record as of the last fetch.

        No request is made: this is the high watermark each fetch response
        carries (what ``asyncflow.observe`` computes consumer lag from; a
        partition not fetched yet is left out). On the Tansu test broker it can
        trail the true end by a batch.

        Example:
            >>> KafkaSource.end_offsets_now  # doctest: +ELLIPSIS
            <function KafkaSource.end_offsets_now at ...>
        """
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[Partition, int] = {}
        for tp, partition in self._owned.items():
            high = consumer.highwater(tp)
            if high is not None:
                out[partition] = high
        return out

    def _assigned(self, partitions: Iterable[Partition]) -> list[KafkaTP]:
        assigned = self._consumer.assignment()
        out = []
        for p in partitions:
            tp = _to_kafka(p)
            if tp in assigned:
                out.append(tp)
        return out

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        """Commit, per partition, the offset after the last done record (``offset + 1``).

        Partitions no longer assigned here are skipped: their new owner replays
        from the last commit (at-least-once). A commit the group refuses
        because it rebalanced is logged, not raised: the partitions moved and
        their new owner replays from the last commit. A commit that fails for
        a reason that may pass (the broker unreachable, the coordinator
        moving) or does not finish within ``request_timeout_ms`` raises
        ``CommitFailed``: nothing of it counts as committed, and the caller
        commits the positions again later. Other errors (authorization) raise
        ``KafkaSourceError``.
        """
        consumer = self._consumer
        if consumer is None or not positions:
            return
        assigned = consumer.assignment()
        offsets: dict[KafkaTP, int] = {}
        for p, position in positions.items():
            tp = _to_kafka(p)
            if tp in assigned:
                offsets[tp] = position + 1
            else:
                log.debug("not committing %s: it is no longer assigned here", tp)
        if not offsets:
            return
        began = time.monotonic()
        timeout_ms = self.settings.request_timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning(
                "Kafka commit for group %s was refused (%s); the partitions moved and "
                "their new owner replays from the last committed offset",
                self.group_id,
                exc,
            )
            return
        except TimeoutError:
            raise CommitFailed(
                f"committing offsets of group {self.group_id} on {self.url} got no answer "
                f"within request_timeout_ms={timeout_ms}"
            ) from None
        except KafkaError as exc:
            if not (exc.retriable or isinstance(exc, KafkaTimeoutError | KafkaConnectionError)):
                raise KafkaSourceError(
                    f"committing offsets of group {self.group_id} on {self.url} failed: "
                    f"{describe(exc)}"
                ) from exc
            if is_connection_error(exc):
                self.health.failed(f"committing: {describe(exc)}")
            raise CommitFailed(
                f"committing offsets of group {self.group_id} on {self.url} failed: "
                f"{describe(exc)}"
            ) from None
        self.health.ok(since=began)

    async def committed(self, partitions: Collection[Partition]) -> dict[Partition, int | None]:
        """The offset of the last record the group's last commit covers, per partition.

        That is Kafka's committed offset minus one (``commit`` stores
        ``offset + 1``), or ``None`` where the group never committed. Works for
        any partition of the group's topics, assigned here or not, and from
        inside ``on_assigned``. Needs a started source; the broker must answer
        within ``request_timeout_ms``, else ``BrokerUnavailable``.

        Example:
            >>> async def resume_from(source: KafkaSource) -> None:  # doctest: +SKIP
            ...     await source.committed([TopicPartition("rides", 0)])
            {TopicPartition(topic='rides', partition=0): 41}
        """
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("KafkaSource.committed() while not running; call start() first")
        wanted = list(dict.fromkeys(partitions))
        if not wanted:
            return {}
        timeout_ms = self.settings.request_timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                offsets = await asyncio.gather(*(consumer.committed(_to_kafka(p)) for p in wanted))
        except TimeoutError:
            raise BrokerUnavailable(
                self.url,
                f"asking for the committed offsets of group {self.group_id} got no answer "
                f"within request_timeout_ms={timeout_ms}",
            ) from None
        except KafkaError as exc:
            if exc.retriable or isinstance(exc, KafkaConnectionError):
                raise BrokerUnavailable(
                    self.url,
                    f"asking for the committed offsets of group {self.group_id} failed: "
                    f"{describe(exc)}",
                ) from None
            raise KafkaSourceError(
                f"reading the committed offsets of group {self.group_id} on {self.url} "
                f"failed: {describe(exc)} (check the group's ACLs)"
            ) from exc
        return {
            p: None if offset is None else int(offset) - 1
            for p, offset in zip(wanted, offsets, strict=True)
        }

    async def stop(self, timeout: float | None = None) -> None:
        """Leave the group and close the connections, within ``timeout`` seconds.

        ``timeout`` defaults to ``request_timeout_ms``. A broker that does not
        answer in time cannot be told goodbye: the connections are closed
        anyway, and the group drops this member after ``session_timeout_ms``
        (a warning says so). ``on_revoked`` is *not* called: commit what is
        done before stopping. Calling it again, or before ``start``, does
        nothing.
        """
        consumer, self._consumer = self._consumer, None
        self._ready.clear()
        self._owned = {}
        self._stash = {}
        self._held.clear()
        self._paused_in_client.clear()
        if consumer is not None:
            if timeout is None:
                timeout = self.settings.request_timeout_ms / 1000
            try:
                await stop_consumer(consumer, self.url, timeout, leave_group=True)
            finally:
                self.health.unwatch(self)

    # called by _Rebalance, inside aiokafka's coordination task

    async def _revoked(self, revoked: Collection[KafkaTP]) -> None:
        self._ready.clear()
        self._revocations += 1
        self._stash = {}
        parts = [self._owned.get(tp) or _from_kafka(tp) for tp in revoked]
        try:
            if parts and self._listener is not None:
                on_lost = getattr(self._listener, "on_lost", None)
                if on_lost is not None and self._membership_lost():
                    # the group went on without this member (a session timeout): another
                    # member may own these partitions already, so nothing may be written
                    log.warning("this worker was dropped from group %s; giving up %d partitions "
                                "without a checkpoint", self.group_id, len(parts))
                    await on_lost(parts)
                else:
                    await self._listener.on_revoked(parts)
        except Exception as exc:  # noqa: BLE001 - handed to the core by the next fetch()
            self._listener_error = exc
            log.error("the partition listener failed on revoke: %s", exc)
        finally:
            self._owned = {}
            # a partition assigned again starts unheld: the core forgot its full lanes
            self._held.difference_update(revoked)
            self._paused_in_client.difference_update(revoked)
            self._all_held_since = None

    def _membership_lost(self) -> bool:
        """Whether the coordinator forgot this member (it must rejoin as a new one)."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        return coordinator is not None and coordinator.member_id == UNKNOWN_MEMBER_ID

    async def _assigned_now(self, assigned: Collection[KafkaTP]) -> None:
        if self._consumer is None:
            return  # a join that completed while stop() leaves the group: nothing to start
        self._owned = {tp: _from_kafka(tp) for tp in assigned}
        try:
            if assigned and self._listener is not None:
                await self._listener.on_assigned(list(self._owned.values()))
        except Exception as exc:  # noqa: BLE001 - handed to the core by the next fetch()
            self._listener_error = exc
            log.error("the partition listener failed on assign: %s", exc)
        finally:
            self._ready.set()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks to the source (and so to the core)."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Collection[KafkaTP]) -> None:
        await self._source._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[KafkaTP]) -> None:
        await self._source._assigned_now(assigned)


def _to_kafka(partition: Partition) -> KafkaTP:
    if isinstance(partition, KafkaTP):
        return partition
    if isinstance(partition, tuple) and len(partition) == 2:
        return KafkaTP(partition[0], partition[1])
    raise TypeError(f"not a Kafka partition: {partition!r}; use TopicPartition(topic, number)")


def _from_kafka(tp: KafkaTP) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)
