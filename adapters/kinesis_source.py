"""Kinesis source: shards leased between workers, one reader task per leased shard.

Workers of one app (same ``app_name`` and stream) share the shards through a
lease table in DynamoDB (``kinesis_lease_table``; the decisions are in
``kinesis_leases``, the Kinesis Client Library's model). Every
``lease_renewal_interval`` s a renewal task renews the leases this worker holds
(a write conditional on the owner and counter it last saw) and, apart from it
(so that a slow assignment in the core never delays a renewal), a taking task
reads the table and takes expired or unowned leases up to its fair share, or a
few from the most-loaded worker when below it. A taken shard is assigned to the core
(``on_assigned``) and read from its checkpoint; a lease found taken by
another worker (a renewal or checkpoint refused, or the table showing another
owner) stops that shard's reader at once and the core is told it is lost
(``on_lost``; ``on_revoked`` for listeners without it): nothing more is
checkpointed for it, its new owner replays from the last checkpoint.

Readers put one ``RawBatch`` per ``GetRecords`` answer on a bounded queue that
``fetch`` drains, so a slow core slows the readers down (and a paused shard's
reader stops calling ``GetRecords``). A child shard's lease is taken only once
every parent is checkpointed at ``SHARD_END``: per-key order holds across a
split or a merge, whichever worker reads what. ``commit`` stores the acked
sequence number per shard under its lease (``SHARD_END`` once a closed shard
is fully processed, after which the shard is revoked and its lease let go);
``stop`` releases every lease the lease table shows in this worker's name
(the core's last checkpoint came before), so another worker takes them at
once rather than after expiry.

Example:
    >>> src = KinesisSource("clicks", app_name="sessions", region="us-east-1", worker_id="w1")
    >>> (src.topic, src.checkpoint_table, src.worker_id)
    ('clicks', 'sessions-kinesis-checkpoints', 'w1')
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from asyncflow.errors import AsyncflowError, ConfigError, redact_url
from asyncflow.protocols import Partition, PartitionListener, RawBatch, Record

from ._aws import (
    THROTTLING_CODES,
    AwsCredentialsError,
    AwsOptions,
    AwsUnavailable,
    Backoff,
    call_with_retry,
    credentials_problem,
    describe,
    endpoint_of,
    error_code,
    first_error,
    is_retryable,
    is_unreachable,
    open_client,
)
from .kinesis_checkpoints import CheckpointError
from .kinesis_lease_table import LeaseLost, LeaseTable
from .kinesis_leases import ExpiryWatch, Lease, LeaseSettings, leases_to_take
from .kinesis_shards import SHARD_END, Position, Shard, ShardInfo, ShardPlan, read_to_end
from .kinesis_stream import check_stream, list_shards

log = logging.getLogger("adapters.kinesis")

HELD_WRITE_ATTEMPTS = 5
"""Tries of one write under a lease while its row keeps changing in this worker's name.

