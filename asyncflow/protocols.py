"""The seams between the core and the connectors: sources, sinks and brokers.

Adapters implement these small protocols; the core never imports an adapter.
A *source* hands out raw batches per partition and commits positions; a *sink*
writes batches and returns only once they are durable; a *broker* (memory,
Kafka) is both, found by the scheme of its URL.

Example:
    >>> from asyncflow.protocols import SinkRecord
    >>> SinkRecord(key="k", value={"n": 1}).key
    'k'
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec

Partition = Hashable
"""Identifies one ordered partition of a source: ``TopicPartition`` for Kafka, a shard for Kinesis."""


class TopicPartition(NamedTuple):
    """A partition of a named topic (Kafka, memory broker).

    Example:
        >>> TopicPartition("rides", 3)
        TopicPartition(topic='rides', partition=3)
    """

    topic: str
    partition: int


class RawRecord(Protocol):
    """One undecoded record as a source read it.

    ``offset`` orders records within a partition (Kafka offset, Kinesis sequence
    number as an int, a counter for SSE). ``timestamp`` is epoch milliseconds
    (or ``None``). aiokafka's ``ConsumerRecord`` satisfies this protocol as is,
    as do the decoded records its fetcher builds it from.
    """

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(slots=True)
class Record:
    """A plain raw record, for sources that do not have their own record type.

    Example:
        >>> Record(offset=0, key=b"a", value=b"{}").offset
        0
    """

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None
    headers: Sequence[tuple[str, bytes]] = ()


@dataclass(slots=True, frozen=True)
class RawColumns:
    """A batch's records by column: ``offsets[i]``, ``keys[i]``, ... are record ``i``'s.

    ``headers`` is ``None`` when no record has any. A source that keeps its
    records by column (the memory broker) hands them so: the core then reads
    no record object of the batch.

    Example:
        >>> cols = RawColumns(range(7, 9), [b"a", b"b"], [b"1", b"2"], [None, None], None)
        >>> list(zip(cols.offsets, cols.values))
        [(7, b'1'), (8, b'2')]
    """

    offsets: Sequence[int]
    keys: Sequence[bytes | None]
    values: Sequence[bytes | None]
    timestamps: Sequence[int | None]
    headers: Sequence[Sequence[tuple[str, bytes]]] | None

    @classmethod
    def of(cls, records: Sequence[RawRecord]) -> RawColumns:
        """The columns of record objects (what the core does when a source hands none).

        Example:
            >>> RawColumns.of([Record(0, b"k", b"1", 5)])
            RawColumns(offsets=[0], keys=[b'k'], values=[b'1'], timestamps=[5], headers=None)
        """
        headers = [r.headers for r in records]
        return cls(
            [r.offset for r in records],
            [r.key for r in records],
            [r.value for r in records],
            [r.timestamp for r in records],
            headers if any(headers) else None,
        )


@dataclass(slots=True)
class RawBatch:
    """Records read from one partition, in offset order.

    ``columns``, when a source sets it, holds the same records by column
    (``RawColumns``); ``records`` must then still give them one by one (the
    core reads them so only on its slow paths: poison, restore, tracing).

    Example:
        >>> b = RawBatch("sensors", TopicPartition("sensors", 0), [Record(0, None, b"1")])
        >>> len(b.records), b.columns
        (1, None)
    """

    topic: str
    partition: Partition
    records: Sequence[RawRecord]
    columns: RawColumns | None = None


class PartitionListener(Protocol):
    """What the core does when a source's partitions change owner.

    ``on_revoked`` returns only after the core has drained the partitions and
    committed what it finished: the source may release them afterwards. A
    source that learns it lost partitions without a rebalance (its member was
    dropped from the group) calls ``on_lost`` instead, if the listener has it:
    the core then writes and commits nothing more for them.
    """

    async def on_assigned(self, partitions: Collection[Partition]) -> None: ...

    async def on_revoked(self, partitions: Collection[Partition]) -> None: ...


@runtime_checkable
class Source(Protocol):
    """A partitioned, replayable input.

    ``commit`` receives, per partition, the offset of the last record whose
    processing is complete (everything at or before it is done); the adapter
    translates it (Kafka commits ``offset + 1``). Offsets must keep their
    meaning across runs (durable state compares them with what it applied); a
    source that numbers records afresh each run sets the attribute
    ``offsets_survive_restarts = False``, and one that does not resume where
    the last run stopped (nothing committed survives it) sets
    ``positions_survive_restarts = False``.
    """

    async def start(self, listener: PartitionListener) -> None:
        """Connect and join; raise ``BrokerUnavailable`` with a clear message when unreachable."""
        ...

    async def fetch(self, timeout: float) -> list[RawBatch]:
        """Return batches from partitions that are not paused; ``[]`` after ``timeout`` seconds."""
        ...

    def pause(self, partitions: Iterable[Partition]) -> None: ...

    def resume(self, partitions: Iterable[Partition]) -> None: ...

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        """Commit ``positions``; raise ``CommitFailed`` when trying again later may succeed.

        A commit the source could not make (the broker unreachable, no answer
        in time) raises ``asyncflow.errors.CommitFailed``: the checkpointer
        keeps those positions uncommitted and commits them at its next
        checkpoint. A commit refused because the partitions moved to another
        member returns normally (their new owner replays from the last commit).
        """
        ...

    async def stop(self) -> None: ...


@runtime_checkable
class CommittedPositions(Protocol):
    """A source that can say what its group last committed (durable state uses it on assignment).

    ``committed`` returns, per partition, the offset of the last record covered
    by the group's last commit (what ``Source.commit`` was given), or ``None``
    when nothing was ever committed for it.
    """

    async def committed(self, partitions: Collection[Partition]) -> dict[Partition, int | None]: ...


class SinkRecord(msgspec.Struct, gc=False):
    """One output record handed to a sink.

    For broker topics ``topic`` names the destination and ``key``/``value`` are
    already encoded bytes; other sinks receive Python values. One is made per
    output record, so it is a C struct (``msgspec.Struct``: a third of a
    dataclass's construction time) that the garbage collector does not track;
    it must not be part of a reference cycle.

    Example:
        >>> SinkRecord(key=b"k", value=b"v", topic="out").topic
        'out'
    """

    key: Any
    value: Any
    topic: str | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int | None = None
    partition: int | None = None


@dataclass(slots=True, frozen=True)
class Rejected:
    """A record a sink refuses for what it is, with the sink's reason.

    What a write refuses for good (too large, a value the service cannot
    store, a key it cannot take), as opposed to what fails for a while (the
    service is down, throttling). The core sends it to the dead-letter output
    with ``reason`` and goes on; retrying it could never succeed.

    Example:
        >>> r = Rejected(SinkRecord("k", {"v": float("nan")}), "NaN is not a DynamoDB number")
        >>> r.reason
        'NaN is not a DynamoDB number'
    """

    record: SinkRecord
    reason: str


@runtime_checkable
class Sink(Protocol):
    """A destination that writes batches durably.

    ``write`` returns only when every record of the batch is durable, except
    the ones it returns as ``Rejected``: records the sink refuses for what they
    are, which the core sends to the dead-letter output with the sink's reason
    (returning ``None`` or ``[]`` means all were written). What fails for a
    transient reason is retried by the sink, which raises ``SinkError`` after
    bounded retries: the worker then stops without committing what the batch
    covers. Optional attributes tune the core's batching: ``max_batch``
    (records per write, default 500) and ``linger`` (seconds to wait for a
    fuller batch, default 0: write as soon as the previous write is done, see
    ``asyncflow.writer``). A sink whose client keeps order across requests may
    also have ``async submit(records)``: hand the records over in order and
    return an awaitable of what ``write`` would return; the writer then sends
    the next batch before the previous one is acknowledged.

    Example (a sink that keeps the values in a list and refuses negative ones):
        >>> import asyncio, asyncflow as af
        >>> from asyncflow.testing import TestRun
        >>> class Totals:
        ...     name = "totals"
        ...     max_batch = 100
        ...     def __init__(self): self.rows = []
        ...     async def start(self): ...
        ...     async def write(self, records):
        ...         self.rows += [r.value for r in records if r.value >= 0]
        ...         return [Rejected(r, "negative") for r in records if r.value < 0]
        ...     async def stop(self): ...
        >>> app = af.App("a")
        >>> totals = Totals()
        >>> out = app.sink(totals)
        >>> @app.agent(app.topic("in"))
        ... async def copy(stream):
        ...     async for v in stream:
        ...         await out.send(None, v)
        >>> async def main():
        ...     async with TestRun(app) as run:
        ...         await run.send_many("in", [1, -2, 3])
        ...         await run.finish()
        >>> asyncio.run(main()); totals.rows, isinstance(totals, Sink)
        ([1, 3], True)
    """

    name: str

    async def start(self) -> None:
        """Connect; called once before the first ``write``."""
        ...

    async def write(self, records: Sequence[SinkRecord]) -> Sequence[Rejected] | None:
        """Make ``records`` durable; return the ones refused for what they are."""
        ...

    async def stop(self) -> None:
        """Disconnect; called once after the last ``write``."""
        ...


@dataclass(slots=True, frozen=True)
class TopicSpec:
    """A topic as an app declares it to the broker.

    ``partitions_like`` names another topic whose partition count a missing
    topic is created with (a repartition topic takes its source's count);
    ``partitions`` is the count when that topic does not exist either.

    Example:
        >>> TopicSpec("rides", partitions=4).partitions
        4
        >>> TopicSpec("app-by-user-repartition", partitions_like="clicks").partitions_like
        'clicks'
    """

    name: str
    partitions: int = 1
    create: bool = True
    config: Mapping[str, str] = field(default_factory=dict)
    partitions_like: str | None = None


@runtime_checkable
class Broker(Protocol):
    """A message broker the app reads topics from and writes topics to."""

    url: str

    def source(self, topics: Sequence[TopicSpec], group_id: str) -> Source: ...

    def sink(self) -> Sink:
        """A sink writing ``SinkRecord`` s whose ``topic`` is set, key and value as bytes."""
        ...

    async def ensure_topics(self, topics: Sequence[TopicSpec]) -> None:
        """Create missing topics that allow it; raise ``TopicMissing`` for the others."""
        ...

    async def list_topics(self) -> dict[str, int]:
        """Topic name to partition count."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ChangelogBroker(Protocol):
    """What durable state needs from a broker: changelog topics to append to and read back.

    A changelog topic holds one table's writes per source partition (its
    partition number is the source partition's). ``append`` writes records in
    order to one partition and returns only once they are durable, with the
    offset of the last one; ``read_changelog`` returns the records from offset
    ``start`` on, at most ``max_records``, or ``[]`` when none arrived within
    ``timeout`` seconds. Readers never join a consumer group and never commit.
    ``ensure_changelogs`` creates missing changelog topics (compacted where the
    broker supports it) with the given partition counts.
    """

    async def ensure_changelogs(self, topics: Sequence[TopicSpec]) -> None: ...

    async def append(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int: ...

    async def read_changelog(
        self, topic: str, partition: int, start: int, *, timeout: float, max_records: int = 10_000
    ) -> Sequence[RawRecord]: ...


@runtime_checkable
class Transactions(Protocol):
    """Exactly-once: what a worker writes to its broker between two checkpoints is one transaction.

    The broker's sink, its changelog appends and its dead letters write into
    the open transaction (it begins with the first write). ``commit`` adds
    the input ``positions`` (per partition the last offset done, as
    ``Source.commit`` takes them) on behalf of ``source``'s consumer group and
    commits, atomically: either all of it becomes visible to
    ``read_committed`` readers and the offsets count as committed, or none of
    it does. A commit that cannot be made aborts the transaction and raises
    (``asyncflow.checkpoint.Fenced`` when another worker owns the partitions
    now, ``TransactionAborted`` otherwise); the worker then stops and a restart
    replays from the committed offsets. ``pending`` says whether anything was
    written since the last commit.
    """

    @property
    def pending(self) -> bool: ...

    async def commit(self, source: Source, positions: Mapping[Partition, int]) -> None: ...

    async def abort(self, reason: str) -> None: ...


@runtime_checkable
class TransactionalBroker(Protocol):
    """A broker that can run an app exactly-once (``processing_guarantee="exactly_once"``).

    ``exactly_once(app_id)`` turns it to transactions before any source or
    sink is made: its sink and changelog appends write into the returned
    ``Transactions``, its sources and changelog reads see committed
    transactions only. ``append_now`` writes to a changelog partition outside
    any transaction, visible at once (a restore's end-of-log sentinel).
    """

    def exactly_once(self, app_id: str) -> Transactions: ...

    async def append_now(self, topic: str, partition: int, records: Sequence[SinkRecord]) -> int: ...


class BrokerFactory(Protocol):
    """Builds a broker from its URL and options (an entry point in ``asyncflow.brokers``)."""

    def __call__(self, url: str, options: Mapping[str, str]) -> Broker: ...
