"""Batching in front of a sink: buffer, write as soon as the sink is free, flush on demand.

A ``SinkWriter`` takes records one at a time and hands them to the sink in
batches. Batches adapt to the load: the writer writes what it holds as soon
as the previous write is done (after one turn of the event loop, so every lane
with events adds its outputs first), so a thin stream goes out at once and a
backlog gathers into large batches while a write is in flight, up to
``max_batch``. A sink's ``linger`` (seconds, default 0) makes the writer wait
that long for a fuller batch instead. ``flush`` returns once everything added before it was called is
durable: a checkpoint flushes every writer before it commits offsets. When the
buffer is over its bound, ``send`` waits: a slow sink slows its lanes, which
fill their queues, which pause the source. A sink that fails after its retries
raises out of ``run`` and stops the worker; no checkpoint covers what it held.
Records a write returns as ``Rejected`` (refused for what they are) go to
``on_rejected`` (the runtime's dead-letter output) before the write counts as
done, so a flush that returns has them in the dead-letter writer's buffer; a
writer without ``on_rejected`` fails as it would on an error.

A sink that can pipeline (it has ``submit``: hand records to its client in
order, return an awaitable of their acknowledgement) gets the next batch
while the previous one is still unacknowledged, up to ``PIPELINE_DEPTH``
writes in flight: their records reach the client in the order they were
sent, and they count as written (``flush``) in that order, each once
acknowledged. A plain ``write`` keeps one write in flight.

Example:
    >>> import asyncio
    >>> from asyncflow.protocols import SinkRecord
    >>> class Print:
    ...     name = "print"
    ...     async def start(self): pass
    ...     async def write(self, records): print([r.value for r in records])
    ...     async def stop(self): pass
    >>> async def demo():
    ...     w = SinkWriter(Print())
    ...     async with asyncio.TaskGroup() as tg:
    ...         tg.create_task(w.run())
    ...         await w.send(SinkRecord(None, 1))
    ...         await w.flush()
    ...         w.close()
    >>> asyncio.run(demo())
    [1]
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from operator import attrgetter
from typing import Any

from asyncflow.errors import SinkError
from asyncflow.metrics import Metrics
from asyncflow.observe.traces import carry_traceparent, start_write_span
from asyncflow.protocols import Rejected, Sink, SinkRecord

log = logging.getLogger("asyncflow.sink")

PIPELINE_DEPTH = 2
"""Writes a pipelining sink (one with ``submit``) may have unacknowledged at once.

