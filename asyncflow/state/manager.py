"""The state a worker holds: every table's shard for every partition it owns.

The runtime creates one ``StateManager`` per app run. Tables come from
``app.table(...)``; window state registers itself when an agent body calls
``stream.window(...)``. On assignment ``assign`` opens a local store per
(app, table, partition) under the state directory and restores it (see
``asyncflow.state.restore``) before the partition is read; on revoke
``release`` closes them. At a checkpoint ``snapshot`` takes every change made
since the last one (synchronously, while the lanes wait at the checkpoint's
barrier) and ``persist`` writes them to the changelogs and the local stores.

Example:
    >>> import asyncio
    >>> from asyncflow.clock import ManualClock
    >>> from asyncflow.state.table import Table
    >>> state = StateManager("app", directory=None, store="memory", broker=None, clock=ManualClock())
    >>> counts = Table("counts", default=0)
    >>> state.declare_table(counts)
    >>> async def demo():
    ...     await state.assign(["p0"], {"p0": None})
    ...     state.table_partition(counts, "p0").set("k", 3)
    ...     staged = state.snapshot({"p0": 10}, {}, "c-1")
    ...     await state.persist(staged)
    ...     return state.table_partition(counts, "p0").shard.checkpointed
    >>> asyncio.run(demo())
    10
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from collections.abc import Collection, Hashable, Iterable, Mapping
from typing import Any, Protocol

from asyncflow.clock import Clock
from asyncflow.errors import PartitionRevoked
from asyncflow.metrics import Metrics
from asyncflow.protocols import ChangelogBroker, TopicPartition, TopicSpec
from asyncflow.state.keyed import TablePartition
from asyncflow.state.restore import UNKNOWN, restore_shard
from asyncflow.state.shard import ChangelogTarget, Staged, TableShard
from asyncflow.state.store import Store, open_store
from asyncflow.state.table import Table, check_table_name

log = logging.getLogger("asyncflow.state")


class WindowState(Protocol):
    """What a windowed stream gives the state manager (``WindowedStream`` has it)."""

    table: str

    def export(self) -> dict[Hashable, list[tuple[bytes, bytes | None]]]:
        """Per partition, the encoded window entries changed since the last export."""
        ...

    @property
    def dirty(self) -> bool: ...

    def drop_partitions(self, partitions: Collection[Hashable]) -> None: ...


class PartitionState:
    """The shards of one partition, by table name.

    Example:
        >>> PartitionState("p0").skip_to is None
        True
    """

    __slots__ = ("assigned", "partition", "shards", "tables")

    def __init__(self, partition: Hashable, assigned: bool = False) -> None:
        self.partition = partition
        self.assigned = assigned
        self.shards: dict[str, TableShard] = {}
        self.tables: dict[str, TablePartition] = {}

    @property
    def skip_to(self) -> int | None:
        """Offsets at or before this are in every shard already (a replay skips them)."""
        applied = [s.applied for s in self.shards.values()]
        if not applied or any(a is None for a in applied):
            return None
        return min(a for a in applied if a is not None)

    @property
    def frontier(self) -> int | None:
        """The event-time frontier the restored state had reached."""
        times = [s.frontier for s in self.shards.values() if s.frontier is not None]
        return max(times) if times else None


def partition_label(partition: Hashable) -> str:
    """A partition as text, safe as a directory name.

    Example:
        >>> partition_label(TopicPartition("rides", 3)), partition_label("shardId-0001")
        ('rides-3', 'shardId-0001')
    """
    if isinstance(partition, TopicPartition):
        text = f"{partition.topic}-{partition.partition}"
    else:
        text = str(partition)
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


class StateManager:
    """Opens, restores, snapshots and persists the table shards of one worker.

    ``directory`` holds the local stores (``None`` with ``store="memory"``);
    ``broker`` carries the changelogs (``None``: local stores only);
    ``changelog_partitions`` is the partition count given to new changelog
    topics (a numbered source partition maps to its number, others to 0).
    """

    def __init__(
        self,
        app_id: str,
        *,
        directory: str | None,
        store: str,
        broker: ChangelogBroker | None,
        clock: Clock,
        changelog_partitions: int = 1,
        restore_timeout: float = 60.0,
        metrics: Metrics | None = None,
        exactly_once: bool = False,
    ) -> None:
        self.app_id = app_id
        self.directory = directory
        self.store_kind = store
        self.broker = broker
        self.clock = clock
        self.changelog_partitions = max(1, changelog_partitions)
        self.restore_timeout = restore_timeout
        self.metrics = metrics or Metrics()
        self.exactly_once = exactly_once
        """Restores trust only checkpoints the group committed (see ``restore_shard``)."""
        self.tables: dict[str, Table[Any]] = {}
        self.windows: list[WindowState] = []
        self._window_tables: set[str] = set()
        self._parts: dict[Hashable, PartitionState] = {}
        self._released: set[Hashable] = set()
        """Partitions given up and not assigned again: their state is asked for no more."""
        self._ensured: set[str] = set()
        self._token = secrets.token_hex(4)
        self._seq = 0

    # -- declaring ------------------------------------------------------------------
    def declare_table(self, table: Table[Any]) -> None:
        """Make a table known; its shards open with every partition assigned from now on."""
        self.tables[table.name] = table

    def register_window(self, window: WindowState) -> None:
        """A windowed stream's state: snapshotted at checkpoints, restored per partition."""
        check_table_name(window.table)
        self.windows.append(window)
        self._window_tables.add(window.table)

    @property
    def has_state(self) -> bool:
        """Whether there is any table or window state at all."""
        return bool(self.tables or self._window_tables)

    def changelog_topic(self, table: str) -> str:
        """The changelog topic of a table: ``<app>-<table>-changelog``."""
        return f"{self.app_id}-{table}-changelog"

    # -- assignment -------------------------------------------------------------------
    async def assign(
        self, partitions: Iterable[Hashable], committed: Mapping[Hashable, Any]
    ) -> dict[Hashable, PartitionState]:
        """Open and restore every known table's shard of each partition; returns their states."""
        out: dict[Hashable, PartitionState] = {}
        for p in partitions:
            self._released.discard(p)
            ps = self._parts.get(p)
            if ps is None or not ps.assigned:  # (state made up outside an assignment: none)
                ps = self._parts[p] = PartitionState(p, assigned=True)
            ps.assigned = True
            c = committed.get(p, UNKNOWN)
            for name in [*self.tables, *sorted(self._window_tables)]:
                if name not in ps.shards:
                    ps.shards[name] = await self._open_shard(name, p, c)
            out[p] = ps
        return out

    def release(self, partitions: Iterable[Hashable], *, lost: bool = False) -> None:
        """Close the shards of partitions given up (after their last checkpoint, if any).

        Their lanes handle none of their events after the one each is on
        (``LaneQueue.drop_partitions``); if that one asks for their state, it
        gets ``PartitionRevoked`` (never state made up from nothing) and is
        abandoned: the partition's new owner handles it. ``lost``: taken away
        without a rebalance (this worker was dropped from the group, or its
        lease was taken), so it may have gone on with them after another
        worker took them over: their local stores are marked untrusted, and
        rebuilt from the changelog if the partitions come back.

        Example:
            >>> import asyncio
            >>> from asyncflow.clock import ManualClock
            >>> from asyncflow.state.table import Table
            >>> state = StateManager("app", directory=None, store="memory", broker=None,
            ...                      clock=ManualClock())
            >>> counts = Table("counts", default=0); state.declare_table(counts)
            >>> _ = asyncio.run(state.assign(["p0"], {"p0": None}))
            >>> state.release(["p0"])
            >>> state.table_partition(counts, "p0")
            Traceback (most recent call last):
            ...
            asyncflow.errors.PartitionRevoked: partition p0 was given up while an event of it was handled; its new owner handles that event again
        """
        gone = set(partitions)
        for w in self.windows:
            w.drop_partitions(gone)
        for p in gone:
            ps = self._parts.pop(p, None)
            if ps is not None:
                for shard in ps.shards.values():
                    if lost:
                        shard.distrust()
                    shard.close()
            self._released.add(p)

    def partition(self, partition: Hashable) -> PartitionState | None:
        """The state of an assigned partition."""
        return self._parts.get(partition)

    async def _open_shard(self, table: str, partition: Hashable, committed: Any) -> TableShard:
        store = self._open_store(table, partition)
        target: ChangelogTarget | None = None
        if self.broker is not None:
            topic = self.changelog_topic(table)
            if topic not in self._ensured:
                await self.broker.ensure_changelogs(
                    [TopicSpec(topic, partitions=self.changelog_partitions)]
                )
                self._ensured.add(topic)
            number = partition.partition if isinstance(partition, TopicPartition) else 0
            target = ChangelogTarget(
                self.broker, topic, number % self.changelog_partitions,
                str(partition).encode(),
            )
        shard = TableShard(table, partition, store, target)
        # records of other writers among its own can be legitimate: transactions' control
        # records, the other partitions of a source whose partitions share changelog 0
        shard.shared = self.exactly_once or not isinstance(partition, TopicPartition)
        read = await restore_shard(shard, committed=committed, stall_timeout=self.restore_timeout,
                                   exactly_once=self.exactly_once)
        self.metrics.incr("state.restored_shards")
        self.metrics.incr("state.restore_records", read)
        return shard

    def _open_store(self, table: str, partition: Hashable) -> Store:
        if self.store_kind == "memory" or self.directory is None:
            return open_store("memory", "")
        path = os.path.join(self.directory, self.app_id, table, partition_label(partition))
        os.makedirs(path, exist_ok=True)
        return open_store(self.store_kind, path)

    # -- access from lanes --------------------------------------------------------------
    def table_partition(self, table: Table[Any], partition: Hashable) -> TablePartition:
        """The table's values in ``partition`` (one never assigned gets in-memory state).

        Raises ``PartitionRevoked`` for a partition this worker gave up.
        """
        ps = self._parts.get(partition)
        if ps is None:
            self._check_not_released(partition)
            ps = self._parts[partition] = PartitionState(partition)
        tp = ps.tables.get(table.name)
        if tp is None:
            if table.name not in self.tables:
                self.declare_table(table)
            shard = ps.shards.get(table.name)
            if shard is None and ps.assigned:
                from asyncflow.errors import ConfigError

                raise ConfigError(
                    f"table {table.name!r} is not declared on the app; create it with "
                    f"app.table({table.name!r}, ...) so that it is restored with its partitions"
                )
            if shard is None:  # never assigned (a stream built by hand): state in memory only
                shard = ps.shards[table.name] = TableShard(
                    table.name, partition, open_store("memory", ""), None
                )
            tp = ps.tables[table.name] = TablePartition(table, shard, self.clock)
        return tp

    async def window_shard(self, table: str, partition: Hashable) -> TableShard:
        """A window table's shard of ``partition``, restored first if it was not yet."""
        ps = self._parts.get(partition)
        if ps is None:
            self._check_not_released(partition)
            ps = self._parts[partition] = PartitionState(partition)
        found = ps.shards.get(table)
        if found is not None:
            return found
        if not ps.assigned:  # a stream built by hand: state in memory only
            shard = ps.shards[table] = TableShard(table, partition, open_store("memory", ""), None)
        else:
            log.warning(
                "window state %s was declared after partition %s was restored; restoring it "
                "now (declare windows before the first await in an agent body)", table, partition,
            )
            shard = ps.shards[table] = await self._open_shard(table, partition, UNKNOWN)
        return shard

    def _check_not_released(self, partition: Hashable) -> None:
        if partition in self._released:
            raise PartitionRevoked(
                partition,
                f"partition {partition} was given up while an event of it was handled; its "
                "new owner handles that event again",
            )

    # -- checkpoints -------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Whether anything changed since the last snapshot."""
        if any(w.dirty for w in self.windows):
            return True
        return any(tp.dirty for ps in self._parts.values() for tp in ps.tables.values())

    def next_checkpoint_id(self) -> str:
        """A new checkpoint id, unique to this worker run."""
        self._seq += 1
        return f"{self._token}-{self._seq}"

    def snapshot(
        self,
        cut: Mapping[Hashable, int],
        marks: Mapping[Hashable, int | None],
        checkpoint_id: str,
    ) -> list[tuple[TableShard, Staged]]:
        """Take every change since the last snapshot, encoded (call while the lanes wait).

        Each shard of a partition in ``cut`` (or with changes) is staged with
        the partition's covered source offset and event-time frontier.
        """
        changes: dict[tuple[str, Hashable], list[tuple[bytes, bytes | None]]] = {}
        for w in self.windows:
            for p, entries in w.export().items():
                if entries:
                    changes.setdefault((w.table, p), []).extend(entries)
        for p, ps in self._parts.items():
            for name, tp in ps.tables.items():
                entries = tp.export()
                if entries:
                    changes.setdefault((name, p), []).extend(entries)
        staged: list[tuple[TableShard, Staged]] = []
        for p, ps in self._parts.items():
            offset = cut.get(p)
            for name, shard in ps.shards.items():
                entries = changes.pop((name, p), [])
                if offset is None and not entries and not shard.compensation:
                    continue
                if offset is not None and offset == shard.checkpointed and not entries \
                        and not shard.compensation:
                    continue
                staged.append((shard, shard.stage(
                    entries, offset=offset, frontier=marks.get(p), checkpoint_id=checkpoint_id,
                )))
        for (name, p), entries in changes.items():  # state of a partition not assigned here
            log.debug("dropping %d changes of %s for unassigned partition %s", len(entries), name, p)
        return staged

    async def persist(self, staged: list[tuple[TableShard, Staged]]) -> None:
        """Write staged changes to the changelogs, then the local stores."""
        await asyncio.gather(*(shard.persist(s) for shard, s in staged))
        self._trim()

    async def persist_changelogs(
        self, staged: list[tuple[TableShard, Staged]]
    ) -> list[dict[str, bytes]]:
        """Exactly-once, inside the transaction: the changelog half; what ``persist_locals`` takes."""
        return list(await asyncio.gather(*(shard.persist_changelog(s) for shard, s in staged)))

    async def persist_locals(
        self, staged: list[tuple[TableShard, Staged]], metas: list[dict[str, bytes]]
    ) -> None:
        """Exactly-once, after the transaction committed: the local stores."""
        await asyncio.gather(*(shard.persist_local(s, m)
                               for (shard, s), m in zip(staged, metas, strict=True)))
        self._trim()

    def _trim(self) -> None:
        for ps in self._parts.values():
            for tp in ps.tables.values():
                tp.trim()

    def close(self) -> None:
        """Close every shard (the worker stops)."""
        self.release(list(self._parts))
