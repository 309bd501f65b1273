"""The in-process memory broker: the embedded default, and what tests run on.

Topics have partitions and offsets; consumer groups have members, an
assignment of partitions and committed offsets, so the whole checkpoint and commit
path runs as it does on Kafka, without a network. A topic can be ended
(``end``): a bounded input whose readers then report themselves exhausted.
A topic the app writes to itself has *writers* (``add_writer``): it counts as
ended only once each of them has let it go (``release_writer``), however early
someone called ``end``.

Example:
    >>> import asyncio
    >>> from asyncflow.protocols import TopicSpec
    >>> broker = MemoryBroker()
    >>> broker.create_topic("t", partitions=2)
    >>> broker.produce("t", b'{"x": 1}', key=b"a")
    (1, 0)
    >>> broker.committed("g", "t", 1) is None
    True
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

from asyncflow.errors import ConfigError, TopicMissing
from asyncflow.partition_log import (
    MemoryRecord as MemoryRecord,  # re-exported: where it lived before
)
from asyncflow.partition_log import PartitionLog
from asyncflow.protocols import (
    Partition,
    PartitionListener,
    RawBatch,
    Rejected,
    SinkRecord,
    TopicPartition,
    TopicSpec,
)

log = logging.getLogger("asyncflow.memory")


class MemoryTopic:
    """Partitions of records, an end-of-input flag and a wake-up for readers."""

    def __init__(self, name: str, partitions: int) -> None:
        self.name = name
        self.partitions: list[PartitionLog] = [PartitionLog() for _ in range(partitions)]
        self.ended = False
        self.writers: set[object] = set()
        """Who still writes to the topic (``MemoryBroker.add_writer``): it is not finished before."""
        self.read_to_end = False
        """A reader found it finished and read it all (what is written later, it never sees)."""
        self._late_warned = False
        self._rr = itertools.count()

    @property
    def finished(self) -> bool:
        """Ended, and no writer still holds it: its readers can drain it and stop."""
        return self.ended and not self.writers

    def _check_open(self) -> None:
        if self.read_to_end and self.finished and not self._late_warned:
            self._late_warned = True
            log.warning(
                "records written to topic %r after its end: readers that already finished never "
                "see them (an agent that sends to a topic must name it in sink= or in its code)",
                self.name,
            )

    def partition_for(self, key: bytes | None) -> int:
        n = len(self.partitions)
        if key is None:
            return next(self._rr) % n
        return zlib.crc32(key) % n


class _Group:
    def __init__(self) -> None:
        self.committed: dict[TopicPartition, int] = {}
        self.members: list[MemorySource] = []
        self.leaving: list[MemorySource] = []
        self.generation = 0


class MemoryBroker:
    """Topics and consumer groups held in this process.

    Example:
        >>> b = MemoryBroker()
        >>> b.create_topic("x")
        >>> sorted(b.topics)
        ['x']
    """

    def __init__(self, url: str = "memory://", options: Mapping[str, str] | None = None) -> None:
        if not url.startswith("memory://"):
            raise ConfigError(f"not a memory broker URL: {url!r} (use memory://)")
        self.url = url
        self.options = dict(options or {})
        self.options.update(parse_qsl(urlsplit(url).query))
        self.session_timeout = float(self.options.get("session_timeout_ms", 3000)) / 1000
        self.max_record_bytes = _max_record_bytes(self.options.get("max_record_bytes"))
        """Records larger than this (key plus value) are refused, as a Kafka broker would."""
        self.topics: dict[str, MemoryTopic] = {}
        self._groups: dict[str, _Group] = {}
        self._data: asyncio.Event | None = None
        self._data_loop: asyncio.AbstractEventLoop | None = None

    # -- topics ---------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic (no-op if it exists)."""
        if name not in self.topics:
            self.topics[name] = MemoryTopic(name, partitions)

    def topic(self, name: str) -> MemoryTopic:
        """The topic ``name``; ``TopicMissing`` if it was never created."""
        t = self.topics.get(name)
        if t is None:
            raise TopicMissing(name, self.url)
        return t

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        timestamp: int | None = None,
        partition: int | None = None,
    ) -> tuple[int, int]:
        """Append a record; returns (partition, offset).

        Example:
            >>> b = MemoryBroker(); b.create_topic("t")
            >>> b.produce("t", b"1"), b.produce("t", b"2")
            ((0, 0), (0, 1))
        """
        t = self.topics.get(topic)
        if t is None:
            self.create_topic(topic)
            t = self.topics[topic]
        if t.read_to_end:
            t._check_open()
        p = t.partition_for(key) if partition is None else partition
        log = t.partitions[p]
        ts = timestamp if timestamp is not None else time.time_ns() // 1_000_000
        if type(value) is bytes:
            # a right-sized copy: orjson's output keeps a large allocation behind small bytes
            value = bytes(memoryview(value))
        if type(key) is bytes:
            key = bytes(memoryview(key))
        offset = log.add(key, value, ts, headers)
        self._notify()
        return p, offset

    def produce_records(self, records: Sequence[SinkRecord]) -> None:
        """Append sink records (encoded by the app's codecs: right-sized bytes) in one go.

        Example:
            >>> b = MemoryBroker(); b.create_topic("t", 2)
            >>> b.produce_records([SinkRecord(b"k", b"1", topic="t"), SinkRecord(None, b"2", topic="t")])
            >>> sorted(r.value for r in b.records("t"))
            [b'1', b'2']
        """
        now = time.time_ns() // 1_000_000
        topics = self.topics
        last_name: str | None = None
        t: MemoryTopic | None = None
        for r in records:
            name = r.topic
            if name is None:
                raise ConfigError("a record for the memory broker needs a topic")
            if name != last_name or t is None:
                t = topics.get(name)
                if t is None:
                    self.create_topic(name)
                    t = topics[name]
                last_name = name
                if t.read_to_end:
                    t._check_open()
            p = r.partition
            log = t.partitions[t.partition_for(r.key) if p is None else p]
            ts = r.timestamp
            log.add(r.key, r.value, now if ts is None else ts, r.headers)
        self._notify()

    def end(self, topic: str) -> None:
        """Mark ``topic`` as a bounded input that has ended."""
        self.topic(topic).ended = True
        self._notify()

    def add_writer(self, topic: str, writer: object) -> None:
        """``writer`` (a worker) will write to ``topic``: it has not finished until released.

        Example:
            >>> b = MemoryBroker(); b.create_topic("mid")
            >>> b.add_writer("mid", "worker-1"); b.end("mid")
            >>> b.topic("mid").finished
            False
            >>> b.release_writer("mid", "worker-1", end=True)
            >>> b.topic("mid").finished
            True
        """
        self.topic(topic).writers.add(writer)

    def release_writer(self, topic: str, writer: object, *, end: bool) -> None:
        """``writer`` writes no more to ``topic``; ``end``: its part of the input is complete.

        A worker that stops before the end of its input releases without
        ``end``: the topic then finishes only if someone else ends it.
        """
        t = self.topic(topic)
        t.writers.discard(writer)
        if end:
            t.ended = True
        self._notify()

    def records(self, topic: str) -> list[MemoryRecord]:
        """Every record of a topic, partition by partition (for tests)."""
        return [r for part in self.topic(topic).partitions for r in part]

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        """The group's committed offset (next to read) of a partition."""
        g = self._groups.get(group)
        return None if g is None else g.committed.get(TopicPartition(topic, partition))

    def _notify(self) -> None:
        if self._data is not None:
            self._data.set()

    async def _wait_data(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self._data is None or self._data_loop is not loop:
            # a broker outlives an event loop (a test, a benchmark, then another run)
            self._data, self._data_loop = asyncio.Event(), loop
        self._data.clear()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation of a reader whose wait ends at the same moment
            async with asyncio.timeout(timeout):
                await self._data.wait()
        except TimeoutError:
            pass

    # -- the Broker protocol ------------------------------------------------------------
    def source(self, topics: Sequence[TopicSpec], group_id: str) -> MemorySource:
        """A consumer of ``topics`` in group ``group_id`` (the group shares the partitions)."""
        return MemorySource(self, [t.name for t in topics], group_id)

    def sink(self) -> MemorySink:
        """A producer to this broker's topics."""
        return MemorySink(self)

    async def ensure_topics(self, topics: Sequence[TopicSpec]) -> None:
        """Create the missing ``topics`` that may be created; ``TopicMissing`` for the others."""
        for spec in sorted(topics, key=lambda s: s.partitions_like is not None):
            if spec.name not in self.topics:
                if not spec.create:
                    raise TopicMissing(spec.name, self.url)
                like = self.topics.get(spec.partitions_like or "")
                self.create_topic(spec.name, len(like.partitions) if like else spec.partitions)

    async def list_topics(self) -> dict[str, int]:
        """Every topic's name and partition count."""
        return {name: len(t.partitions) for name, t in self.topics.items()}

    # -- changelogs (the ChangelogBroker protocol) ---------------------------------------
    async def ensure_changelogs(self, topics: Sequence[TopicSpec]) -> None:
        """Create missing changelog topics (a memory topic keeps every record: no compaction)."""
        for spec in topics:
            self.create_topic(spec.name, spec.partitions)

    async def append(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int:
        """Append records to one partition in order; returns the offset of the last.

        Example:
            >>> import asyncio
            >>> b = MemoryBroker(); b.create_topic("log", 2)
            >>> asyncio.run(b.append("log", 1, [SinkRecord(b"k", b"v"), SinkRecord(b"k", None)]))
            1
        """
        t = self.topics.get(topic)
        if t is None:
            self.create_topic(topic)
            t = self.topics[topic]
        log = t.partitions[partition]
        now = time.time_ns() // 1_000_000
        add = log.add
        for r in records:  # changelog records come right-sized from the state codec
            add(r.key, r.value, now, r.headers)
        self._notify()
        return len(log) - 1

    async def read_changelog(
        self, topic: str, partition: int, start: int, *, timeout: float, max_records: int = 10_000
    ) -> Sequence[MemoryRecord]:
        """Records of one partition from offset ``start`` on (``[]`` after ``timeout`` if none)."""
        log = self.topic(topic).partitions[partition]
        if start >= len(log) and timeout > 0:
            await self._wait_data(timeout)
        return log[start : start + max_records]

    async def close(self) -> None:
        """Nothing to release: the topics stay readable after an app stops."""
        pass

    def _group(self, group_id: str) -> _Group:
        g = self._groups.get(group_id)
        if g is None:
            g = self._groups[group_id] = _Group()
        return g


class MemorySource:
    """A member of a consumer group on the memory broker (satisfies ``Source``)."""

    def __init__(
        self, broker: MemoryBroker, topics: list[str], group_id: str, fetch_max: int = 10_000
    ) -> None:
        self.broker = broker
        self.topics = topics
        self.group_id = group_id
        self.fetch_max = fetch_max
        self._listener: PartitionListener | None = None
        self._assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[Partition] = set()
        self._generation = -1
        self._stopped = False
        self._revoking = False
        self._waiting = False
        self._assigning = False
        self._seen = time.monotonic()

    def _assignment(self) -> list[TopicPartition]:
        group = self.broker._group(self.group_id)
        members = group.members
        me = members.index(self)
        all_tps = [
            TopicPartition(t, p)
            for t in self.topics
            for p in range(len(self.broker.topic(t).partitions))
        ]
        return [tp for i, tp in enumerate(all_tps) if i % len(members) == me]

    async def start(self, listener: PartitionListener) -> None:
        for t in self.topics:
            self.broker.topic(t)
        self._listener = listener
        group = self.broker._group(self.group_id)
        now = time.monotonic()
        dead = [m for m in group.members if now - m._seen > self.broker.session_timeout]
        for m in dead:  # members that stopped fetching without leaving (crashed) are evicted
            group.members.remove(m)
        group.members.append(self)
        group.generation += 1
        self._seen = now
        await self._rebalance()

    async def _rebalance(self) -> None:
        group = self.broker._group(self.group_id)
        self._generation = group.generation
        new = self._assignment() if not self._stopped else []
        revoked = [tp for tp in self._assigned if tp not in new]
        added = [tp for tp in new if tp not in self._assigned]
        assert self._listener is not None
        if revoked:
            self._revoking = True
            try:
                await self._listener.on_revoked(revoked)
            finally:
                self._revoking = False
            for tp in revoked:
                self._positions.pop(tp, None)
                self._paused.discard(tp)
        self._assigned = new
        if added:
            self._waiting = True
            try:
                await self._wait_released(group, added)
            finally:
                self._waiting = False
        for tp in added:
            self._positions[tp] = group.committed.get(tp, 0)
        if added:
            self._assigning = True  # restoring state may take a while: not a dead member
            try:
                await self._listener.on_assigned(added)
            finally:
                self._assigning = False
                self._seen = time.monotonic()

    async def _wait_released(self, group: _Group, added: list[TopicPartition]) -> None:
        """Like Kafka's rebalance: take partitions only once their last owner let them go.

        Their owner gives them up at its next fetch (after its revoke handler
        checkpointed them); one that stopped fetching for a session timeout is
        evicted, as a crashed Kafka member would be.
        """
        wanted = set(added)
        while True:
            holders = [
                m for m in (*group.members, *group.leaving)
                if m is not self and wanted & set(m._assigned)
            ]
            if not holders:
                return
            now = time.monotonic()
            for m in holders:
                alive = m._revoking or m._waiting or m._assigning
                if now - m._seen > max(self.broker.session_timeout, 0.5) and not alive:
                    if m in group.members:
                        group.members.remove(m)
                    m._assigned = []
            await asyncio.sleep(0.005)

    async def fetch(self, timeout: float) -> list[RawBatch]:
        self._seen = time.monotonic()
        group = self.broker._group(self.group_id)
        if self._generation != group.generation:
            await self._rebalance()
        batches = self._read()
        if not batches and timeout > 0 and not self.exhausted:
            await self.broker._wait_data(timeout)
            self._seen = time.monotonic()
            if self._generation != group.generation:
                return []  # rebalance at the next fetch, before reading anything more
            batches = self._read()
        return batches

    def _read(self) -> list[RawBatch]:
        out: list[RawBatch] = []
        for tp in self._assigned:
            if tp in self._paused:
                continue
            log = self.broker.topics[tp.topic].partitions[tp.partition]
            pos = self._positions[tp]
            if pos < len(log):
                chunk, columns = log.read(pos, pos + self.fetch_max)
                self._positions[tp] = pos + len(chunk)
                out.append(RawBatch(tp.topic, tp, chunk, columns))
        return out

    @property
    def exhausted(self) -> bool:
        """Every subscribed topic has finished and everything assigned has been read."""
        return all(self.topic_exhausted(t) for t in self.topics)

    def topic_exhausted(self, topic: str) -> bool:
        """``topic`` has finished (``MemoryTopic.finished``) and its assigned partitions are read.

        Example:
            >>> import asyncio
            >>> b = MemoryBroker(); b.create_topic("a"); b.create_topic("b")
            >>> src = b.source([TopicSpec("a"), TopicSpec("b")], "g")
            >>> b.end("a")
            >>> src.topic_exhausted("a"), src.topic_exhausted("b")
            (True, False)
        """
        t = self.broker.topics[topic]
        if not t.finished:
            return False
        done = all(
            self._positions[tp] >= len(t.partitions[tp.partition])
            for tp in self._assigned
            if tp.topic == topic
        )
        if done:
            t.read_to_end = True
        return done

    def pause(self, partitions: Iterable[Partition]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Iterable[Partition]) -> None:
        self._paused.difference_update(partitions)
        self.broker._notify()

    async def committed(self, partitions: Collection[Partition]) -> dict[Partition, int | None]:
        """Per partition, the last offset the group's commit covers (``None``: none yet)."""
        committed = self.broker._group(self.group_id).committed
        out: dict[Partition, int | None] = {}
        for p in partitions:
            c = committed.get(p) if isinstance(p, TopicPartition) else None
            out[p] = None if c is None else c - 1
        return out

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        committed = self.broker._group(self.group_id).committed
        for p, offset in positions.items():
            if isinstance(p, TopicPartition) and p in self._positions:
                committed[p] = offset + 1

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        group = self.broker._group(self.group_id)
        if self in group.members:
            group.members.remove(self)
            group.generation += 1
        group.leaving.append(self)  # others wait for its partitions until its revoke is done
        try:
            if self._listener is not None and self._assigned:
                self._revoking = True
                await self._listener.on_revoked(list(self._assigned))
        finally:
            self._revoking = False
            self._assigned = []
            group.leaving.remove(self)

    @property
    def assigned(self) -> Collection[TopicPartition]:
        return tuple(self._assigned)


class MemorySink:
    """Writes topic records into the memory broker (satisfies ``Sink``).

    With the broker option ``max_record_bytes`` set, a record whose key and
    value together are larger is refused (``Rejected``), as Kafka refuses one
    over ``message.max.bytes``; the others of the batch are written.

    Example:
        >>> import asyncio
        >>> broker = MemoryBroker("memory://?max_record_bytes=4")
        >>> broker.create_topic("t")
        >>> sink = broker.sink()
        >>> [r.reason for r in asyncio.run(sink.write([SinkRecord(None, b"ok", "t"),
        ...                                            SinkRecord(None, b"too big", "t")]))]
        ['a record of 7 bytes is larger than the broker allows (max_record_bytes=4)']
    """

    name = "memory-producer"
    max_batch = 2000

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def start(self) -> None:
        pass

    async def write(self, records: Sequence[SinkRecord]) -> list[Rejected] | None:
        """Append ``records`` to their topics; return the ones over ``max_record_bytes``."""
        limit = self.broker.max_record_bytes
        if limit is None:
            self.broker.produce_records(records)
            return None
        refused = []
        kept = []
        for r in records:
            size = len(r.key or b"") + len(r.value or b"")
            if size > limit:
                refused.append(Rejected(r, f"a record of {size} bytes is larger than the broker "
                                           f"allows (max_record_bytes={limit})"))
            else:
                kept.append(r)
        self.broker.produce_records(kept)
        return refused

    async def stop(self) -> None:
        pass


def _max_record_bytes(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"memory broker option max_record_bytes={raw!r}: must be a whole number "
                          "of bytes, at least 1 (leave it out for no limit)")
    return value


def memory_broker(url: str, options: Mapping[str, str]) -> MemoryBroker:
    """The factory registered for ``memory://``."""
    return MemoryBroker(url, options)

