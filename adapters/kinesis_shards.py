"""Shard lineage bookkeeping for the Kinesis source (no I/O, testable with plain dicts).

A ``ShardPlan`` knows the stream's shards (from ``ListShards``), the stored
checkpoints and what this worker has done with each shard, and answers two
questions: which shards may be read now (all their parents are checkpointed
at ``SHARD_END``, by this worker or another, so per-key order holds across a
reshard), and from where. ``read_to_end`` says when a ``GetRecords`` answer
ends a shard.

Example:
    >>> plan = ShardPlan("TRIM_HORIZON")
    >>> plan.update([
    ...     ShardInfo("s0", (), "1", "9"),           # a closed parent
    ...     ShardInfo("s1", ("s0",), "10", None),    # its child
    ... ])
    >>> plan.ready()
    ['s0']
    >>> plan.mark_reading("s0"); plan.mark_delivered("s0"); plan.ready()
    []
    >>> plan.mark_finished("s0"); plan.ready()
    ['s1']
    >>> plan.position("s1").kind
    'TRIM_HORIZON'
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

SHARD_END = "SHARD_END"
"""The checkpoint of a shard that was read to its end and fully processed (as in the KCL)."""

INITIAL_POSITIONS = ("TRIM_HORIZON", "LATEST", "AT_TIMESTAMP")
"""Where a shard without a checkpoint starts."""


class Shard(NamedTuple):
    """The partition id of a Kinesis shard.

    Example:
        >>> Shard("clicks", "shardId-000000000000")
        Shard(stream='clicks', shard_id='shardId-000000000000')
    """

    stream: str
    shard_id: str


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What ``ListShards`` says about one shard.

    Example:
        >>> ShardInfo.from_api({"ShardId": "s1", "ParentShardId": "s0",
        ...     "SequenceNumberRange": {"StartingSequenceNumber": "5"}}).parents
        ('s0',)
    """

    shard_id: str
    parents: tuple[str, ...]
    starting_sequence: str | None
    ending_sequence: str | None

    @classmethod
    def from_api(cls, shard: Mapping[str, Any]) -> ShardInfo:
        """Build from one element of ``ListShards``' ``Shards``."""
        parents = tuple(
            p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p
        )
        rng = shard.get("SequenceNumberRange", {})
        return cls(
            shard_id=str(shard["ShardId"]),
            parents=parents,
            starting_sequence=rng.get("StartingSequenceNumber"),
            ending_sequence=rng.get("EndingSequenceNumber"),
        )

    @property
    def closed(self) -> bool:
        """The shard was split or merged: it has an end."""
        return self.ending_sequence is not None


