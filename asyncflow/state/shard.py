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

CLAIM_HEADER = "asyncflow.claim"
"""Header naming the claim a changelog record was written under: the token of the
restore sentinel its writer wrote when it took the partition (see ``restore``)."""

UNTRUSTED = b"\x00untrusted"
"""A local store's ``marker_id`` that matches no marker: the store is rebuilt at its next
restore (its writer found another writer's records among its own, see ``persist_changelog``)."""


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

    def take_claim(self, claim: bytes) -> None:
        """Write every record from now on under ``claim`` (a restore's sentinel token).

        Example:
            >>> t = ChangelogTarget(None, "app-t-changelog", 0, b"p0")  # type: ignore[arg-type]
            >>> t.take_claim(b"5f1c"); t.record(b"k", b"1").headers
            (('asyncflow.partition', b'p0'), ('asyncflow.claim', b'5f1c'))
        """
        self.headers = ((PARTITION_HEADER, self.label), (CLAIM_HEADER, claim))

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
    lanes: int | None = None


class TableShard:
    """The durable state of one table in one source partition.

    ``applied`` is the source offset the restored state already reflects:
    events at or before it are not applied again (a replay after a crash
    between the changelog write and the offset commit). ``checkpointed`` is
    the offset of the last checkpoint persisted here. ``lanes`` is the lane
    count window entries (stored as ``[lane, key]``) were laid out for.

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
        "lanes",
        "marker_id",
        "marker_pos",
        "partition",
        "store",
        "table",
        "_lanes",
        "closed",
        "written_to",
        "shared",
        "tainted",
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
        self.lanes: int | None = None
        self.marker_id: str | None = None
        self.marker_pos: int | None = None
        self.compensation: dict[bytes, bytes | None] = {}
        self._lanes: dict[int, list[tuple[bytes, bytes]]] | None = None
        self.closed = False
        self.written_to: int | None = None
        """Where this shard's last record stands in the changelog (its claim, after a
        restore; then each checkpoint's marker); ``None``: not followed."""
        self.shared = False
        """Whether another writer's records among this shard's own can be legitimate (a
        changelog partition several sources' partitions share, or transactions' control
        records between checkpoints): then ``written_to`` is not followed."""
        self.tainted = False
        """Whether another writer's records were found among this shard's own: its local
        store is never trusted again (``UNTRUSTED``)."""

    def load_meta(self) -> None:
        """Read the checkpoint metadata the local store holds."""
        store = self.store
        self.applied = _int(store.meta("offset"))
        self.checkpointed = self.applied
        self.frontier = _int(store.meta("frontier"))
        self.lanes = _int(store.meta("lanes"))
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
        return Staged(changes, offset, frontier, checkpoint_id, lanes=self.lanes)

    async def persist(self, staged: Staged) -> None:
        """Write one staged checkpoint: changelog (changes, then the marker), then the store."""
        meta = await self.persist_changelog(staged)
        await self.persist_local(staged, meta)

    async def persist_changelog(self, staged: Staged) -> dict[str, bytes]:
        """The changelog half of ``persist``: changes and marker; the store metadata to write.

        Under exactly-once this runs inside the checkpoint's transaction and
        ``persist_local`` only after it committed. The records go under the
        shard's claim (see ``asyncflow.state.restore``); if they do not follow
        the shard's last record directly, someone else wrote in between, and
        the local store is marked untrusted from then on (``UNTRUSTED``).
        """
        meta: dict[str, bytes] = {"marker_id": staged.checkpoint_id.encode()}
        if staged.offset is not None:
            meta["offset"] = str(staged.offset).encode()
        if staged.frontier is not None:
            meta["frontier"] = str(staged.frontier).encode()
        if staged.lanes is not None:
            meta["lanes"] = str(staged.lanes).encode()
        target = self.changelog
        if target is not None:
            marker: dict[str, Any] = {
                "id": staged.checkpoint_id, "offset": staged.offset, "frontier": staged.frontier,
            }
            if staged.lanes is not None:
                marker["lanes"] = staged.lanes
            records = [target.record(k, v) for k, v in staged.changes]
            records.append(target.record(MARKER_KEY, orjson.dumps(marker)))
            position = await target.broker.append(target.topic, target.partition, records)
            meta["marker_pos"] = str(position).encode()
            last = self.written_to
            if last is not None and not self.shared and position - len(records) != last:
                # something else was written since this shard's last record: another worker
                # took the partition (its claim) and this one is behind the times, or one
                # that lost it wrote late. Either way the local store cannot tell from its
                # marker whether it is current: it is rebuilt at its next restore (which
                # follows claims, so the changelog stays right)
                self.tainted = True
            self.written_to = position
            if self.tainted:
                meta["marker_id"] = UNTRUSTED
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

        The store is scanned once; each lane then takes its own entries. With
        as many lanes as the entries were laid out for, an entry stays in its
        stored lane (it was there because its events were). After the lane
        count changed (the agent's ``concurrency``), an entry goes to the lane
        its key routes to now, and the next checkpoint moves it there in the
        store too (deleting the old entry), so that state and routing agree
        at every later restart. Stores from before the lane count was kept
        keep the stored lane while it exists.

        Example:
            >>> from asyncflow.keys import lane_of
            >>> from asyncflow.state.codec import encode_key
            >>> shard = TableShard("w", 0, MemoryStore(), None)
            >>> shard.store.write([(encode_key((0, "k")), b"[]")], {"lanes": b"1"})
            >>> shard.load_meta()
            >>> moved = lane_of("k", 4)
            >>> shard.lane_items(moved, 4, lane_of) == [(encode_key((moved, "k")), b"[]")]
            True
            >>> shard.lanes, len(shard.compensation)  # the old entry deleted, the new one written
            (4, 2)
        """
        if self._lanes is None:
            from asyncflow.state.codec import decode_key, encode_key

            stored_count = self.lanes
            grouped: dict[int, list[tuple[bytes, bytes]]] = {}
            for kb, vb in self.store.items():
                stored_lane, key = decode_key(kb)
                if stored_count == lanes or (stored_count is None and 0 <= stored_lane < lanes):
                    owner = stored_lane
                else:
                    owner = lane_of(key, lanes)
                    if owner != stored_lane:
                        self.compensation[kb] = None
                        kb = encode_key((owner, key))
                        self.compensation[kb] = vb
                grouped.setdefault(owner, []).append((kb, vb))
            self._lanes = grouped
            self.lanes = lanes
        return self._lanes.pop(lane, [])

    def distrust(self) -> None:
        """Mark the local store untrusted: its next restore rebuilds it from the changelog.

        Example:
            >>> shard = TableShard("t", 0, MemoryStore(), None)
            >>> shard.distrust(); shard.store.meta("marker_id") == UNTRUSTED
            True
        """
        self.tainted = True
        if not self.closed:
            self.store.write((), {"marker_id": UNTRUSTED})

    def close(self) -> None:
        """Release the local store (the partition was given up)."""
        self.closed = True
        self.store.close()


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)
