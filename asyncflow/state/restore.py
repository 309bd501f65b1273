"""Bringing a table partition's local store up to date before its partition is processed.

On assignment, for each table shard:

1. Write a sentinel record (a fresh token) to the changelog partition: reading
   up to it reads exactly to the end of the log, even on brokers whose end
   offsets are approximate.
2. If the local store's last marker is still where the store says it is in
   the changelog (same position, same checkpoint id), the store is current up
   to there and only the records after it are read (another worker's
   checkpoints, if it owned the partition meanwhile). Otherwise the store is
   cleared and the changelog is read from its start (a restore on a new
   machine, or after a takeover).
3. Records are applied up to the last checkpoint marker; what follows the last
   marker belongs to a checkpoint that never completed and is ignored, and the
   keys it touched are rewritten by this worker's next checkpoint.
4. If the group never committed anything for the partition but the state
   claims offsets (the consumer group was reset, or the first checkpoint died
   before its commit), the state is dropped and tombstones for its keys go
   into the next checkpoint: processing starts from scratch, consistently.

**Claims.** The sentinel is also the restoring worker's claim on the
partition: every record the shard writes from then on carries its token
(header ``asyncflow.claim``). A worker that lost the partition without
hearing of it yet (dropped from the group while a rebalance waited for it)
may still write a checkpoint after its successor's claim, one that claims
more than the successor's state holds; read as it stands, the log would give
state ahead of its marker (events applied twice) or older values over newer
ones. So a restore counts, after each sentinel, only the records of that
sentinel's claim: another claim's records (and markers) after it are
ignored, and their keys are rewritten with trusted values by the next
checkpoint (so that compaction cannot bring the late values back). Records
without a claim (written before claims existed) count as before. The late
writer's local store holds that checkpoint too: a shard that finds another
writer's records between its own (``TableShard.persist_changelog``) marks its
local store untrusted, and so does a worker that hears it lost a partition
(``StateManager.release(lost=True)``; this covers changelog partitions several
sources' partitions share, where others' records are expected): the next
restore rebuilds such a store from the changelog.

Under exactly-once (``exactly_once=True``) changelog records are written in
the checkpoint's transaction and read back ``read_committed``; on top of
that a restore trusts no checkpoint the group did not commit: a local store
that claims offsets beyond the group's committed offset is rebuilt from the
changelog, and a marker whose offset is beyond it (a transaction that did
not commit, on a broker that shows aborted records) is treated like the end
of an unfinished checkpoint: its records are ignored, even when checkpoints
that did commit follow it, and its keys are rewritten by the next
checkpoint. The end-of-log sentinel is written outside the transaction
(``append_now``), so the read can reach it at once.

A changelog that is gone while the local store is not (a memory broker that
restarted, a topic deleted by hand) leaves the local store as the only copy:
it is kept, and written into the changelog again at the next checkpoint.

Example (a shard restored from a memory changelog another worker wrote):
    >>> import asyncio
    >>> from asyncflow.memory import MemoryBroker
    >>> from asyncflow.state.shard import ChangelogTarget, TableShard
    >>> from asyncflow.state.store import MemoryStore
    >>> broker = MemoryBroker(); broker.create_topic("app-t-changelog")
    >>> target = ChangelogTarget(broker, "app-t-changelog", 0, b"p0")
    >>> async def demo():
    ...     first = TableShard("t", "p0", MemoryStore(), target)
    ...     await first.persist(first.stage([(b'"k"', b"5")], offset=3, frontier=None,
    ...                                     checkpoint_id="a-1"))
    ...     second = TableShard("t", "p0", MemoryStore(), target)
    ...     await restore_shard(second, committed=3)
    ...     return second.store.get(b'"k"'), second.applied
    >>> asyncio.run(demo())
    (b'5', 3)
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import orjson

from asyncflow.errors import AsyncflowError
from asyncflow.state.shard import (
    CLAIM_HEADER,
    MARKER_KEY,
    PARTITION_HEADER,
    SENTINEL_KEY,
    TableShard,
)

log = logging.getLogger("asyncflow.state")

UNKNOWN: Any = object()
"""``committed=UNKNOWN``: the source cannot say what its group committed."""

FLUSH_EVERY = 50_000
"""Trusted changes held in memory during a restore before they go to the store."""


class RestoreStalled(AsyncflowError):
    """A changelog read made no progress for too long."""


async def restore_shard(
    shard: TableShard,
    *,
    committed: int | None | Any = UNKNOWN,
    stall_timeout: float = 60.0,
    progress_every: float = 5.0,
    exactly_once: bool = False,
) -> int:
    """Restore ``shard`` (see the module docstring); returns the changelog records read.

    ``committed`` is the last source offset the group committed for the
    partition (``None``: never; ``UNKNOWN``: the source cannot say).
    """
    shard.load_meta()
    target = shard.changelog
    store = shard.store
    if target is None:  # state only in the local store
        _reset_if_uncommitted(shard, committed)
        return 0
    broker, topic, part, label = target.broker, target.topic, target.partition, target.label
    token = secrets.token_hex(8).encode()
    target.take_claim(token)  # the sentinel, and everything this shard writes, under its token
    sentinel = target.record(SENTINEL_KEY, orjson.dumps({"token": token.decode()}))
    append_now = getattr(broker, "append_now", None) if exactly_once else None
    end = await (append_now or broker.append)(topic, part, [sentinel])
    shard.written_to = end
    limit: int | None = committed if exactly_once and isinstance(committed, int) else None
    if limit is not None and shard.applied is not None and shard.applied > limit:
        log.info("local state of table %s for partition %s claims offset %d, beyond the "
                 "committed %d: rebuilding it from the changelog's committed records",
                 shard.table, shard.partition, shard.applied, limit)
        shard.marker_pos = shard.marker_id = None

    start = 0
    trusted_local = False
    claimant: bytes | None = None  # whose records count: the claim of the last sentinel read
    if shard.marker_pos is not None and shard.marker_id is not None:
        if shard.marker_pos < end:
            head = await broker.read_changelog(topic, part, shard.marker_pos, timeout=stall_timeout,
                                               max_records=1)
            if head and head[0].offset == shard.marker_pos and head[0].key == MARKER_KEY:
                marker = orjson.loads(head[0].value or b"{}")
                trusted_local = marker.get("id") == shard.marker_id
                _, claimant = _label_and_claim(head[0].headers)
            start = shard.marker_pos + 1 if trusted_local else 0
        elif committed is not None and shard.marker_pos is not None:
            # the changelog is shorter than what this store saw: it was lost; keep the
            # store (the only copy) and write all of it into the changelog again
            log.warning(
                "changelog %s[%d] lost what local state for %s %s had; keeping the local "
                "store and writing it to the changelog again", topic, part, shard.table,
                shard.partition,
            )
            shard.compensation = dict(store.items())
            shard.marker_id = shard.marker_pos = None
            return 0
    if not trusted_local:
        store.clear()
        shard.applied = shard.checkpointed = shard.frontier = None
        shard.marker_id = shard.marker_pos = None
        claimant = None

    trusted: dict[bytes, bytes | None] = {}
    tail: dict[bytes, bytes | None] = {}
    untrusted: set[bytes] = set()  # keys of checkpoints whose transaction did not commit
    meta: dict[str, bytes] = {}
    read = 0
    began = last_report = time.monotonic()
    position = start
    while True:
        batch = await broker.read_changelog(topic, part, position, timeout=stall_timeout)
        if not batch:
            raise RestoreStalled(
                f"restoring table {shard.table!r} for partition {shard.partition}: changelog "
                f"{topic}[{part}] gave nothing for {stall_timeout:.0f}s before its end (offset "
                f"{end}); is the broker reachable?"
            )
        done = False
        for rec in batch:
            position = rec.offset + 1
            of, claim = _label_and_claim(rec.headers)
            if of != label:
                continue
            read += 1
            key = rec.key
            if key == SENTINEL_KEY:
                if rec.offset == end:
                    done = True
                    break
                claimant = claim  # a worker took the partition here: from now on, its records
                continue
            if claim is not None and claimant is not None and claim != claimant:
                # written after another worker took the partition, by one that had lost it:
                # not state anyone restored or committed. Its keys get trusted values again
                if key != MARKER_KEY and key is not None:
                    untrusted.add(key)
                continue
            if key == MARKER_KEY:
                marker = orjson.loads(rec.value or b"{}")
                covered = marker.get("offset")
                if limit is not None and covered is not None and covered > limit:
                    # a checkpoint whose transaction did not commit: its records are not
                    # trusted, even when a later checkpoint (that did commit) follows them
                    untrusted.update(tail)
                    tail.clear()
                    continue
                trusted.update(tail)
                tail.clear()
                meta = {"marker_id": str(marker["id"]).encode(), "marker_pos": str(rec.offset).encode()}
                if marker.get("offset") is not None:
                    meta["offset"] = str(marker["offset"]).encode()
                if marker.get("frontier") is not None:
                    meta["frontier"] = str(marker["frontier"]).encode()
                if marker.get("lanes") is not None:
                    meta["lanes"] = str(marker["lanes"]).encode()
                if len(trusted) >= FLUSH_EVERY:
                    store.write(list(trusted.items()), meta)
                    trusted.clear()
            elif key is not None:
                tail[key] = rec.value
        now = time.monotonic()
        if now - last_report >= progress_every:
            last_report = now
            log.info("restoring table %s for partition %s: %d changelog records read (%.0f/s)",
                     shard.table, shard.partition, read, read / max(now - began, 1e-9))
        if done:
            break
    if trusted or meta:
        store.write(list(trusted.items()), meta)
    ignored = untrusted.union(tail)
    if ignored:  # unfinished or uncommitted checkpoints: their keys get trusted values again
        shard.compensation = {k: store.get(k) for k in ignored}
    shard.load_meta()
    _reset_if_uncommitted(shard, committed)
    if read > 1:
        log.info("restored table %s for partition %s from %s: %d records in %.2fs%s",
                 shard.table, shard.partition, "the local store and its changelog tail"
                 if trusted_local else "its changelog", read, time.monotonic() - began,
                 f" ({len(ignored)} keys of unfinished checkpoints ignored)" if ignored else "")
    return read


def _reset_if_uncommitted(shard: TableShard, committed: Any) -> None:
    """Drop state that claims offsets the group never committed (the group is new or reset)."""
    if committed is not None or shard.applied is None:
        return
    log.info("the group has no committed offset for partition %s, so table %s starts empty "
             "(its state claimed offset %d)", shard.partition, shard.table, shard.applied)
    tombstones: dict[bytes, bytes | None] = {k: None for k, _ in shard.store.items()}
    tombstones.update({k: None for k in shard.compensation})
    shard.store.clear()
    shard.compensation = tombstones
    shard.applied = shard.checkpointed = shard.frontier = None
    shard.marker_id = shard.marker_pos = None


def _label_and_claim(headers: Any) -> tuple[bytes | None, bytes | None]:
    """The partition label and the claim of a changelog record (one pass over its headers)."""
    label = claim = None
    for name, value in headers or ():
        if name == PARTITION_HEADER:
            label = bytes(value)
        elif name == CLAIM_HEADER:
            claim = bytes(value)
    return label, claim