A request this worker gave up on (cut off by a stop, or timed out) may still
reach the table and move the lease's counter on behind this worker's copy.
A release at stop, a renewal and a checkpoint refused for that reason read
the row again and, while it still names this worker and was last written by
this process (``Lease.holder``), retry against it, at most this many times.
"""


def default_worker_id() -> str:
    """``host-pid-random``: unique per process, readable in the lease table.

    Example:
        >>> default_worker_id().count("-") >= 2
        True
    """
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class KinesisSourceStats:
    """Counters of a ``KinesisSource`` (for metrics and tests).

    Example:
        >>> KinesisSourceStats().records
        0
    """

    records: int = 0
    batches: int = 0
    throttled: int = 0
    iterators_renewed: int = 0
    shards_finished: int = 0
    leases_taken: int = 0
    leases_lost: int = 0
    leases_released: int = 0


@dataclass(slots=True)
class _ShardEnd:
    partition: Shard


@dataclass(slots=True)
class _ShardRun:
    """What this worker knows about a shard it reads (one per lease held)."""

    unpaused: asyncio.Event = field(default_factory=asyncio.Event)
    last_read: str | None = None  # sequence number of the last record read (iterator renewal)
    delivered: int | None = None  # offset of the last record handed out by fetch
    committed: int | None = None
    end_delivered: bool = False
    finishing: bool = False
    task: asyncio.Task[None] | None = None


class KinesisSource:
    """Read a Kinesis stream: partitions are ``Shard(stream, shard_id)``, offsets sequence numbers.

    ``iterator`` is where shards without a checkpoint start (``TRIM_HORIZON``,
    ``LATEST`` or ``AT_TIMESTAMP`` with ``at_timestamp``). Leases and
    checkpoints live in the DynamoDB table ``checkpoint_table`` (default
    ``<app_name>-kinesis-checkpoints``, the checkpoint table of earlier
    versions, whose rows it keeps), created if missing when
    ``create_checkpoint_table``. Workers with the same ``app_name`` share the
    shards: ``lease_duration`` (s a dead worker's leases wait before others
    take them), ``lease_renewal_interval`` (s between renewals, a third of the
    duration by default), ``max_leases_to_steal`` (taken from a busier worker
    at one time) and ``worker_id`` (default ``host-pid-random``) tune it.
    Each shard is read at most every ``min_read_interval`` s (Kinesis allows
    5 reads/s per shard), every ``poll_interval`` s once caught up;
    throttling is retried with jittered backoff, an expired iterator is
    renewed after the last sequence number read. ``_wrap_client(service,
    client)`` is a testing hook to inject failures or watch calls.

    Example:
        >>> src = KinesisSource("clicks", app_name="demo", iterator="LATEST",
        ...                     endpoint_url="http://127.0.0.1:5000", region="us-east-1",
        ...                     lease_duration=6.0)
        >>> src.stream, src.leases.renew_every
        ('clicks', 2.0)
        >>> KinesisSource("clicks", app_name="demo", max_leases_to_steal=-1)
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: max_leases_to_steal must be between 0 and 1000, got -1
    """

    def __init__(
        self,
        stream: str,
        *,
        app_name: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        iterator: str = "TRIM_HORIZON",
        at_timestamp: datetime | None = None,
        checkpoint_table: str | None = None,
        checkpoint_endpoint_url: str | None = None,
        create_checkpoint_table: bool = True,
        poll_interval: float = 1.0,
        min_read_interval: float = 0.2,
        max_records: int = 10_000,
        shard_refresh_interval: float = 30.0,
        queue_batches: int = 32,
        max_retries: int = 10,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        list_shards_page_size: int = 1000,
        lease_duration: float = 10.0,
        lease_renewal_interval: float | None = None,
        max_leases_to_steal: int = 1,
        worker_id: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile: str | None = None,
        name: str | None = None,
        _wrap_client: Callable[[str, Any], Any] | None = None,
    ) -> None:
        if not 1 <= max_records <= 10_000:
            raise ConfigError("max_records must be between 1 and 10000 (a GetRecords limit)")
        try:
            self._plan = ShardPlan(iterator, at_timestamp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.leases = LeaseSettings(
            lease_duration=lease_duration,
            worker_id=default_worker_id() if worker_id is None else worker_id,
            renewal_interval=lease_renewal_interval,
            max_leases_to_steal=max_leases_to_steal,
        )
        self.worker_id = self.leases.worker_id
        self.stream = stream
        self.app_name = app_name
        self.topic = name or stream
        self.checkpoint_table = checkpoint_table or LeaseTable.default_table(app_name)
        self.create_checkpoint_table = create_checkpoint_table
        self.poll_interval = poll_interval
        self.min_read_interval = min_read_interval
        self.max_records = max_records
        self.shard_refresh_interval = shard_refresh_interval
        self.list_shards_page_size = list_shards_page_size
        self.stats = KinesisSourceStats()
        self._options = AwsOptions(
            endpoint_url=endpoint_url,
            region=region,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            profile=profile,
        )
        self._ddb_options = dataclasses.replace(
            self._options, endpoint_url=checkpoint_endpoint_url or endpoint_url
        )
        self._backoff = Backoff(backoff_base, backoff_cap, max_retries)
        self._wrap_client = _wrap_client
        self._queue: asyncio.Queue[tuple[_ShardRun, RawBatch | _ShardEnd]] = asyncio.Queue(
            queue_batches
        )
        self._held: dict[Shard, deque[tuple[_ShardRun, RawBatch | _ShardEnd]]] = {}
        self._paused: set[Shard] = set()
        self._runs: dict[str, _ShardRun] = {}
        self._leases: dict[str, Lease] = {}  # the leases this worker holds, as last written
        self._written_at: dict[str, float] = {}  # loop time of each held lease's last write
        self._lease_locks: dict[str, asyncio.Lock] = {}
        self._watch = ExpiryWatch(self.leases.lease_duration)
        self._table_failing = False  # the last look at the lease table failed (logged once)
        self._renewals_failing: set[str] = set()  # shards whose last renewal failed (logged)
        # holders of the rows another live process with this worker id wrote (``_met_rival``)
        self._rivals: set[str] = set()
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._kinesis: Any = None
        self._table: LeaseTable | None = None
        self._listener: PartitionListener | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._endpoint = redact_url(endpoint_url) if endpoint_url else "?"

    @property
    def assigned(self) -> list[Shard]:
        """Shards this source reads now (leased and not yet revoked).

        Example:
            >>> KinesisSource("clicks", app_name="demo", region="us-east-1").assigned
            []
        """
        return [Shard(self.stream, s) for s in sorted(self._runs)]

    @property
    def held_leases(self) -> dict[str, Lease]:
        """The leases this worker holds, shard id to ``Lease`` as last written.

        Example:
            >>> KinesisSource("clicks", app_name="demo", region="us-east-1").held_leases
            {}
        """
        return dict(self._leases)

    async def start(self, listener: PartitionListener) -> None:
        """Check the stream and the lease table, take the first leases and start reading."""
        self._listener = listener
        self._stack = contextlib.AsyncExitStack()
        try:
            kinesis = await open_client(self._stack, "kinesis", self._options)
            dynamodb = await open_client(self._stack, "dynamodb", self._ddb_options)
            self._endpoint = endpoint_of(kinesis)
            wrap = self._wrap_client
            self._kinesis = wrap("kinesis", kinesis) if wrap else kinesis
            await check_stream(self._kinesis, self.stream, self._backoff)
            self._table = LeaseTable(
                wrap("dynamodb", dynamodb) if wrap else dynamodb,
                self.checkpoint_table,
                self.stream,
                self.app_name,
                backoff=self._backoff,
                endpoint=endpoint_of(dynamodb),
            )
            await self._table.ensure(create=self.create_checkpoint_table)
            self._plan.update(await self._list_shards())
            ready = asyncio.Event()
            self._runner = asyncio.create_task(self._run(ready), name=f"kinesis:{self.stream}")
            await ready.wait()
            await self._balance()
        except BaseException:
            await self.stop(release=False)
            raise

    async def stop(self, *, release: bool = True) -> None:
        """Stop the readers, release this worker's leases (commit first: stop does not), close.

        ``release=False`` keeps the leases (they expire after ``lease_duration``).
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        if release and self._table is not None and self._stack is not None:
            await self._release_all()  # a row may name this worker with nothing held here
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _release_all(self) -> None:
        """Give up every lease the table shows in this worker's name, written by this process.

        The table says which, not this worker's copies: a write that the stop
        cut off after it reached the table (a renewal or a commit's checkpoint
        moved the counter on, a take made this worker the owner) left a copy
        behind its row, and a release against that copy would be refused, the
        lease held until it expired. A cut-off request may also reach the
        table only after the read: then the release reads the row again.
        """
        table = self._table
        assert table is not None
        self._leases.clear()  # nothing more is written under them
        self._written_at.clear()
        try:
            rows = await table.load()
        except (AsyncflowError, ClientError, BotoCoreError, TimeoutError) as exc:
            log.warning(
                "kinesis %s: could not read the lease table to release the leases of worker "
                "%s (they expire after %.0f s): %s",
                self.stream,
                self.worker_id,
                self.leases.lease_duration,
                describe(exc),
            )
            return

        async def release(seen: Lease) -> None:
            shard_id = seen.shard_id
            async with self._lease_lock(shard_id):
                try:
                    # a request cut off on its way may still reach the table after the read
                    # and move the counter again: _write_held reads the row again then
                    await self._write_held(seen, table.release)
                    self.stats.leases_released += 1
                except LeaseLost:
                    return  # taken meanwhile: nothing to give up
                except (AsyncflowError, ClientError, BotoCoreError, TimeoutError) as exc:
                    log.warning(
                        "kinesis %s: could not release the lease of %s (it expires "
                        "after %.0f s): %s",
                        self.stream,
                        shard_id,
                        self.leases.lease_duration,
                        describe(exc),
                    )

        mine = sorted(  # not the rows another process given this worker id wrote since
            (
                lease
                for lease in rows.values()
                if lease.owner == self.worker_id and lease.holder == table.holder
            ),
            key=lambda lease: lease.shard_id,
        )
        await asyncio.gather(*(release(lease) for lease in mine))
        log.info("kinesis %s: worker %s released its leases", self.stream, self.worker_id)

    def pause(self, partitions: Iterable[Partition]) -> None:
        """Stop handing out (and reading) these shards until ``resume``."""
        for p in partitions:
            if isinstance(p, Shard) and p.stream == self.stream:
                self._paused.add(p)
                run = self._runs.get(p.shard_id)
                if run is not None:
                    run.unpaused.clear()

    def resume(self, partitions: Iterable[Partition]) -> None:
        """Hand out and read these shards again."""
        for p in partitions:
            if isinstance(p, Shard):
                self._paused.discard(p)
                run = self._runs.get(p.shard_id)
                if run is not None:
                    run.unpaused.set()

    async def fetch(self, timeout: float) -> list[RawBatch]:
        """Batches of unpaused shards; ``[]`` after ``timeout`` s without any."""
        self._raise_if_failed()
        out: list[RawBatch] = []
        for shard in [s for s in self._held if s not in self._paused]:
            for item in self._held.pop(shard):
                self._take(item, out)
        if not out and self._queue.empty() and self._runner is not None:
            getter = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait(
                {getter, self._runner}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                self._take(getter.result(), out)
            else:
                getter.cancel()
                self._raise_if_failed()
        for _ in range(self._queue.qsize()):
            self._take(self._queue.get_nowait(), out)
        return out

    async def commit(self, positions: Mapping[Partition, int]) -> None:
        """Checkpoint, per shard, the sequence number of the last processed record, under its lease.

        A shard whose lease another worker took is not checkpointed (the write
        is conditional on the lease): its reader stops and the core is told it
        is lost; ``commit`` returns normally, as the protocol asks.
        """
        if self._table is None:
            raise AsyncflowError("KinesisSource.commit() before start()")
        saves: dict[str, str] = {}
        for p, offset in positions.items():
            if not isinstance(p, Shard) or p.stream != self.stream:
                continue
            run = self._runs.get(p.shard_id)
            if run is None or run.finishing or p.shard_id not in self._leases:
                continue
            run.committed = offset
            if run.end_delivered and run.delivered is not None and offset >= run.delivered:
                saves[p.shard_id] = SHARD_END
            else:
                saves[p.shard_id] = str(offset)
        results = await asyncio.gather(
            *(self._checkpoint(s, c) for s, c in saves.items()), return_exceptions=True
        )
        lost: list[str] = []
        finished: list[Shard] = []
        errors: list[BaseException] = []
        for (shard_id, checkpoint), result in zip(saves.items(), results, strict=True):
            if isinstance(result, LeaseLost):
                lost.append(shard_id)
            elif isinstance(result, BaseException):
                errors.append(result)
            elif checkpoint == SHARD_END:
                finished.append(Shard(self.stream, shard_id))
        if lost:
            self._spawn(self._lose(lost, "a checkpoint was refused"))
        released = []
        for p in finished:
            run = self._runs.get(p.shard_id)
            if run is not None and not run.finishing:
                run.finishing = True
                self._plan.mark_finished(p.shard_id)
                released.append(p)
        if released:
            self._spawn(self._finish(released))
        if errors:
            exc = errors[0]
            if isinstance(exc, AsyncflowError):
                raise exc
            raise AsyncflowError(
                f"could not checkpoint Kinesis shards in {self.checkpoint_table!r}: {describe(exc)}"
            ) from exc

    async def _checkpoint(self, shard_id: str, checkpoint: str) -> None:
        """Write ``checkpoint`` under the held lease; never below what the lease has."""
        table = self._table
        assert table is not None
        async with self._lease_lock(shard_id):
            lease = self._leases.get(shard_id)
            if lease is None:
                raise LeaseLost(shard_id)
            if not _advances(lease.checkpoint, checkpoint):
                return
            sent = asyncio.get_running_loop().time()

            async def write(held: Lease) -> Lease:
                if not _advances(held.checkpoint, checkpoint):
                    return held  # a checkpoint of this worker's it gave up on got there first
                return await table.checkpoint(held, checkpoint)

            try:
                written = await self._write_held(lease, write)
            except LeaseLost:
                self._leases.pop(shard_id, None)  # nothing more is written under it
                self._written_at.pop(shard_id, None)
                raise
            if shard_id in self._leases:
                self._leases[shard_id] = written
                self._written_at[shard_id] = sent

    async def _write_held(
        self, lease: Lease, write: Callable[[Lease], Coroutine[Any, Any, Lease]]
    ) -> Lease:
        """``write(lease)`` under a held lease, past a counter moved by this worker's own writes.

        A renewal or checkpoint this worker gave up on (it timed out, or a stop
        cut it off) may have reached the table all the same, even after a later
        read: the row's counter is then ahead of this worker's copy and the next
        write (a renewal, a checkpoint, a release) is refused. While the row
        still names this worker and was last written by this process
        (``Lease.holder``: another process may have been given the same worker
        id), nobody else took the lease: the write is tried again against the
        row (``HELD_WRITE_ATTEMPTS`` times at most) instead of the lease being
        dropped and its shard left unread until it expires. ``LeaseLost`` once
        the row names another owner or holder, or none.
        """
        table = self._table
        assert table is not None
        for _ in range(HELD_WRITE_ATTEMPTS):
            try:
                return await write(lease)
            except LeaseLost:
                row = await table.get(lease.shard_id)
                if row is None or row.owner != self.worker_id:
                    raise  # taken
                if row.holder != table.holder:
                    self._met_rival(row)
                    raise  # written by another process given this worker id
                lease = row
        raise AsyncflowError(
            f"the lease row of shard {lease.shard_id} changed under each of {HELD_WRITE_ATTEMPTS} "
            "writes in this worker's name"
        )

    def _met_rival(self, row: Lease) -> None:
        """Another live process with this worker id wrote ``row`` after this one took it.

        From now on the rows that process writes are treated as another
        worker's leases (``_pool_view``): taken when they expire or to
        balance, not at once, so the two do not take the shards from each
        other on every look. Said once, as an error: worker ids must differ.
        """
        if row.holder is None or row.holder in self._rivals:
            return
        if not self._rivals:
            log.error(
                "kinesis %s: another process with worker_id %r wrote the lease of %s after this "
                "one took it: give every worker process its own worker_id (or leave it unset); "
                "until then this one treats that process's leases as another worker's",
                self.stream,
                self.worker_id,
                row.shard_id,
            )
        self._rivals.add(row.holder)

    def _pool_view(self, row: Lease) -> Lease:
        """``row`` as the balancing sees it.

        A row in this worker's name that it does not hold is an earlier
        process's (restarted with the same worker_id): nobody's, to take back
        at once; unless a live process with this worker id wrote it
        (``_met_rival``): then it is that process's, as another worker's.
        """
        if row.owner != self.worker_id or row.shard_id in self._leases:
            return row
        if row.holder is not None and row.holder in self._rivals:
            return dataclasses.replace(row, owner=f"{row.owner} (process {row.holder})")
        return dataclasses.replace(row, owner=None)

    def _lease_lock(self, shard_id: str) -> asyncio.Lock:
        lock = self._lease_locks.get(shard_id)
        if lock is None:
            lock = self._lease_locks[shard_id] = asyncio.Lock()
        return lock

    def _raise_if_failed(self) -> None:
        runner = self._runner
        if runner is None or not runner.done() or runner.cancelled():
            return
        exc = runner.exception()
        if exc is None:
            return
        if isinstance(exc, BaseExceptionGroup):
            exc = first_error(exc)
        if isinstance(exc, AsyncflowError):
            raise exc
        raise AsyncflowError(f"Kinesis source {self.stream!r} failed: {describe(exc)}") from exc

    def _take(self, entry: tuple[_ShardRun, RawBatch | _ShardEnd], out: list[RawBatch]) -> None:
        run, item = entry
        shard = item.partition
        assert isinstance(shard, Shard)
        if self._runs.get(shard.shard_id) is not run:
            return  # read under a lease since lost: its new owner reads it again
        if shard in self._paused or shard in self._held:
            self._held.setdefault(shard, deque()).append(entry)
            return
        if isinstance(item, RawBatch):
            run.delivered = item.records[-1].offset
            out.append(item)
            return
        run.end_delivered = True
        self._plan.mark_delivered(shard.shard_id)
        self._spawn(self._after_end(shard))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        runner = self._runner
        if self._tg is None or runner is None or runner.done():
            coro.close()  # stopping or failed: nothing more to start
            return None
        try:
            return self._tg.create_task(coro)
        except RuntimeError:  # the group is shutting down after a failure
            coro.close()
            return None

    async def _run(self, ready: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            ready.set()
            if self.shard_refresh_interval > 0:
                tg.create_task(self._refresh_loop())
            # renewing apart from taking: a take waits on the core (on_assigned restores
            # state, which may take longer than a lease lasts) and must not stall renewals
            tg.create_task(self._renew_loop())
            tg.create_task(self._take_loop())
            await asyncio.get_running_loop().create_future()  # until stop() cancels

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.shard_refresh_interval)
            async with self._lock:
                self._plan.update(await self._list_shards())
            # new shards are taken at the taking task's next look

    async def _renew_loop(self) -> None:
        """Renew the leases held every ``lease_renewal_interval`` s, whatever else waits."""
        while True:
            await asyncio.sleep(self.leases.renew_every)
            await self._renew()

    async def _take_loop(self) -> None:
        """Look at the table every ``lease_renewal_interval`` s and take what is due.

        A lease table that stays unreachable or failing (retries exhausted) is
        logged once and tried again at the next look: meanwhile renewals fail
        too, so this worker stops reading its shards once their leases could
        have expired, and takes them again when the table answers.
        """
        while True:
            await asyncio.sleep(self.leases.renew_every)
            await self._look()

    async def _look(self) -> None:
        """``_balance``, with a failing lease table logged (once) instead of raised."""
        try:
            await self._balance()
        except (CheckpointError, AwsUnavailable) as exc:
            if not self._table_failing:
                log.warning(
                    "kinesis %s: worker %s cannot read the lease table %r: %s; its "
                    "leases lapse after %.1f s without renewal, and it tries again every "
                    "%.1f s",
                    self.stream,
                    self.worker_id,
                    self.checkpoint_table,
                    describe(exc),
                    self.leases.lease_duration,
                    self.leases.renew_every,
                )
            self._table_failing = True
            return
        if self._table_failing:
            log.warning(
                "kinesis %s: worker %s reads the lease table %r again",
                self.stream,
                self.worker_id,
                self.checkpoint_table,
            )
            self._table_failing = False

    async def _renew(self) -> None:
        table = self._table
        assert table is not None
        loop = asyncio.get_running_loop()
        lost: list[str] = []

        async def renew(shard_id: str) -> None:
            async with self._lease_lock(shard_id):
                lease = self._leases.get(shard_id)
                if lease is None:
                    return
                sent = loop.time()  # the lease lasts from the write's start, not its answer
                try:
                    written = await self._write_held(lease, table.renew)
                except LeaseLost:
                    # no checkpoint is tried under it from now on; the reader stops below
                    self._leases.pop(shard_id, None)
                    self._written_at.pop(shard_id, None)
                    lost.append(shard_id)
                    return
                except AwsCredentialsError:
                    raise
                except (AsyncflowError, ClientError, BotoCoreError, TimeoutError) as exc:
                    # not renewed: once a whole lease duration passed since the last write,
                    # another worker may have taken it, so this one stops reading it
                    age = loop.time() - self._written_at.get(shard_id, 0.0)
                    if age >= self.leases.lease_duration:
                        self._leases.pop(shard_id, None)
                        self._written_at.pop(shard_id, None)
                        lost.append(shard_id)
                    if shard_id not in self._renewals_failing:  # once, not every interval
                        self._renewals_failing.add(shard_id)
                        log.warning(
                            "kinesis %s: renewing the lease of %s failed: %s (trying again "
                            "every %.1f s; it lapses %.1f s after the last renewal)",
                            self.stream,
                            shard_id,
                            describe(exc),
                            self.leases.renew_every,
                            self.leases.lease_duration,
                        )
                    return
                self._renewals_failing.discard(shard_id)
                if shard_id in self._leases:
                    self._leases[shard_id] = written
                    self._written_at[shard_id] = sent

        await asyncio.gather(*(renew(s) for s in sorted(self._leases)))
        if lost:
            # in its own task: a take in progress holds the lock while the core assigns
            self._spawn(self._lose(lost, "its renewal was refused or late"))

    async def _balance(self) -> None:
        """Read the lease table, note what others hold, take expired or fair-share leases."""
        table = self._table
        assert table is not None
        async with self._lock:
            rows = await table.load()
            if await table.add_missing(self._plan.shards.values(), rows):
                rows = await table.load()
            loop = asyncio.get_running_loop()
            now = loop.time()
            self._watch.observe(rows.values(), now)
            self._plan.set_checkpoints(
                {s: lease.checkpoint for s, lease in rows.items() if lease.checkpoint is not None}
            )
            # a lease held here that the table shows with another owner (or written by another
            # process given this worker id) was taken
            gone = [
                s
                for s in self._leases
                if s in rows and (rows[s].owner, rows[s].holder) != (self.worker_id, table.holder)
            ]
            for s in gone:
                if rows[s].owner == self.worker_id:
                    self._met_rival(rows[s])
            if gone:
                await self._lose_locked(gone, "another worker took it")
            ready = set(self._plan.ready())
            eligible = ready | set(self._leases)
            pool = [self._pool_view(rows[s]) for s in sorted(eligible) if s in rows]
            # a view that is nobody's is free; the others expire as their rows in the table do
            # (the watch saw the rows, not a rival's view of one)
            expired = {
                v.shard_id
                for v in pool
                if v.owner is None or self._watch.is_expired(rows[v.shard_id], now)
            }
            wanted = leases_to_take(
                pool,
                self.worker_id,
                expired=expired,
                eligible=eligible,
                max_leases_to_steal=self.leases.max_leases_to_steal,
            )
            taken: list[Lease] = []
            failure: CheckpointError | AwsUnavailable | None = None
            for shard_id in wanted:
                if shard_id not in ready:
                    continue
                row = rows[shard_id]
                sent = loop.time()
                try:
                    lease = await table.take(row, self.worker_id)
                except LeaseLost:
                    continue  # another worker was first
                except (CheckpointError, AwsUnavailable) as exc:
                    failure = exc  # what was taken before is read all the same
                    break
                if row.owner not in (None, self.worker_id):
                    how = "expired" if self._watch.is_expired(row, now) else "to balance"
                    log.info(
                        "kinesis %s: worker %s took %s from %s (%s)",
                        self.stream,
                        self.worker_id,
                        shard_id,
                        row.owner,
                        how,
                    )
                self._leases[shard_id] = lease
                self._written_at[shard_id] = sent
                self.stats.leases_taken += 1
                taken.append(lease)
            if taken:
                await self._start_reading(taken)
            if failure is not None:
                raise failure

    async def _start_reading(self, taken: list[Lease]) -> None:
        shards = []
        for lease in taken:
            shard_id = lease.shard_id
            if lease.checkpoint is not None:
                self._plan.checkpoints[shard_id] = lease.checkpoint
            self._plan.mark_reading(shard_id)
            run = self._runs[shard_id] = _ShardRun()
            run.unpaused.set()
            shards.append(Shard(self.stream, shard_id))
        log.info(
            "kinesis %s: worker %s took the leases of %s",
            self.stream,
            self.worker_id,
            ", ".join(s.shard_id for s in shards),
        )
        assert self._listener is not None
        await self._listener.on_assigned(shards)
        for shard in shards:
            started = self._runs.get(shard.shard_id)
            if started is None:
                continue
            if shard in self._paused:
                started.unpaused.clear()
            started.task = self._spawn(self._read(shard, started))

    async def _lose(self, shard_ids: list[str], why: str) -> None:
        async with self._lock:
            await self._lose_locked(shard_ids, why)

    async def _lose_locked(self, shard_ids: list[str], why: str) -> None:
        """Stop reading shards whose lease is gone and tell the core they are lost."""
        lost = []
        for shard_id in shard_ids:
            self._leases.pop(shard_id, None)
            self._written_at.pop(shard_id, None)
            self._renewals_failing.discard(shard_id)
            run = self._runs.pop(shard_id, None)
            if run is None:
                continue
            if run.task is not None:
                run.task.cancel()
            shard = Shard(self.stream, shard_id)
            self._held.pop(shard, None)
            self._paused.discard(shard)
            self._plan.mark_released(shard_id)
            self.stats.leases_lost += 1
            lost.append(shard)
        if not lost:
            return
        log.warning(
            "kinesis %s: worker %s lost the leases of %s (%s); stopped reading them",
            self.stream,
            self.worker_id,
            ", ".join(s.shard_id for s in lost),
            why,
        )
        assert self._listener is not None
        on_lost = getattr(self._listener, "on_lost", None)
        if on_lost is not None:
            await on_lost(lost)
        else:
            await self._listener.on_revoked(lost)

    async def _after_end(self, shard: Shard) -> None:
        run = self._runs.get(shard.shard_id)
        done = run is not None and (
            run.delivered is None or (run.committed is not None and run.committed >= run.delivered)
        )
        if run is not None and done and not run.finishing:
            try:
                await self._checkpoint(shard.shard_id, SHARD_END)
            except LeaseLost:
                await self._lose([shard.shard_id], "the SHARD_END checkpoint was refused")
                return
            run.finishing = True
            self._plan.mark_finished(shard.shard_id)
            await self._finish([shard])

    async def _finish(self, shards: list[Shard]) -> None:
        """Shards checkpointed at ``SHARD_END``: revoke them, let their leases go, take children."""
        assert self._listener is not None and self._table is not None
        await self._listener.on_revoked(shards)
        for shard in shards:
            self._runs.pop(shard.shard_id, None)
            self._paused.discard(shard)
            self.stats.shards_finished += 1
            async with self._lease_lock(shard.shard_id):
                lease = self._leases.pop(shard.shard_id, None)
                self._written_at.pop(shard.shard_id, None)
                if lease is not None:
                    with contextlib.suppress(LeaseLost):
                        await self._table.release(lease)
        log.info("kinesis %s: finished shards %s", self.stream, [s.shard_id for s in shards])
        async with self._lock:  # the children, if the listing did not have them yet
            self._plan.update(await self._list_shards())
        await self._look()

    async def _call(self, op: str, what: str, **kwargs: Any) -> Any:
        return await call_with_retry(
            getattr(self._kinesis, op),
            backoff=self._backoff,
            service="kinesis",
            endpoint=self._endpoint,
            what=what,
            fail=AsyncflowError,
            **kwargs,
        )

    async def _list_shards(self) -> list[ShardInfo]:
        return await list_shards(
            self._kinesis, self.stream, self._backoff, page_size=self.list_shards_page_size
        )

    async def _iterator(self, shard_id: str, position: Position) -> str | None:
        try:
            response = await self._call(
                "get_shard_iterator",
                f"GetShardIterator of {shard_id}",
                StreamName=self.stream,
                ShardId=shard_id,
                **position.kwargs(),
            )
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":  # trimmed away meanwhile
                log.warning("kinesis %s: shard %s no longer exists", self.stream, shard_id)
                return None
            raise
        return str(response["ShardIterator"]) if response.get("ShardIterator") else None

    def _batch(self, shard: Shard, records: list[Any]) -> RawBatch:
        out = []
        for r in records:
            arrived = r.get("ApproximateArrivalTimestamp")
            out.append(
                Record(
                    offset=int(r["SequenceNumber"]),
                    key=r["PartitionKey"].encode(),
                    value=r["Data"],
                    timestamp=int(arrived.timestamp() * 1000) if arrived is not None else None,
                )
            )
        self.stats.records += len(out)
        self.stats.batches += 1
        return RawBatch(self.topic, shard, out)

    async def _read(self, shard: Shard, run: _ShardRun) -> None:
        shard_id = shard.shard_id
        position = self._plan.position(shard_id)
        run.last_read = position.sequence
        # Renewing an expired iterator: after the last record read; with nothing read yet,
        # LATEST again could skip what arrived meanwhile, so from when LATEST was taken.
        renew = position
        if position.kind == "LATEST":
            renew = Position("AT_TIMESTAMP", timestamp=datetime.now(UTC))
        iterator = await self._iterator(shard_id, position)
        failures = 0
        while iterator is not None:
            await run.unpaused.wait()
            try:
                resp = await self._kinesis.get_records(
                    ShardIterator=iterator, Limit=self.max_records
                )
            except (ClientError, BotoCoreError, TimeoutError) as exc:
                code = error_code(exc)
                if code == "ExpiredIteratorException":
                    self.stats.iterators_renewed += 1
                    after = Position("AFTER_SEQUENCE_NUMBER", run.last_read)
                    iterator = await self._iterator(shard_id, after if run.last_read else renew)
                    continue
                creds = credentials_problem(exc, "kinesis", self._endpoint)
                if creds is not None:
                    raise creds from exc
                throttled = code in THROTTLING_CODES
                if not is_retryable(exc) or (
                    not throttled and failures >= self._backoff.max_retries
                ):
                    if is_unreachable(exc):
                        raise AwsUnavailable("kinesis", self._endpoint, describe(exc)) from exc
                    raise AsyncflowError(
                        f"reading shard {shard_id} of Kinesis stream {self.stream!r} failed: "
                        f"{describe(exc)}"
                    ) from exc
                self.stats.throttled += throttled
                if failures == self._backoff.max_retries:
                    log.warning("kinesis %s: shard %s still throttled", self.stream, shard_id)
                await self._backoff.sleep(failures)
                failures += 1
                continue
            failures = 0
            records = resp.get("Records") or []
            if records:
                run.last_read = records[-1]["SequenceNumber"]
                await self._queue.put((run, self._batch(shard, records)))
            iterator = resp.get("NextShardIterator")
            if read_to_end(self._plan.info(shard_id), run.last_read, resp):
                break
            behind = records and int(resp.get("MillisBehindLatest", 0)) > 0
            await asyncio.sleep(self.min_read_interval if behind else self.poll_interval)
        log.info("kinesis %s: shard %s read to its end", self.stream, shard_id)
        await self._queue.put((run, _ShardEnd(shard)))


def _advances(current: str | None, new: str) -> bool:
    """Whether checkpoint ``new`` is beyond ``current`` (``SHARD_END`` is beyond everything).

    Example:
        >>> _advances(None, "5"), _advances("7", "5"), _advances("7", SHARD_END)
        (True, False, True)
    """
    if current is None:
        return True
    if current == SHARD_END:
        return False
    if new == SHARD_END:
        return True
    try:
        return int(new) > int(current)
    except ValueError:  # a sentinel of another library (TRIM_HORIZON...): ours wins
        return True
