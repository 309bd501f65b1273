"""Checkpoints: when source offsets are committed, and what has to be durable first.

A checkpoint covers, per source partition, a *cut*: the offset up to which
every record has been handed to the lanes (records parked for a full lane, or
taken back from the lanes on a revoke or stop, are after the cut). The commit
sequence, every commit interval, on revoke and on stop:

1. **Barrier.** The current watermark, then a ``Barrier``, go into every lane
   queue behind the records of the cut. A lane that reaches it has handled
   everything before it (its outputs are in the sink buffers, its state
   changes in memory) and waits. Once every lane waits, the state manager
   takes every change made since the last checkpoint, encoded, and the lanes
   go on. Nothing is copied per event and no lane waits for I/O.
2. **Outputs flushed.** Every sink writer writes what it buffered, including
   dead letters, and returns once the sink says it is durable.
3. **Changelogs flushed.** Each changed table partition's changes go to its
   changelog topic, followed by a marker naming the checkpoint, the cut's
   offset and the partition's event-time frontier.
4. **Local stores.** The same changes and that metadata go into each local
   store, atomically.
5. **Offsets committed.** The cut's offsets go to the source. A commit the
   source could not make for a reason that may pass (``CommitFailed``: the
   broker unreachable, no answer in time) leaves those offsets uncommitted:
   the next checkpoint commits them, even if no record came in meanwhile,
   and so does the last one at stop.

Exactly-once (``processing_guarantee="exactly_once"``, a broker with
``Transactions``): steps 2 to 5 are one transaction. The lanes wait at the
barrier until it has committed (what they produce after the cut belongs to
the next transaction); outputs, dead letters and changelog records are
written into it, then the cut's offsets are committed *with* it
(``Transactions.commit``), and only then are the local stores written, so a
local store never holds state the broker did not commit. If the commit
fails the transaction is aborted and the checkpoint raises ``Fenced`` or
``TransactionAborted``: the worker stops, and a restart replays from the
committed offsets with state restored from committed changelog records. A
checkpoint that cannot be taken on a revoke or at stop aborts the open
transaction too (the partitions' new owner replays them).

A crash between any two steps leaves state that claims no event whose outputs
were not flushed (state is written only after step 2) and lacks no event whose
offset was committed (step 5 comes last); a replay re-delivers what the
committed offsets do not cover, and state skips what it already reflects. A
lane that never reaches the barrier (stuck, or cancelled at shutdown) means no
checkpoint: its records are replayed (at-least-once, never lost).

Example (the barrier on its own):
    >>> import asyncio
    >>> async def demo():
    ...     barrier = Barrier(lanes=2)
    ...     lanes = [asyncio.create_task(barrier.arrive(i)) for i in range(2)]
    ...     await barrier.aligned.wait()
    ...     barrier.release()
    ...     await asyncio.gather(*lanes)
    ...     return barrier.arrived
    >>> asyncio.run(demo())
    2
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Hashable
from typing import TYPE_CHECKING

from asyncflow.errors import AsyncflowError, CommitFailed
from asyncflow.metrics import Metrics
from asyncflow.protocols import Source, Transactions

if TYPE_CHECKING:
    from asyncflow.dispatch import Dispatcher
    from asyncflow.lanes import LaneQueue
    from asyncflow.state.manager import StateManager

log = logging.getLogger("asyncflow.checkpoint")

__all__ = ["Barrier", "Checkpointer", "CommitFailed", "Fenced", "TransactionAborted"]


class TransactionAborted(AsyncflowError):
    """Exactly-once: a checkpoint's transaction could not commit and was aborted (the worker stops)."""


class Fenced(TransactionAborted):
    """Exactly-once: another worker owns this one's partitions now; nothing more may be committed."""


class Barrier:
    """One checkpoint's marker in the lane queues: lanes wait at it until the state is taken.

    ``aligned`` is set once every expected lane has arrived (or left: its
    input ended); ``release`` lets them go on.

    Example:
        >>> Barrier(lanes=0).aligned.is_set()
        True
    """

    __slots__ = ("_expected", "_released", "aligned", "arrived", "_seen")

    def __init__(self, lanes: int) -> None:
        self._expected = lanes
        self.arrived = 0
        self._seen: set[Hashable] = set()
        self.aligned = asyncio.Event()
        self._released = asyncio.Event()
        if lanes <= 0:
            self.aligned.set()

    async def arrive(self, lane: Hashable) -> None:
        """A lane reached the barrier: wait until the checkpoint has taken the state."""
        if self._released.is_set() or lane in self._seen:
            return
        self._seen.add(lane)
        self.arrived += 1
        self._count_down()
        await self._released.wait()

    def leave(self, lane: Hashable) -> None:
        """A lane whose input ended before it reached the barrier."""
        if lane not in self._seen:
            self._seen.add(lane)
            self._count_down()

    def _count_down(self) -> None:
        self._expected -= 1
        if self._expected <= 0:
            self.aligned.set()

    def release(self) -> None:
        """Let the waiting lanes go on (the state is taken, or the checkpoint gave up)."""
        self._released.set()