Two keep the client busy: one batch waits for its acknowledgement while the
next is handed over (measured on Kafka: the lanes waited for the writer's
buffer 15-20 times per 500,000 events with one write in flight, 0-5 with two).
"""


class SinkWriter:
    """Buffers records for one sink and writes them in batches."""

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics | None = None,
        *,
        max_batch: int | None = None,
        linger: float | None = None,
        max_buffer: int | None = None,
    ) -> None:
        self.sink = sink
        self.name: str = getattr(sink, "name", type(sink).__name__)
        self.max_batch: int = max_batch or int(getattr(sink, "max_batch", 500))
        self.linger: float = float(linger if linger is not None else getattr(sink, "linger", 0.0))
        self.max_buffer = max_buffer or max(4 * self.max_batch, 1000)
        self.metrics = metrics or Metrics()
        self._records: list[SinkRecord] = []
        self._senders: tuple[Callable[..., Awaitable[Any]], Callable[[SinkRecord], Awaitable[Any]],
                             Callable[[list[SinkRecord]], None]] | None = None
        """``value_sender``, ``record_sender`` and what resets their count (``_reset_senders``)."""
        self._first_at = 0.0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ready: Awaitable[Any] = _done_future()
        self._room_waiter = _RoomWaiter(self._room)
        self._flush_now = False
        self._closed = False
        self._taken = 0  # records moved out of the buffer to be written
        self._written = 0
        self._progress = asyncio.Event()
        self._failed: BaseException | None = None
        self.on_rejected: Callable[[SinkWriter, SinkRecord, str], None] | None = None
        """Where records the sink refuses go (the runtime sets it to its dead-letter output)."""
        self.rejected = 0
        """Records the sink refused so far."""
        self._write_seconds = self.metrics.histogram("sink_write_seconds", (self.name,))
        self._tracer: Any = None
        self._submit: Callable[[list[SinkRecord]], Awaitable[Awaitable[Any]]] | None = getattr(
            sink, "submit", None)
        # submitted writes not yet acknowledged, oldest first: (records, acknowledgement,
        # when submitted, span); the settler (a task of ``run``) awaits them in order
        self._in_flight: deque[tuple[list[SinkRecord], Awaitable[Any], float, Any]] = deque()
        self._settler: asyncio.Task[None] | None = None
        self._submitted = asyncio.Event()  # a write joined _in_flight, or run is finishing
        self._slot = asyncio.Event()  # a write left _in_flight (or the writer failed)
        self._finishing = False

    @property
    def tracer(self) -> Any:
        """An OpenTelemetry tracer (``asyncflow.observe.traces``) or ``None``: no spans.

        Setting one makes the senders check their next record (each then carries its trace).
        """
        return self._tracer

    @tracer.setter
    def tracer(self, tracer: Any) -> None:
        self._tracer = tracer
        self._reset_senders()

    @property
    def buffered(self) -> int:
        """Records waiting to be written."""
        return len(self._records)

    def add(self, record: SinkRecord) -> None:
        """Buffer a record (never waits; see ``send``)."""
        self.push(record)

    def push(self, record: SinkRecord) -> Awaitable[Any]:
        """Buffer a record; awaiting the result waits while the buffer is full.

        What ``Output.send`` returns: while there is room, an awaitable that
        is already done (no coroutine per record).
        """
        self._reset_senders()
        if self._failed is not None:
            raise SinkError(f"sink {self.name} failed earlier: {self._failed}")
        if self.tracer is not None:
            carry_traceparent(record)
        records = self._records
        if not records:
            self._first_at = time.monotonic()
            self._wake.set()
        records.append(record)
        n = len(records)
        if n < self.max_batch:
            return self._ready
        return self._past_batch(n)

    def push_value(
        self, key: Any, value: Any, headers: Sequence[tuple[str, bytes]] = ()
    ) -> Awaitable[Any]:
        """``push(SinkRecord(key, value, None, headers))`` in one call (the slow cases through it).

        What a ``value_sender`` calls for each record it does not append by itself.
        """
        records = self._records
        if not records or self._failed is not None or self.tracer is not None:
            return self.push(SinkRecord(key, value, None, headers))
        self._reset_senders()
        records.append(SinkRecord(key, value, None, headers))
        n = len(records)
        if n != self.max_batch and n < self.max_buffer:
            return self._ready
        return self._past_batch(n)

    def value_sender(self) -> Callable[..., Awaitable[Any]]:
        """``send(key, value, headers=())``: ``push_value``, with most records only appended.

        A sink output's ``send`` while the app runs. Of the records a lane
        sends, only some need ``push``'s checks: the first of a batch (the
        writer starts to linger), the one that fills a batch (the writer
        wakes), those past ``max_buffer`` (the lane waits), and any after a
        failure or with a tracer. After each checked record the
        sender counts how many may follow before the next of those
        (``_unchecked``) and appends that many without a check: one Python
        call per record, with no attribute read. The writer's senders (this and
        ``record_sender``, the same functions for every output it serves) share
        that count. Anything else that changes the buffer (``push``,
        ``add_many``, a write taking it, a failure) resets it first (the count
        to none, the senders' buffer to the writer's), so the next record is
        checked again.

        Example:
            >>> import asyncio
            >>> from asyncflow.testing import CaptureSink
            >>> async def demo():
            ...     w = SinkWriter(CaptureSink("out"), max_batch=2, max_buffer=3)
            ...     send = w.value_sender()
            ...     full = []
            ...     for v in range(4):
            ...         send(None, v)
            ...         full.append(w.full)
            ...     return w.buffered, full
            >>> asyncio.run(demo())
            (4, [False, False, True, True])
        """
        return self._counted_senders()[0]  # the same for every output of this writer

    def record_sender(self) -> Callable[[SinkRecord], Awaitable[Any]]:
        """``send(record)``: ``push``, with most records only appended (see ``value_sender``).

        A topic output's ``send`` while the app runs hands it the encoded record.

        Example:
            >>> import asyncio
            >>> from asyncflow.testing import CaptureSink
            >>> async def demo():
            ...     w = SinkWriter(CaptureSink("out"), max_batch=2, max_buffer=3)
            ...     send = w.record_sender()
            ...     return [send(SinkRecord(b"k", b"v", "t")) is not None for _ in range(3)], w.full
            >>> asyncio.run(demo())
            ([True, True, True], True)
        """
        return self._counted_senders()[1]

    def _counted_senders(
        self,
    ) -> tuple[Callable[..., Awaitable[Any]], Callable[[SinkRecord], Awaitable[Any]]]:
        """The writer's ``value_sender`` and ``record_sender``, made once: they share one count."""
        if self._senders is not None:
            return self._senders[0], self._senders[1]
        records = self._records
        ready = self._ready
        record = SinkRecord
        push_value, push = self.push_value, self.push
        unchecked = self._unchecked
        left = 0  # records to append before the next checked one

        def send_value(
            key: Any, value: Any, headers: Sequence[tuple[str, bytes]] = ()
        ) -> Awaitable[Any]:
            nonlocal left
            if left:
                left -= 1
                records.append(record(key, value, None, headers))
                return ready
            sent = push_value(key, value, headers)  # resets the count first
            left = unchecked()
            return sent

        def send_record(rec: SinkRecord) -> Awaitable[Any]:
            nonlocal left
            if left:
                left -= 1
                records.append(rec)
                return ready
            sent = push(rec)  # resets the count first
            left = unchecked()
            return sent

        def reset(buffer: list[SinkRecord]) -> None:
            nonlocal left, records
            left = 0
            records = buffer

        self._senders = (send_value, send_record, reset)
        return send_value, send_record

    def _unchecked(self) -> int:
        """How many records may be appended before the next that needs ``push``'s checks."""
        if self._failed is not None or self.tracer is not None:
            return 0
        n = len(self._records)
        if not n:
            return 0
        next_checked = self.max_buffer
        if n < self.max_batch < next_checked:
            next_checked = self.max_batch
        return max(0, next_checked - 1 - n)

    def _reset_senders(self) -> None:
        """The senders' next record is checked (the buffer changed other than through them)."""
        senders = self._senders
        if senders is not None:
            senders[2](self._records)

    def _past_batch(self, n: int) -> Awaitable[Any]:
        """``push`` once the buffer holds a batch: wake the writer, wait when over the bound."""
        if n == self.max_batch:
            self._wake.set()  # once: a full batch is ready (the writer takes all there is)
        if n < self.max_buffer:
            return self._ready
        self._room.clear()
        return self._room_waiter

    def push_many(self, records: list[SinkRecord]) -> Awaitable[Any]:
        """Buffer many records; awaiting the result waits while the buffer is full."""
        self.add_many(records)
        if self._room.is_set():
            return self._ready
        return self._room_waiter

    def add_many(self, records: list[SinkRecord]) -> None:
        """Buffer many records at once (never waits; see ``send``)."""
        self._reset_senders()
        if self._failed is not None:
            raise SinkError(f"sink {self.name} failed earlier: {self._failed}")
        if not records:
            return
        if self.tracer is not None:
            for record in records:
                carry_traceparent(record)
        buffered = self._records
        if not buffered:
            self._first_at = time.monotonic()
            self._wake.set()
        buffered.extend(records)
        n = len(buffered)
        if n >= self.max_batch:
            self._wake.set()
        if n >= self.max_buffer:
            self._room.clear()

    @property
    def full(self) -> bool:
        """Whether the buffer is over its bound (``send`` would wait)."""
        return not self._room.is_set()

    async def wait_for_room(self) -> None:
        """Wait while the buffer is over its bound (a writer that failed or stopped has room)."""
        await self._room.wait()

    async def send(self, record: SinkRecord) -> None:
        """Buffer a record, waiting first while the buffer is full."""
        if not self._room.is_set():
            await self._room.wait()
        self.add(record)

    async def flush(self) -> None:
        """Write everything buffered now and wait until it is durable.

        Records added after the call are not waited for, so a flush ends even
        while other lanes keep sending.
        """
        target = self._taken + len(self._records)  # everything added so far
        while self._written < target and self._failed is None:
            self._flush_now = True
            self._wake.set()
            self._progress.clear()
            await self._progress.wait()
        if self._failed is not None:
            raise SinkError(f"sink {self.name} failed: {self._failed}") from self._failed

    async def run(self) -> None:
        """The flush loop; runs until ``close``, an empty buffer and every write acknowledged."""
        await self.sink.start()
        settler = None
        if self._submit is not None:
            settler = self._settler = asyncio.create_task(self._settle_loop())
        try:
            await self._fill_loop()
            if settler is not None:
                self._finishing = True
                self._submitted.set()
                await settler  # raises the failure of an acknowledgement
        finally:
            if settler is not None:
                self._settler = None
                if not settler.done():
                    settler.cancel()
                await asyncio.gather(settler, return_exceptions=True)
                self._abandon_in_flight()
            self._room.set()
            self._progress.set()

    async def _fill_loop(self) -> None:
        """Take the buffer to the sink whenever it holds a batch or the lanes had their turn."""
        turned = False  # whether the lanes had a turn since the first record came in
        while True:
            self._raise_if_failed()
            if not self._records:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            urgent = self._flush_now or self._closed
            if not urgent and len(self._records) < self.max_batch:
                remaining = self._first_at + self.linger - time.monotonic()
                if remaining > 0:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(remaining):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                    continue
                if not turned:
                    # one turn of the loop: every lane that has events now adds its outputs
                    # to this batch; then nothing waits for a batch that may never fill
                    turned = True
                    await asyncio.sleep(0)
                    continue
            turned = False
            await self._write_buffered()

    async def _write_buffered(self) -> None:
        records = self._records
        self._records = []
        self._reset_senders()  # they append to the new buffer
        self._taken += len(records)
        self._flush_now = False
        self._room.set()
        step = self.max_batch
        pipelined = self._settler is not None
        try:
            for i in range(0, len(records), step):
                chunk = records[i : i + step]
                if pipelined:
                    await self._submit_chunk(chunk)
                    continue
                began = time.monotonic()
                span = None if self.tracer is None else start_write_span(
                    self.tracer, self.name, chunk)
                try:
                    refused = await self.sink.write(chunk)
                finally:
                    if span is not None:
                        span.end()
                self._acknowledged(chunk, refused, began)
        except SinkError as exc:
            self._fail(exc)
            raise
        except Exception as exc:
            raise self._fail(exc) from exc

    async def _submit_chunk(self, chunk: list[SinkRecord]) -> None:
        """Hand ``chunk`` to a pipelining sink once fewer than ``PIPELINE_DEPTH`` are in flight."""
        assert self._submit is not None
        while len(self._in_flight) >= PIPELINE_DEPTH:
            self._slot.clear()
            await self._slot.wait()
            self._raise_if_failed()
        began = time.monotonic()
        span = None if self.tracer is None else start_write_span(self.tracer, self.name, chunk)
        try:
            acknowledgement = await self._submit(chunk)
        except BaseException:
            if span is not None:
                span.end()
            raise
        self._in_flight.append((chunk, acknowledgement, began, span))
        self._submitted.set()

    async def _settle_loop(self) -> None:
        """Await the submitted writes' acknowledgements in order; count each as written."""
        in_flight = self._in_flight
        while True:
            if not in_flight:
                if self._finishing:
                    return
                self._submitted.clear()
                await self._submitted.wait()
                continue
            chunk, acknowledgement, began, span = in_flight[0]
            try:
                refused = await acknowledgement
                in_flight.popleft()
                if span is not None:
                    span.end()
                self._acknowledged(chunk, refused, began)
            except SinkError as exc:  # what is still in flight is abandoned by run
                self._fail(exc)
                raise
            except Exception as exc:
                raise self._fail(exc) from exc
            self._slot.set()

    def _acknowledged(self, chunk: list[SinkRecord], refused: Any, began: float) -> None:
        """A write is done: its refused records to ``on_rejected``, then it counts as written."""
        self._write_seconds.observe(time.monotonic() - began)
        if refused:
            self._refused(refused)
        self._written += len(chunk)
        self._progress.set()
        self.metrics.incr(f"sink.{self.name}.written", len(chunk))
        self._count_out(chunk)

    def _fail(self, exc: Exception) -> SinkError:
        """Remember the sink's failure (``send`` and ``flush`` raise it from now on)."""
        if self._failed is None:
            self._failed = exc
        self._reset_senders()
        self._progress.set()
        self._slot.set()
        self._wake.set()
        return self._as_sink_error(exc)

    def _as_sink_error(self, exc: BaseException) -> SinkError:
        if isinstance(exc, SinkError):
            return exc
        return SinkError(f"sink {self.name} failed to write a batch: {exc}")

    def _raise_if_failed(self) -> None:
        failed = self._failed
        if failed is None:
            return
        error = self._as_sink_error(failed)
        if error is failed:
            raise error
        raise error from failed

    def _abandon_in_flight(self) -> None:
        """The writer stops with writes unacknowledged: no checkpoint covers them (replayed)."""
        for _, acknowledgement, _, span in self._in_flight:
            close = getattr(acknowledgement, "close", None)
            if close is not None:
                close()  # a coroutine never awaited: no warning about it
            if span is not None:
                span.end()
        self._in_flight.clear()

    def _count_out(self, chunk: list[SinkRecord]) -> None:
        """``events_out`` by (sink, topic), counted per chunk (in C: ``Counter`` over ``map``)."""
        incr = self.metrics.incr_labeled
        if chunk[0].topic is None:  # an external sink's records name no topic: one count
            incr("events_out", (self.name, self.name), len(chunk))
            return
        topics: Counter[str | None] = Counter(map(_topic_of, chunk))
        for topic, n in topics.items():
            incr("events_out", (self.name, topic or self.name), n)

    def _refused(self, refused: Sequence[Rejected]) -> None:
        """Hand what the sink refused to ``on_rejected`` (it never waits), or fail without it."""
        on_rejected = self.on_rejected
        if on_rejected is None:
            first = refused[0]
            raise SinkError(
                f"sink {self.name} refused {len(refused)} record(s), e.g. key "
                f"{first.record.key!r}: {first.reason} (no dead-letter output to send them to)"
            )
        self.rejected += len(refused)
        self.metrics.incr(f"sink.{self.name}.rejected", len(refused))
        for r in refused:
            on_rejected(self, r.record, r.reason)

    def close(self) -> None:
        """Ask ``run`` to flush what is left and return."""
        self._closed = True
        self._wake.set()

    async def stop(self) -> None:
        """Stop the sink itself (after ``run`` returned)."""
        await self.sink.stop()



class _RoomWaiter:
    """Awaiting it waits for room; nothing is made until it is awaited (``add`` drops it)."""

    __slots__ = ("_room",)

    def __init__(self, room: asyncio.Event) -> None:
        self._room = room

    def __await__(self) -> Any:
        return self._room.wait().__await__()


class _Ready:
    """An awaitable that is already done, for writers made outside an event loop."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_topic_of = attrgetter("topic")


def _done_future() -> Awaitable[Any]:
    """A future that is already done: awaiting it costs no coroutine and no task switch."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return _Ready()
    fut = loop.create_future()
    fut.set_result(None)
    return fut
