"""Kinesis source: one reader task per shard, checkpoints in DynamoDB, resharding followed.

The source owns an ``asyncio.TaskGroup`` (in a runner task started by
``start``) holding one reader per shard and a shard-discovery loop. Readers put
one ``RawBatch`` per ``GetRecords`` answer on a bounded queue that ``fetch``
drains, so a slow core slows the readers down (and a paused shard's reader
stops calling ``GetRecords``). A child shard starts only after its parents were
read to the end and their last batches were handed out by ``fetch``: per-key
order holds across a split or a merge. ``commit`` stores the acked sequence
number per shard (``SHARD_END`` once a closed shard is fully processed, after
which the shard is revoked); a restart resumes ``AFTER_SEQUENCE_NUMBER``.

Example:
    >>> src = KinesisSource("clicks", app_name="sessions", region="us-east-1")
    >>> (src.topic, src.checkpoint_table)
    ('clicks', 'sessions-kinesis-checkpoints')
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
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
from .kinesis_checkpoints import CheckpointStore
from .kinesis_shards import SHARD_END, Position, Shard, ShardInfo, ShardPlan
from .kinesis_stream import check_stream, list_shards

log = logging.getLogger("adapters.kinesis")


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


@dataclass(slots=True)
class _ShardEnd:
    partition: Shard


@dataclass(slots=True)
class _ShardRun:
    """What this worker knows about a shard it reads."""

    unpaused: asyncio.Event = field(default_factory=asyncio.Event)
    last_read: str | None = None  # sequence number of the last record read (iterator renewal)
    delivered: int | None = None  # offset of the last record handed out by fetch
    committed: int | None = None
    end_delivered: bool = False
    finishing: bool = False


class KinesisSource:
    """Read a Kinesis stream: partitions are ``Shard(stream, shard_id)``, offsets sequence numbers.

    ``iterator`` is where shards without a checkpoint start (``TRIM_HORIZON``,
    ``LATEST`` or ``AT_TIMESTAMP`` with ``at_timestamp``). Checkpoints live in
    the DynamoDB table ``checkpoint_table`` (default ``<app_name>-kinesis-checkpoints``),
    created if missing when ``create_checkpoint_table``. Each shard is read at
    most every ``min_read_interval`` s (Kinesis allows 5 reads/s per shard), every
    ``poll_interval`` s once caught up; throttling is retried with jittered
    backoff, an expired iterator is renewed after the last sequence number read.
    One worker per (app_name, stream): there is no lease balancing between workers.
    ``_wrap_client(service, client)`` is a testing hook to inject failures.

    Example:
        >>> src = KinesisSource("clicks", app_name="demo", iterator="LATEST",
        ...                     endpoint_url="http://127.0.0.1:5000", region="us-east-1")
        >>> src.stream
        'clicks'
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
        self.stream = stream
        self.app_name = app_name
        self.topic = name or stream
        self.checkpoint_table = checkpoint_table or CheckpointStore.default_table(app_name)
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
        self._queue: asyncio.Queue[RawBatch | _ShardEnd] = asyncio.Queue(queue_batches)
        self._held: dict[Shard, deque[RawBatch | _ShardEnd]] = {}
        self._paused: set[Shard] = set()
        self._runs: dict[str, _ShardRun] = {}
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._kinesis: Any = None
        self._store: CheckpointStore | None = None
        self._listener: PartitionListener | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._endpoint = redact_url(endpoint_url) if endpoint_url else "?"

    @property
    def assigned(self) -> list[Shard]:
        """Shards this source reads now (assigned and not yet revoked)."""
        return [Shard(self.stream, s) for s in sorted(self._runs)]

    async def start(self, listener: PartitionListener) -> None:
        """Check the stream, load checkpoints, assign the first shards and start reading."""
        self._listener = listener
        self._stack = contextlib.AsyncExitStack()
        try:
            kinesis = await open_client(self._stack, "kinesis", self._options)
            dynamodb = await open_client(self._stack, "dynamodb", self._ddb_options)
            self._endpoint = endpoint_of(kinesis)
            wrap = self._wrap_client
            self._kinesis = wrap("kinesis", kinesis) if wrap else kinesis
            await check_stream(self._kinesis, self.stream, self._backoff)
            self._store = CheckpointStore(
                wrap("dynamodb", dynamodb) if wrap else dynamodb,
                self.checkpoint_table,
                self.stream,
                self.app_name,
                backoff=self._backoff,
                endpoint=endpoint_of(dynamodb),
            )
            await self._store.ensure(create=self.create_checkpoint_table)
            self._plan.set_checkpoints(await self._store.load())
            self._plan.update(await self._list_shards())
            ready = asyncio.Event()
            self._runner = asyncio.create_task(self._run(ready), name=f"kinesis:{self.stream}")
            await ready.wait()
            await self._advance(refresh=False)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the readers and close the clients (commit first: stop does not)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

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
        """Checkpoint, per shard, the sequence number of the last processed record."""
        if self._store is None:
            raise AsyncflowError("KinesisSource.commit() before start()")
        saves: dict[str, str] = {}
        finished: list[Shard] = []
        for p, offset in positions.items():
            if not isinstance(p, Shard) or p.stream != self.stream:
                continue
            run = self._runs.get(p.shard_id)
            if run is None or run.finishing:
                continue
            run.committed = offset
            if run.end_delivered and run.delivered is not None and offset >= run.delivered:
                saves[p.shard_id] = SHARD_END
                finished.append(p)
            else:
                saves[p.shard_id] = str(offset)
        await self._store.save(saves)
        released = []
        for p in finished:
            run = self._runs.get(p.shard_id)
            if run is not None and not run.finishing:
                run.finishing = True
                self._plan.mark_finished(p.shard_id)
                released.append(p)
        if released:
            self._spawn(self._release(released))

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

    def _take(self, item: RawBatch | _ShardEnd, out: list[RawBatch]) -> None:
        shard = item.partition
        assert isinstance(shard, Shard)
        if shard in self._paused or shard in self._held:
            self._held.setdefault(shard, deque()).append(item)
            return
        run = self._runs[shard.shard_id]
        if isinstance(item, RawBatch):
            run.delivered = item.records[-1].offset
            out.append(item)
            return
        run.end_delivered = True
        self._plan.mark_delivered(shard.shard_id)
        self._spawn(self._after_end(shard))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        runner = self._runner
        if self._tg is None or runner is None or runner.done():
            coro.close()  # stopping or failed: nothing more to start
            return
        try:
            self._tg.create_task(coro)
        except RuntimeError:  # the group is shutting down after a failure
            coro.close()

    async def _run(self, ready: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            ready.set()
            if self.shard_refresh_interval > 0:
                tg.create_task(self._refresh_loop())
            await asyncio.get_running_loop().create_future()  # until stop() cancels

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.shard_refresh_interval)
            await self._advance(refresh=True)

    async def _advance(self, *, refresh: bool) -> None:
        """Start reading every shard that became ready (parents done, or new)."""
        async with self._lock:
            if refresh:
                self._plan.update(await self._list_shards())
            ready = self._plan.ready()
            if not ready:
                return
            for shard_id in ready:
                self._plan.mark_reading(shard_id)
                run = self._runs[shard_id] = _ShardRun()
                run.unpaused.set()
            shards = [Shard(self.stream, s) for s in ready]
            log.info("kinesis %s: reading shards %s", self.stream, ", ".join(ready))
            assert self._listener is not None
            await self._listener.on_assigned(shards)
            for shard in shards:
                if shard in self._paused:
                    self._runs[shard.shard_id].unpaused.clear()
                self._spawn(self._read(shard))

    async def _after_end(self, shard: Shard) -> None:
        run = self._runs.get(shard.shard_id)
        done = run is not None and (
            run.delivered is None or (run.committed is not None and run.committed >= run.delivered)
        )
        if run is not None and done and not run.finishing:
            run.finishing = True
            assert self._store is not None
            await self._store.save({shard.shard_id: SHARD_END})
            self._plan.mark_finished(shard.shard_id)
            await self._release([shard])
        await self._advance(refresh=True)

    async def _release(self, shards: list[Shard]) -> None:
        assert self._listener is not None
        await self._listener.on_revoked(shards)
        for shard in shards:
            self._runs.pop(shard.shard_id, None)
            self._paused.discard(shard)
            self.stats.shards_finished += 1
        log.info("kinesis %s: finished shards %s", self.stream, [s.shard_id for s in shards])

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

    def _at_end(self, shard_id: str, run: _ShardRun, records: list[Any], resp: Any) -> bool:
        """A closed shard read to its ``EndingSequenceNumber`` (moto never drops the iterator)."""
        info = self._plan.info(shard_id)
        if info.ending_sequence is None:
            return False
        if run.last_read is not None and int(run.last_read) >= int(info.ending_sequence):
            return True
        return not records and int(resp.get("MillisBehindLatest", 0)) == 0

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

    async def _read(self, shard: Shard) -> None:
        shard_id = shard.shard_id
        run = self._runs[shard_id]
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
                await self._queue.put(self._batch(shard, records))
            iterator = resp.get("NextShardIterator")
            if iterator is None or self._at_end(shard_id, run, records, resp):
                break
            behind = records and int(resp.get("MillisBehindLatest", 0)) > 0
            await asyncio.sleep(self.min_read_interval if behind else self.poll_interval)
        log.info("kinesis %s: shard %s read to its end", self.stream, shard_id)
        await self._queue.put(_ShardEnd(shard))
