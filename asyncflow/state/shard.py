"""One table's state in one source partition: local store, changelog and checkpoint metadata.

A ``TableShard`` is the durable half of a table partition. At a checkpoint it
is handed the encoded changes made since the last one (``stage``) and writes
them (``persist``): first to the changelog partition, followed by a marker
record naming the checkpoint and the source offset it covers, then to the
local store together with that metadata. On assignment ``restore`` brings the
local store up to date with the changelog (see ``asyncflow.state.restore``).

The changelog is trusted only up to its last marker: records after it belong
to a checkpoint that never completed (its writer died between the two
steps). A restore ignores them and makes the next checkpoint rewrite the keys
they touched (``compensation``), so the log read from the start always gives
the state of its last marker.

Example:
    >>> import asyncio
    >>> from asyncflow.state.store import MemoryStore
    >>> shard = TableShard("counts", "p0", MemoryStore(), None)
    >>> staged = shard.stage([(b'"a"', b"1")], offset=9, frontier=None, checkpoint_id="w-1")
    >>> asyncio.run(shard.persist(staged))
    >>> shard.store.get(b'"a"'), shard.checkpointed
    (b'1', 9)
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import orjson

from asyncflow.protocols import ChangelogBroker, SinkRecord
from asyncflow.state.store import MemoryStore, Store

MARKER_KEY = b"\x01asyncflow.checkpoint"
"""The key of the record that completes a checkpoint in a changelog partition."""

SENTINEL_KEY = b"\x01asyncflow.restore"
"""The key of the record a restore writes first and reads up to (an exact end of the log)."""

PARTITION_HEADER = "asyncflow.partition"
"""Header naming the source partition a changelog record belongs to."""


@dataclass(slots=True)
class ChangelogTarget:
    """Where a shard's changelog lives: a topic partition of the app's broker.

    ``label`` is the source partition as text, carried in a header: sources
    whose partitions are not numbered (Kinesis shards, SSE) share changelog
    partition 0 and a restore keeps only its own label's records.

    Example:
        >>> ChangelogTarget(None, "app-t-changelog", 0, b"p0").topic  # type: ignore[arg-type]
        'app-t-changelog'
    """

    broker: ChangelogBroker
    topic: str
    partition: int
    label: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        self.headers = ((PARTITION_HEADER, self.label),)

    def record(self, key: bytes, value: bytes | None) -> SinkRecord:
        """A changelog record for this partition."""
        return SinkRecord(key, value, self.topic, self.headers, None, self.partition)


@dataclass(slots=True)
class Staged:
    """One checkpoint's changes of one shard, encoded, waiting to be persisted."""

    changes: list[tuple[bytes, bytes | None]]
    offset: int | None
    frontier: int | None
    checkpoint_id: str
    meta: dict[str, bytes] = field(default_factory=dict)


