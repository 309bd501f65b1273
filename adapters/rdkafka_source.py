"""The librdkafka source: a consumer-group member whose polling runs in its own thread.

One thread per source calls ``consume`` (never the event loop), and every
other call on the consumer too (commits, committed offsets, pause, resume):
librdkafka's synchronous group requests made from another thread while one
is inside ``consume`` never return (confluent-kafka 2.16), so the loop
queues them to the polling thread, which runs them between polls (and
inside rebalance callbacks while it waits for the core) and hands back the
result. It hands each poll's records to the loop grouped by partition, one
``call_soon_threadsafe`` per poll. At most ``_HANDOVER`` polls wait for the
core: beyond that the thread waits for the core to take them (still running
the calls the loop queues; librdkafka heartbeats in its own threads).
Pausing the partitions instead would make librdkafka drop what it prefetched
and fetch it again. A paused partition delivers nothing: its records polled
before librdkafka's pause took hold, or still waiting for the core when it
paused, are held back until it resumes.

Rebalances are eager (``range,roundrobin``): librdkafka calls the revoke
callback in the polling thread, which hands the core's ``on_revoked`` (drain
and checkpoint) to the loop and waits for it before librdkafka releases the
partitions; ``on_assigned`` (restore) likewise runs before the first record
of a new partition is fetched; every partition assigned is resumed
(librdkafka would keep one paused across the rebalance, and the core forgot
the full lanes it was paused for). A member the group dropped (a session
timeout) gets ``on_lost`` instead: nothing may be committed for those
partitions any more.

The thread also measures the longest gap between its polls: a worker that
was paused (SIGSTOP, a VM freeze) for longer than the session timeout may
have been replaced in its group, and ``stalled_for`` lets the exactly-once
commit refuse to commit on such a member's behalf (see
``adapters.rdkafka_transactions``).

Example:
    >>> from adapters.kafka_config import KafkaSettings
    >>> source = RdKafkaSource(KafkaSettings.parse("kafka://k?client=rdkafka"), ["rides"], "g")
    >>> source.topics, source.group_id
    (['rides'], 'g')
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTP

from adapters.kafka_config import KafkaSettings
from adapters.kafka_health import BrokerHealth
from adapters.kafka_source import KafkaSourceError
from adapters.rdkafka_bridge import (
    CONNECTION_CODES,
    error_callback,
    refuse_fast,
    soon,
    wait_for_loop,
)
from adapters.rdkafka_config import consumer_config, describe_error
from asyncflow.checkpoint import CommitFailed, TransactionAborted
from asyncflow.errors import BrokerUnavailable
from asyncflow.protocols import Partition, PartitionListener, RawBatch, Record, TopicPartition

log = logging.getLogger("asyncflow.kafka")

_POLL = 0.05
"""Seconds one ``consume`` call of the polling thread waits for records."""
_HANDOVER = 4
"""Polls waiting for the core before the polling thread pauses the partitions."""
_REFUSED_COMMIT = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError._NO_OFFSET,
})


class RdKafkaSource:
    """A librdkafka consumer-group member implementing ``asyncflow.protocols.Source``.

    Same contract as ``adapters.kafka_source.KafkaSource``: manual commits of
    ``offset + 1``, committed offsets readable from ``on_assigned``, every
    assigned partition resumed after a rebalance. ``read_committed`` reads
    only records of committed transactions (exactly-once).

    Example:
        >>> async def read(core: PartitionListener) -> None:  # doctest: +SKIP
        ...     await source.start(core)
        ...     for batch in await source.fetch(0.2):
        ...         await source.commit({batch.partition: batch.records[-1].offset})
        ...     await source.stop()
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        group_id: str,
        url: str = "",
        health: BrokerHealth | None = None,
        *,
        read_committed: bool = False,
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.group_id = group_id
        self.url = url or "kafka://" + ",".join(settings.bootstrap_servers)
        self.health = health or BrokerHealth(self.url)
        self.read_committed = read_committed
        self.fetch_max: int | None = None
        """Records one ``fetch`` returns at most (the core sets it; ``None``: max_poll_records)."""
        self.consumer: Any = None
        """The ``confluent_kafka.Consumer`` (``None`` until started)."""
        self._listener: PartitionListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopping = False
        self._lock = threading.Lock()
        self._ready: list[list[RawBatch]] = []
        self._arrived = asyncio.Event()
        self._taken = threading.Event()
        self._paused: set[tuple[str, int]] = set()
        self._held: dict[tuple[str, int], list[RawBatch]] = {}
        """Polled records of paused partitions, handed out again at ``resume`` (under ``_lock``)."""
        self._owned: dict[tuple[str, int], TopicPartition] = {}
        self._error: BaseException | None = None
        self._last_poll = time.monotonic()
        self._max_gap = 0.0
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._highs: dict[tuple[str, int], int] = {}

    def _run_calls(self) -> None:
        """Run the calls the loop queued (in the polling thread)."""
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the polling thread (between two polls) and await its result."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((fn, future))
        return await asyncio.wrap_future(future)

    def _later(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in the polling thread; nobody waits for it."""
        self._calls.put((fn, concurrent.futures.Future()))

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, listener: PartitionListener) -> None:
        """Create the consumer, check the cluster answers, subscribe; joining goes on in the thread."""
        if self.consumer is not None:
            raise RuntimeError("RdKafkaSource.start() called twice")
        self._listener = listener
        loop = self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        await refuse_fast(self.settings, self.url)
        conf = consumer_config(self.settings, self.group_id, read_committed=self.read_committed)
        conf["error_cb"] = error_callback(loop, self.health, f"consumer of {self.group_id}")
        consumer = Consumer(conf)
        try:
            await asyncio.to_thread(
                consumer.list_topics, timeout=self.settings.connect_timeout_ms / 1000
            )
        except KafkaException as exc:
            await asyncio.to_thread(consumer.close)
            raise BrokerUnavailable(self.url, describe_error(exc)) from None
        self.consumer = consumer
        consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._running = True
        self._last_poll = time.monotonic()
        self._thread = threading.Thread(
            target=self._poll_loop, name=f"rdkafka-consumer-{self.group_id}", daemon=True
        )
        self._thread.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop polling, leave the group and close, within ``timeout`` s (``request_timeout_ms``).

        ``on_revoked`` is not called (commit what is done before stopping).
        """
        consumer, self.consumer = self.consumer, None
        if consumer is None:
            return
        self._stopping = True
        self._running = False
        self._taken.set()
        if timeout is None:
            timeout = self.settings.request_timeout_ms / 1000
        thread = self._thread
        try:
            async with asyncio.timeout(timeout):
                if thread is not None:
                    await asyncio.to_thread(thread.join)
                self._run_calls_after_stop(consumer)
                await asyncio.to_thread(consumer.close)
        except TimeoutError:
            log.warning("closing the Kafka consumer for %s took over %.1fs; the group drops "
                        "this member after session_timeout_ms", self.url, timeout)
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the Kafka consumer for %s failed: %s", self.url,
                        describe_error(exc))
        finally:
            self.health.unwatch(self)

    def _run_calls_after_stop(self, consumer: Any) -> None:
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            future.cancel()

    # -- the polling thread ---------------------------------------------------------------------
    def _poll_loop(self) -> None:
        try:
            self._poll()
        except BaseException as exc:  # the thread must not die silently
            log.exception("the Kafka polling thread failed")
            self._error = exc
            if self._loop is not None:
                soon(self._loop, self._arrived.set)

    def _poll(self) -> None:
        loop = self._loop
        assert loop is not None
        while self._running:
            now = time.monotonic()
            gap = now - self._last_poll
            if gap > self._max_gap:
                self._max_gap = gap
            self._last_poll = now
            try:
                self._run_calls()
                with self._lock:
                    full = len(self._ready) >= _HANDOVER
                if full:  # the core has enough to do: wait for it (calls are still served)
                    self._taken.wait(_POLL)
                    self._taken.clear()
                    continue
                messages = self.consumer.consume(
                    num_messages=self.fetch_max or self.settings.max_poll_records, timeout=_POLL
                )
            except RuntimeError:  # closed under us (stop)
                return
            except KafkaException as exc:
                self._fail(exc)
                continue
            if messages:
                self._hand_over(messages, loop)

    def _hand_over(self, messages: list[Any], loop: asyncio.AbstractEventLoop) -> None:
        grouped: dict[tuple[str, int], list[Record]] = {}
        owned = self._owned
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() in CONNECTION_CODES or err.retriable():
                    soon(loop, self.health.failed, f"fetching: {err.name()}: {err.str()}")
                else:
                    self._fail(KafkaException(err))
                continue
            key = (m.topic(), m.partition())
            recs = grouped.get(key)
            if recs is None:
                recs = grouped[key] = []
            ts = m.timestamp()
            recs.append(Record(m.offset(), m.key(), m.value(), ts[1] if ts[0] else None,
                               m.headers() or ()))
        consumer = self.consumer
        highs = self._highs
        for key in grouped:
            try:
                _, high = consumer.get_watermark_offsets(KafkaTP(*key), cached=True)
            except (KafkaException, RuntimeError):
                continue
            highs[key] = high
        batches = []
        with self._lock:
            paused, held = self._paused, self._held
            for k, recs in grouped.items():
                batch = RawBatch(k[0], owned.get(k) or TopicPartition(*k), recs)
                if k in paused:  # polled before the pause took hold: kept for the resume
                    held.setdefault(k, []).append(batch)
                else:
                    batches.append(batch)
            if batches:
                self._ready.append(batches)
        if batches:
            soon(loop, self._arrived.set)

    def _fail(self, exc: KafkaException) -> None:
        err = exc.args[0] if exc.args else None
        code = err.code() if isinstance(err, KafkaError) else None
        if code in CONNECTION_CODES or (isinstance(err, KafkaError) and err.retriable()):
            log.debug("Kafka fetch from %s failed (%s); librdkafka retries",
                      self.url, describe_error(exc))
            return
        self._error = KafkaSourceError(
            f"reading {', '.join(self.topics)} from {self.url} failed: {describe_error(exc)} "
            "(check the topic's ACLs and the group's offsets)"
        )
        if self._loop is not None:
            soon(self._loop, self._arrived.set)

    # -- rebalance callbacks (in the polling thread) -------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[KafkaTP]) -> None:
        if self._stopping or self._loop is None:
            return
        parts = {(tp.topic, tp.partition): TopicPartition(tp.topic, tp.partition)
                 for tp in partitions}
        self._owned = parts
        with self._lock:
            self._paused.clear()
        if parts and self._listener is not None:
            self._call(self._listener.on_assigned(list(parts.values())), "assign")
        # librdkafka keeps a partition paused across a rebalance, but the core forgot why it
        # paused one it gave up (its full lanes): a partition assigned (again) starts unpaused,
        # or it would never be read again. Queued now, the resume runs once the callback
        # returned and librdkafka assigned them, before any pause for new reads.
        self.resume(parts.values())

    def _on_revoke(self, consumer: Any, partitions: list[KafkaTP]) -> None:
        if self._stopping or self._loop is None:
            self._owned = {}
            return
        parts = self._drop(partitions)
        if parts and self._listener is not None:
            self._call(self._listener.on_revoked(parts), "revoke")
        self._owned = {}

    def _on_lost(self, consumer: Any, partitions: list[KafkaTP]) -> None:
        if self._stopping or self._loop is None:
            self._owned = {}
            return
        parts = self._drop(partitions)
        listener = self._listener
        on_lost = getattr(listener, "on_lost", None)
        if parts and listener is not None:
            log.warning("this worker was dropped from group %s; giving up %d partitions "
                        "without a checkpoint", self.group_id, len(parts))
            self._call(on_lost(parts) if on_lost is not None else listener.on_revoked(parts),
                       "lost")
        self._owned = {}

    def _drop(self, partitions: list[KafkaTP]) -> list[TopicPartition]:
        """Forget polls not handed to the core yet for these partitions; their core names."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        with self._lock:
            for k in gone:
                self._held.pop(k, None)
            self._take_ready(gone)
        return [self._owned.get(k) or TopicPartition(*k) for k in sorted(gone)]

    def _take_ready(self, keys: Collection[tuple[str, int]]) -> list[RawBatch]:
        """Take the batches of these partitions out of the polls waiting (``_lock`` held)."""
        taken: list[RawBatch] = []
        ready = []
        for poll in self._ready:
            kept = []
            for b in poll:
                if (b.topic, _number(b.partition)) in keys:
                    taken.append(b)
                else:
                    kept.append(b)
            if kept:
                ready.append(kept)
        self._ready = ready
        return taken

    def _call(self, coro: Any, what: str) -> None:
        assert self._loop is not None
        try:
            wait_for_loop(self._loop, coro, serve=self._run_calls)
        except Exception as exc:  # noqa: BLE001 - handed to the core by the next fetch()
            if not isinstance(exc, TransactionAborted):  # its one line is the worker's error
                log.error("the partition listener failed on %s: %s", what, exc)
            self._error = exc
            soon(self._loop, self._arrived.set)

    # -- the Source protocol ------------------------------------------------------------------
    async def fetch(self, timeout: float) -> list[RawBatch]:
        """Records polled since the last call; ``[]`` after ``timeout`` if none came."""
        if self.consumer is None:
            raise RuntimeError("RdKafkaSource.fetch() while not running; call start() first")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if not self._ready:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return []
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        with self._lock:
            polls, self._ready = self._ready, []
        self._taken.set()
        if not polls:
            return []
        self.health.ok()
        if len(polls) == 1:
            return polls[0]
        return [b for poll in polls for b in poll]

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Stop delivering records of these partitions (ignored for ones not assigned here)."""
        tps = self._assigned(partitions)
        if tps:
            keys = {(tp.topic, tp.partition) for tp in tps}
            with self._lock:
                self._paused.update(keys)
                for b in self._take_ready(keys):  # what waits for the core waits for the resume
                    self._held.setdefault((b.topic, _number(b.partition)), []).append(b)
            consumer = self.consumer
            self._later(lambda: consumer.pause(tps))

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Deliver records of these partitions again (ignored for ones not assigned here)."""
        tps = self._assigned(partitions)
        if tps:
            keys = sorted({(tp.topic, tp.partition) for tp in tps})
            with self._lock:
                self._paused.difference_update(keys)
                back = [b for k in keys for b in self._held.pop(k, ())]
                if back:  # before anything polled after the resume: nothing was, while paused
                    self._ready.append(back)
            if back and self._loop is not None:
                soon(self._loop, self._arrived.set)
            consumer = self.consumer
            self._later(lambda: consumer.resume(tps))

    def _assigned(self, partitions: Iterable[Partition]) -> list[KafkaTP]:
        if self.consumer is None:
            return []
        owned = self._owned
        out = []
        for p in partitions:
            topic, number = _split(p)
            if (topic, number) in owned:
                out.append(KafkaTP(topic, number))
        return out

    def end_offsets_now(self) -> dict[Partition, int]:
        """Per assigned partition, the high watermark librdkafka last saw (no request)."""
        consumer = self.consumer
        if consumer is None:
            return {}
        out: dict[Partition, int] = {}
        for key, p in list(self._owned.items()):
            high = self._highs.get(key)
            if high is not None and high >= 0:
                out[p] = high
        return out

    async def group_metadata(self) -> Any:
        """The consumer's group metadata (generation, member): what a transaction commits with."""
        consumer = self.consumer
        return await self._in_thread(consumer.consumer_group_metadata)

    def stalled_for(self) -> float:
        """The longest gap (s) between two polls since the last call, or since the last poll now.

        More than ``session_timeout_ms``: the group may have replaced this member.
        """
        gap = max(self._max_gap, time.monotonic() - self._last_poll)
        self._max_gap = 0.0
        return gap

    def owns(self, partitions: Iterable[Partition]) -> bool:
        """Whether every one of ``partitions`` is assigned here now."""
        owned = self._owned
        return all(_split(p) in owned for p in partitions)

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        """Commit ``offset + 1`` per partition still assigned here (see ``KafkaSource.commit``)."""
        consumer = self.consumer
        if consumer is None or not positions:
            return
        offsets = []
        for p, position in positions.items():
            topic, number = _split(p)
            if (topic, number) in self._owned:
                offsets.append(KafkaTP(topic, number, position + 1))
        if not offsets:
            return
        began = time.monotonic()
        timeout_ms = self.settings.request_timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                await self._in_thread(
                    lambda: consumer.commit(offsets=offsets, asynchronous=False)
                )
        except TimeoutError:
            raise CommitFailed(
                f"committing offsets of group {self.group_id} on {self.url} got no answer "
                f"within request_timeout_ms={timeout_ms}"
            ) from None
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if isinstance(err, KafkaError) else None
            if code in _REFUSED_COMMIT:
                log.warning("Kafka commit for group %s was refused (%s); the partitions moved "
                            "and their new owner replays from the last committed offset",
                            self.group_id, describe_error(exc))
                return
            if code in CONNECTION_CODES or (isinstance(err, KafkaError) and err.retriable()):
                if code in CONNECTION_CODES:
                    self.health.failed(f"committing: {describe_error(exc)}")
                raise CommitFailed(
                    f"committing offsets of group {self.group_id} on {self.url} failed: "
                    f"{describe_error(exc)}"
                ) from None
            raise KafkaSourceError(
                f"committing offsets of group {self.group_id} on {self.url} failed: "
                f"{describe_error(exc)}"
            ) from exc
        self.health.ok(since=began)

    async def committed(self, partitions: Collection[Partition]) -> dict[Partition, int | None]:
        """The last offset the group's last commit covers per partition (``None``: never)."""
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("RdKafkaSource.committed() while not running; call start() first")
        wanted = list(dict.fromkeys(partitions))
        if not wanted:
            return {}
        timeout = self.settings.request_timeout_ms / 1000
        tps = [KafkaTP(*_split(p)) for p in wanted]
        try:
            got = await self._in_thread(lambda: consumer.committed(tps, timeout=timeout))
        except KafkaException as exc:
            raise BrokerUnavailable(
                self.url,
                f"asking for the committed offsets of group {self.group_id} failed: "
                f"{describe_error(exc)}",
            ) from None
        by_key = {(tp.topic, tp.partition): tp.offset for tp in got}
        out: dict[Partition, int | None] = {}
        for p in wanted:
            offset = by_key.get(_split(p))
            out[p] = None if offset is None or offset < 0 else int(offset) - 1
        return out


def _split(p: Partition) -> tuple[str, int]:
    if isinstance(p, tuple) and len(p) == 2:
        return str(p[0]), int(p[1])
    raise TypeError(f"not a Kafka partition: {p!r}; use TopicPartition(topic, number)")


def _number(p: Partition) -> int:
    return _split(p)[1]