class Position(NamedTuple):
    """Arguments of ``GetShardIterator`` for one shard.

    Example:
        >>> Position("AFTER_SEQUENCE_NUMBER", sequence="42").kwargs()
        {'ShardIteratorType': 'AFTER_SEQUENCE_NUMBER', 'StartingSequenceNumber': '42'}
    """

    kind: str
    sequence: str | None = None
    timestamp: datetime | None = None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``get_shard_iterator``."""
        out: dict[str, Any] = {"ShardIteratorType": self.kind}
        if self.sequence is not None:
            out["StartingSequenceNumber"] = self.sequence
        if self.timestamp is not None:
            out["Timestamp"] = self.timestamp
        return out


class Status(enum.Enum):
    """Where this worker is with a shard."""

    NEW = "new"
    READING = "reading"
    DELIVERED = "delivered"  # read to the end and every batch handed to the core
    FINISHED = "finished"  # SHARD_END checkpointed (or skipped: nothing to read)


class ShardPlan:
    """Which shards to read next and from where, following parent-to-child lineage.

    ``initial`` is the position of shards with no checkpoint and no parent that
    this worker reads: ``TRIM_HORIZON``, ``LATEST`` or ``AT_TIMESTAMP``. With
    ``LATEST`` closed shards without a checkpoint are skipped (they get no new
    records). Children of a parent that was read start at ``TRIM_HORIZON`` (or
    at the timestamp), so nothing written after the reshard is missed.

    Example:
        >>> plan = ShardPlan("LATEST")
        >>> plan.update([ShardInfo("s0", (), "1", "9"), ShardInfo("s1", ("s0",), "10", None)])
        >>> plan.ready(), plan.position("s1").kind
        (['s1'], 'LATEST')
    """

    def __init__(self, initial: str, at_timestamp: datetime | None = None) -> None:
        if initial not in INITIAL_POSITIONS:
            raise ValueError(f"iterator must be one of {INITIAL_POSITIONS}, got {initial!r}")
        if (initial == "AT_TIMESTAMP") != (at_timestamp is not None):
            raise ValueError("at_timestamp is needed with iterator='AT_TIMESTAMP' (and only then)")
        self.initial = initial
        self.at_timestamp = at_timestamp
        self.shards: dict[str, ShardInfo] = {}
        self.checkpoints: dict[str, str] = {}
        self.status: dict[str, Status] = {}
        self._skipped: set[str] = set()

    def update(self, listing: Iterable[ShardInfo]) -> None:
        """Merge a fresh ``ListShards`` answer (new shards, newly closed ones)."""
        for info in listing:
            self.shards[info.shard_id] = info
            self.status.setdefault(info.shard_id, Status.NEW)

    def set_checkpoints(self, checkpoints: Mapping[str, str]) -> None:
        """Load stored checkpoints (sequence numbers or ``SHARD_END``)."""
        self.checkpoints.update(checkpoints)

    def info(self, shard_id: str) -> ShardInfo:
        """What ``ListShards`` last said about ``shard_id``."""
        return self.shards[shard_id]

    def _finished(self, shard_id: str) -> bool:
        status = self.status.get(shard_id)
        if status is Status.FINISHED or self.checkpoints.get(shard_id) == SHARD_END:
            return True
        info = self.shards.get(shard_id)
        if info is None:  # trimmed away (older than the retention period)
            return True
        if (
            status is Status.NEW
            and self.initial == "LATEST"
            and info.closed
            and shard_id not in self.checkpoints
            and all(self._finished(p) for p in info.parents)
        ):
            self._skipped.add(shard_id)
            return True
        return False

    def _released(self, shard_id: str) -> bool:
        # only a parent checkpointed at SHARD_END releases its children: read to its end
        # here is not enough, since its lease may still move to a worker that reads it again
        return self._finished(shard_id)

    def ready(self) -> list[str]:
        """Shards not being read here whose parents are all checkpointed at ``SHARD_END``."""
        out = []
        for shard_id, info in sorted(self.shards.items()):
            if self.status[shard_id] is not Status.NEW or self._finished(shard_id):
                continue
            if all(self._released(p) for p in info.parents):
                out.append(shard_id)
        return out

    def position(self, shard_id: str) -> Position:
        """Where to start reading ``shard_id``."""
        checkpoint = self.checkpoints.get(shard_id)
        if checkpoint is not None and checkpoint != SHARD_END:
            return Position("AFTER_SEQUENCE_NUMBER", sequence=checkpoint)
        info = self.shards[shard_id]
        parent_read = any(p in self.shards and p not in self._skipped for p in info.parents)
        if self.initial == "AT_TIMESTAMP":
            return Position("AT_TIMESTAMP", timestamp=self.at_timestamp)
        if self.initial == "LATEST" and not parent_read:
            return Position("LATEST")
        return Position("TRIM_HORIZON")

    def mark_reading(self, shard_id: str) -> None:
        """A reader was started for ``shard_id``."""
        self.status[shard_id] = Status.READING

    def mark_delivered(self, shard_id: str) -> None:
        """``shard_id`` was read to its end and all its batches were handed out."""
        if self.status.get(shard_id) is not Status.FINISHED:
            self.status[shard_id] = Status.DELIVERED

    def mark_released(self, shard_id: str) -> None:
        """This worker no longer reads ``shard_id`` (its lease was lost): it may be taken again."""
        if self.status.get(shard_id) is not Status.FINISHED:
            self.status[shard_id] = Status.NEW

    def mark_finished(self, shard_id: str) -> None:
        """``SHARD_END`` was checkpointed for ``shard_id``."""
        self.status[shard_id] = Status.FINISHED
        self.checkpoints[shard_id] = SHARD_END

    def children(self, shard_id: str) -> list[str]:
        """Known shards that have ``shard_id`` as a parent."""
        return sorted(s for s, i in self.shards.items() if shard_id in i.parents)


def read_to_end(info: ShardInfo, last_read: str | None, response: Mapping[str, Any]) -> bool:
    """Whether a ``GetRecords`` ``response`` ends the shard ``info`` (its records were delivered).

    The service's documented end of a closed shard is an answer without
    ``NextShardIterator`` (with the shard's ``ChildShards``); an open shard
    always has a next iterator, and an empty ``Records`` list is *not* an end
    (the iterator may point at a stretch of the shard without records; more
    calls reach the rest). moto returns a next iterator at a closed shard's end
    too, so the end is also found when the last sequence number read (the
    record's, or the checkpoint's; ``0`` when nothing was read) has reached the
    shard's ``EndingSequenceNumber``: every record of a closed shard is at or
    below it, so nothing can follow, on the service as on moto (where an empty
    closed shard's range ends at ``0``; real sequence numbers are 56 digits).

    Example:
        >>> closed, open_ = ShardInfo("s0", (), "1", "9"), ShardInfo("s1", (), "1", None)
        >>> read_to_end(closed, "5", {"NextShardIterator": "it", "Records": []})
        False
        >>> read_to_end(closed, "9", {"NextShardIterator": "it"})
        True
        >>> read_to_end(closed, "5", {"ChildShards": [{"ShardId": "s2"}]})
        True
        >>> read_to_end(open_, None, {"NextShardIterator": "it", "MillisBehindLatest": 0})
        False
    """
    if not response.get("NextShardIterator") or response.get("ChildShards"):
        return True
    if info.ending_sequence is None:
        return False
    return int(last_read or 0) >= int(info.ending_sequence)