class Checkpointer:
    """Takes the checkpoints of one source's partitions (the sequence in the module docstring).

    ``lanes`` maps each lane's id to its queue; ``finished`` holds the ids of
    lanes whose input ended and whose agent body returned.
    """

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        lanes: dict[Hashable, LaneQueue],
        flush: Callable[[], Awaitable[None]],
        state: StateManager,
        source: Source,
        metrics: Metrics,
        transactions: Transactions | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.transactions = transactions
        """Exactly-once: the broker's transactions (``None``: at-least-once)."""
        self.gate = gate
        """Exactly-once: set while the reader may dispatch (cleared while a cut is taken)."""
        self.dispatcher = dispatcher
        self.lanes = lanes
        self.flush = flush
        self.state = state
        self.source = source
        self.metrics = metrics
        self.finished: set[Hashable] = set()
        self.broken: set[Hashable] = set()
        self.failed = False
        self.lost: set[Hashable] = set()
        self.committed: dict[Hashable, int] = {}
        self.commit_failures = 0
        """Commits in a row that failed (``CommitFailed``); 0 after one succeeds."""
        self.last_error: str | None = None
        """Why the last checkpoint or commit that did not complete did not."""
        self.step = ""
        """What a checkpoint under way waits for: ``lanes``, ``outputs``, ``commit`` (or "")."""
        self._last_cut: dict[Hashable, int] = {}
        self._lock = asyncio.Lock()
        self._barrier: Barrier | None = None

    def lane_finished(self, lane: Hashable, clean: bool = True) -> None:
        """A lane's body returned: it takes part in no more barriers.

        ``clean`` is false when the lane stopped before its input ended
        (cancelled at shutdown, stopped by an error): it may have been in the
        middle of an event, so no checkpoint is taken from now on and
        everything since the last one is replayed.
        """
        if not clean:
            self.broken.add(lane)
            return
        self.finished.add(lane)
        if self._barrier is not None:
            self._barrier.leave(lane)

    async def checkpoint(
        self,
        *,
        timeout: float | None = None,
        only: Collection[Hashable] | None = None,
        final: bool = False,
    ) -> bool:
        """Take a checkpoint now; ``False`` if it did not complete.

        Incomplete: the lanes did not all reach it within ``timeout``, an
        earlier checkpoint failed half way, a lane stopped in the middle of
        its input, or the source could not commit (``CommitFailed``). In
        every case the offsets of the last complete checkpoint that are not
        committed yet are committed (when the source can), so a commit that
        failed is retried by the next call whether or not records came in.
        ``only`` limits the offsets committed to those partitions (a revoke).
        ``final`` (the stop's checkpoint) logs nothing about why it did not
        complete: ``last_error`` says it, and the runtime's stop line tells it.
        """
        began = time.monotonic()
        done, took = True, False
        self.step = ""
        async with self._lock:
            dispatcher, state = self.dispatcher, self.state
            marks = dispatcher.broadcast_watermark()
            cut = dispatcher.cut()
            tx = self.transactions
            if cut == self._last_cut and not state.dirty and not (tx is not None and tx.pending):
                pass  # nothing new since the last complete checkpoint; its commit may be due
            elif self.failed:
                if not final:
                    log.warning("no checkpoint: an earlier one failed half way; everything "
                                "since the last complete checkpoint is replayed after a restart")
                done = False
            elif self.broken:
                lanes = ", ".join(sorted(str(x) for x in self.broken))
                self.last_error = f"lane {lanes} stopped before its input ended"
                if not final:
                    log.warning(
                        "no checkpoint: lane %s stopped before its input ended and may have "
                        "left an event half done; everything since the last checkpoint is "
                        "replayed", lanes,
                    )
                done = False
            else:
                done = took = await self._take(cut, marks, timeout)
            if tx is not None and not done and (only is not None or final) and tx.pending:
                # a revoke or a stop without its checkpoint: the partitions' outputs in the open
                # transaction must not be committed later by anyone
                await tx.abort("no checkpoint on revoke or stop")
                self.failed = True
                if only is not None:
                    raise TransactionAborted(
                        f"revoking partitions without a checkpoint ({self.last_error}): the "
                        "transaction is aborted and the worker stops; the partitions' new owner "
                        "replays them from the committed offsets"
                    )
        if tx is not None:
            return done
        committed = await self._commit(only, final)
        if took:
            self.metrics.incr("checkpoints")
            seconds = time.monotonic() - began
            self.metrics.gauge("checkpoint_seconds", round(seconds, 4))
            self.metrics.histogram("checkpoint_seconds").observe(seconds)
        return done and committed

    @property
    def gapless(self) -> bool:
        """Whether cuts must have no gap: under exactly-once, and whenever there is state.

        Lanes run a partition's records in key order: while a slice waits for
        a full lane (parked) or was taken back, other lanes go on with later
        records of the same partition. A cut below the gap leaves state that
        reflects records past its offset, and the replay would apply them twice
        (a running total too high after a restart or a rebalance); exactly-once
        would commit outputs the cut does not cover. A stateless app needs no
        gapless cut (its outputs may repeat under at-least-once).
        """
        return self.transactions is not None or self.state.has_state

    async def _take(
        self, cut: dict[Hashable, int], marks: dict[Hashable, int | None], timeout: float | None
    ) -> bool:
        """Steps 1 to 4 (under the lock): barrier, outputs, changelogs, local stores."""
        try:
            if self.gapless:
                # the cut must have no gap: every record at or before it is processed before
                # the barrier and nothing after it is (other lanes may be ahead of a parked slice)
                cuts = await self._gapless_cut(timeout)
                if cuts is None:
                    return False
                cut, marks = cuts
            return await self._take_behind_barrier(cut, marks, timeout)
        finally:
            if self.gate is not None:
                self.gate.set()  # exactly-once: the reader dispatches again once committed

    async def _take_behind_barrier(
        self, cut: dict[Hashable, int], marks: dict[Hashable, int | None], timeout: float | None
    ) -> bool:
        state = self.state
        active = [lane for lane in self.lanes if lane not in self.finished]
        barrier = self._barrier = Barrier(len(active))
        for lane in active:
            self.lanes[lane].put_barrier(barrier)
        if self.transactions is None and self.gate is not None:
            self.gate.set()  # at-least-once: what is read from now on is behind the barrier
        self.step = "lanes"
        try:
            if timeout is None:
                await barrier.aligned.wait()
            else:
                async with asyncio.timeout(timeout):
                    await barrier.aligned.wait()
        except TimeoutError:
            waiting = len(active) - barrier.arrived
            self.last_error = f"{waiting} of {len(active)} lanes did not reach the checkpoint"
            log.warning(
                "checkpoint abandoned: %d of %d lanes did not reach it within %.1fs; what "
                "they hold is replayed from the last committed offsets", waiting, len(active),
                timeout,
            )
            self.metrics.incr("checkpoints_abandoned")
            return False
        finally:
            self._barrier = None
            if not barrier.aligned.is_set():
                barrier.release()
        if self.transactions is not None:
            try:
                return await self._take_in_transaction(cut, marks, self.transactions)
            finally:
                barrier.release()
        try:
            staged = state.snapshot(cut, marks, state.next_checkpoint_id())
        finally:
            barrier.release()
        self.step = "outputs"
        try:
            await self.flush()
            await state.persist(staged)
        except BaseException as exc:
            # the changes taken by the snapshot are neither durable nor in memory any
            # more: a later checkpoint would commit offsets their state lacks
            self.failed = True
            if isinstance(exc, asyncio.CancelledError):
                self.last_error = "writing the outputs and state was cut short (not done in time)"
            else:
                self.last_error = f"writing the outputs or state failed: {exc}"
            raise
        self.step = ""  # (left as it is when cut short: what it was waiting for)
        self._last_cut = cut
        return True

    async def _gapless_cut(
        self, timeout: float | None
    ) -> tuple[dict[Hashable, int], dict[Hashable, int | None]] | None:
        """Hold the reader until no slice is parked; the cut and marks then (see ``gapless``).

        Lanes run a partition's records in key order, not in offset order: a slice
        parked for a full lane leaves a gap below records other lanes process. A
        cut below such a gap would commit outputs of records it does not cover (a
        replay would write them again), so the reader dispatches nothing until the
        parked slices are in their lanes; it stays held until the transaction is
        over (the lanes wait for it anyway, and a record dead-lettered while it
        commits would go into it). ``None`` (gate open again) if the parked slices
        take longer than ``timeout``.
        """
        dispatcher = self.dispatcher
        gate = self.gate
        if gate is not None:
            gate.clear()
        self.step = "lanes"
        deadline = None if timeout is None else time.monotonic() + timeout
        while dispatcher.has_parked:
            if deadline is not None and time.monotonic() > deadline:
                if gate is not None:
                    gate.set()
                self.last_error = "slices parked for full lanes did not drain in time"
                log.warning("checkpoint abandoned: %s (%.1fs)", self.last_error, timeout or 0)
                self.metrics.incr("checkpoints_abandoned")
                return None
            await asyncio.sleep(0.002)
        marks = dispatcher.broadcast_watermark()
        return dispatcher.cut(), marks

    async def _take_in_transaction(
        self, cut: dict[Hashable, int], marks: dict[Hashable, int | None], tx: Transactions
    ) -> bool:
        """Steps 2 to 5 as one transaction, while the lanes wait: outputs, changelogs, commit.

        The local stores are written after the commit (step 4 last): a crash
        before it leaves them behind the changelog, which a restore catches
        up on; never ahead of it.
        """
        state = self.state
        staged = state.snapshot(cut, marks, state.next_checkpoint_id())
        positions = {p: o for p, o in cut.items()
                     if p not in self.lost and o > self.committed.get(p, -1)}
        began = time.monotonic()
        self.step = "outputs"
        try:
            await self.flush()
            written = await state.persist_changelogs(staged)
            self.step = "commit"
            await tx.commit(self.source, positions)
        except BaseException as exc:
            self.failed = True
            if isinstance(exc, asyncio.CancelledError):
                self.last_error = "the checkpoint's transaction was cut short (not done in time)"
            else:
                self.last_error = str(exc)
            await asyncio.shield(tx.abort(self.last_error))
            if isinstance(exc, TransactionAborted) or isinstance(exc, asyncio.CancelledError):
                raise
            raise TransactionAborted(
                f"writing the checkpoint's outputs or state failed ({exc}): the transaction is "
                "aborted and the worker stops; a restart replays from the committed offsets"
            ) from exc
        done = time.monotonic()
        self.metrics.incr("commits")
        self.metrics.histogram("commit_seconds").observe(done - began)
        self._observe_latency(positions, done)
        for p, o in positions.items():
            self.committed[p] = o
        await state.persist_locals(staged, written)
        self.step = ""
        self._last_cut = cut
        return True

    async def _commit(self, only: Collection[Hashable] | None, final: bool = False) -> bool:
        """Step 5: commit what the last complete checkpoint covers and is not committed yet."""
        committed = self.committed
        positions = {
            p: o for p, o in self._last_cut.items()
            if o > committed.get(p, -1) and (only is None or p in only) and p not in self.lost
        }
        if not positions:
            return True
        self.step = "commit"
        began = time.monotonic()
        try:
            await self.source.commit(positions)
        except CommitFailed as exc:
            self.step = ""
            self.commit_failures += 1
            self.last_error = str(exc)
            self.metrics.incr("commits_failed")
            if self.commit_failures == 1 and not final:
                log.warning("offsets of %d partitions not committed: %s; they stay uncommitted "
                            "and the next checkpoint commits them", len(positions), exc)
            else:
                log.debug("commit attempt %d failed: %s", self.commit_failures, exc)
            return False
        self.step = ""
        done = time.monotonic()
        self.metrics.incr("commits")
        self.metrics.histogram("commit_seconds").observe(done - began)
        self._observe_latency(positions, done)
        if self.commit_failures:
            log.info("offsets committed again after %d failed attempts", self.commit_failures)
            self.commit_failures = 0
        for p, o in positions.items():
            if o > committed.get(p, -1):
                committed[p] = o
        return True

    def _observe_latency(self, positions: dict[Hashable, int], now: float) -> None:
        """Event in to acknowledged: each batch read below a committed position, once per batch.

        What an offset commit covers is processed, its outputs flushed and its
        state written, so the commit is the moment its events count as done.
        """
        latency = self.metrics.histogram("processing_seconds")
        read_log = self.dispatcher.read_log
        for p, position in positions.items():
            batches = read_log.get(p)
            while batches and batches[0][0] <= position:
                _, read_at, n = batches.popleft()
                latency.observe(now - read_at, n)

    def uncommitted(self) -> dict[Hashable, tuple[int | None, int]]:
        """Partitions with records handed to the lanes beyond their last commit.

        Per partition: (the last offset committed here, ``None`` if none yet;
        the offset read up to). After a stop these are what a restart replays.
        """
        committed = self.committed
        return {
            p: (committed.get(p), o)
            for p, o in self.dispatcher.cut().items()
            if o > committed.get(p, -1) and p not in self.lost
        }

    def lose(self, partitions: Collection[Hashable]) -> None:
        """Partitions lost without a checkpoint: no later checkpoint may write their state.

        Changes lanes made to them since the last checkpoint stay out of every
        later snapshot (their shards are released before the next one), and
        their offsets are never committed from here again.
        """
        self.lost.update(partitions)

    def forget(self, partitions: Collection[Hashable]) -> None:
        """Partitions given up: their committed positions are no longer ours to track."""
        for p in partitions:
            self.committed.pop(p, None)
            self._last_cut.pop(p, None)