class TableShard:
    """The durable state of one table in one source partition.

    ``applied`` is the source offset the restored state already reflects:
    events at or before it are not applied again (a replay after a crash
    between the changelog write and the offset commit). ``checkpointed`` is
    the offset of the last checkpoint persisted here.

    Example:
        >>> TableShard("t", 0, MemoryStore(), None).applied is None
        True
    """

    __slots__ = (
        "applied",
        "changelog",
        "checkpointed",
        "compensation",
        "frontier",
        "marker_id",
        "marker_pos",
        "partition",
        "store",
        "table",
        "_lanes",
        "closed",
    )

    def __init__(
        self,
        table: str,
        partition: Hashable,
        store: Store,
        changelog: ChangelogTarget | None,
    ) -> None:
        self.table = table
        self.partition = partition
        self.store = store
        self.changelog = changelog
        self.applied: int | None = None
        self.checkpointed: int | None = None
        self.frontier: int | None = None
        self.marker_id: str | None = None
        self.marker_pos: int | None = None
        self.compensation: dict[bytes, bytes | None] = {}
        self._lanes: dict[int, list[tuple[bytes, bytes]]] | None = None
        self.closed = False

    def load_meta(self) -> None:
        """Read the checkpoint metadata the local store holds."""
        store = self.store
        self.applied = _int(store.meta("offset"))
        self.checkpointed = self.applied
        self.frontier = _int(store.meta("frontier"))
        marker = store.meta("marker_id")
        self.marker_id = marker.decode() if marker is not None else None
        self.marker_pos = _int(store.meta("marker_pos"))

    def stage(
        self,
        changes: list[tuple[bytes, bytes | None]],
        *,
        offset: int | None,
        frontier: int | None,
        checkpoint_id: str,
    ) -> Staged:
        """Take one checkpoint's changes (and any compensation owed) for ``persist``."""
        if self.compensation:
            comp = self.compensation
            self.compensation = {}
            changes = [*comp.items(), *changes]
        if offset is None:
            offset = self.checkpointed
        if frontier is None:
            frontier = self.frontier
        return Staged(changes, offset, frontier, checkpoint_id)

    async def persist(self, staged: Staged) -> None:
        """Write one staged checkpoint: changelog (changes, then the marker), then the store."""
        meta = await self.persist_changelog(staged)
        await self.persist_local(staged, meta)

    async def persist_changelog(self, staged: Staged) -> dict[str, bytes]:
        """The changelog half of ``persist``: changes and marker; the store metadata to write.

        Under exactly-once this runs inside the checkpoint's transaction and
        ``persist_local`` only after it committed.
        """
        meta: dict[str, bytes] = {"marker_id": staged.checkpoint_id.encode()}
        if staged.offset is not None:
            meta["offset"] = str(staged.offset).encode()
        if staged.frontier is not None:
            meta["frontier"] = str(staged.frontier).encode()
        target = self.changelog
        if target is not None:
            marker: dict[str, Any] = {
                "id": staged.checkpoint_id, "offset": staged.offset, "frontier": staged.frontier,
            }
            records = [target.record(k, v) for k, v in staged.changes]
            records.append(target.record(MARKER_KEY, orjson.dumps(marker)))
            position = await target.broker.append(target.topic, target.partition, records)
            meta["marker_pos"] = str(position).encode()
        return meta

    async def persist_local(self, staged: Staged, meta: dict[str, bytes]) -> None:
        """The local half of ``persist``: the changes and ``meta`` into the store, atomically.

        Nothing if the shard was let go meanwhile (its partition was lost while the
        changelog was written): its next owner restores from the changelog.
        """
        if self.closed:
            return
        if "marker_pos" in meta:
            self.marker_pos = int(meta["marker_pos"])
        if isinstance(self.store, MemoryStore) or not getattr(self.store, "write_in_thread", True):
            self.store.write(staged.changes, meta)
        else:
            await asyncio.to_thread(self.store.write, staged.changes, meta)
        self.marker_id = staged.checkpoint_id
        self.checkpointed = staged.offset
        self.frontier = staged.frontier

    def lane_items(self, lane: int, lanes: int, lane_of: Any) -> list[tuple[bytes, bytes]]:
        """The restored entries of one lane (window state is stored as ``[lane, key]``).

        The store is scanned once; each lane then takes its own entries. An
        entry of a lane that no longer exists (fewer lanes than before) goes to
        the lane its key hashes to.
        """
        if self._lanes is None:
            from asyncflow.state.codec import decode_key

            grouped: dict[int, list[tuple[bytes, bytes]]] = {}
            for kb, vb in self.store.items():
                stored_lane, key = decode_key(kb)
                owner = stored_lane if 0 <= stored_lane < lanes else lane_of(key, lanes)
                grouped.setdefault(owner, []).append((kb, vb))
            self._lanes = grouped
        return self._lanes.pop(lane, [])

    def close(self) -> None:
        """Release the local store (the partition was given up)."""
        self.closed = True
        self.store.close()


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)
