"""A sink that can pipeline (``submit``) gets the next batch before the last one is acknowledged.

The writer hands batches over in order, keeps at most ``PIPELINE_DEPTH``
unacknowledged, counts a batch as written only once it and every batch before
it are acknowledged (so a flush, and the checkpoint behind it, never covers an
unacknowledged record), and stops on a failed acknowledgement without counting
what was in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from asyncflow.errors import SinkError
from asyncflow.protocols import SinkRecord
from asyncflow.writer import PIPELINE_DEPTH, SinkWriter

pytestmark = pytest.mark.asyncio


class PipeliningSink:
    """Records each submitted batch; each batch is acknowledged when the test says so."""

    name = "pipe"
    max_batch = 2

    def __init__(self) -> None:
        self.submitted: list[list[Any]] = []
        self.acks: list[asyncio.Future[None]] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def write(self, records: Sequence[SinkRecord]) -> None:
        await (await self.submit(records))

    async def submit(self, records: Sequence[SinkRecord]) -> Awaitable[None]:
        self.submitted.append([r.value for r in records])
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)

        async def acknowledged() -> None:
            await ack

        return acknowledged()


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def running_writer(records: int) -> tuple[PipeliningSink, SinkWriter, asyncio.Task[None]]:
    """A running writer in front of a ``PipeliningSink``, holding ``records`` values 0, 1, ..."""
    sink = PipeliningSink()
    writer = SinkWriter(sink)
    run = asyncio.create_task(writer.run())
    for v in range(records):
        writer.add(SinkRecord("k", v))
    return sink, writer, run


async def test_the_next_batch_is_handed_over_while_the_previous_one_is_unacknowledged() -> None:
    sink, writer, run = running_writer(6)
    flush = asyncio.create_task(writer.flush())
    await turns()
    assert sink.submitted == [[0, 1], [2, 3]]  # two in flight, nothing acknowledged yet
    assert len(sink.submitted) == PIPELINE_DEPTH

    sink.acks[1].set_result(None)  # the second is acknowledged first: nothing counts yet
    await turns()
    assert writer.metrics.get("sink.pipe.written") == 0
    assert sink.submitted == [[0, 1], [2, 3]]

    sink.acks[0].set_result(None)  # now both count, in order, and the third goes out
    await turns()
    assert writer.metrics.get("sink.pipe.written") == 4
    assert sink.submitted == [[0, 1], [2, 3], [4, 5]]
    assert not flush.done()  # the flush covers the third batch too

    sink.acks[2].set_result(None)
    await asyncio.wait_for(flush, 1)
    assert writer.metrics.get("sink.pipe.written") == 6
    writer.close()
    await asyncio.wait_for(run, 1)


async def test_closing_waits_for_every_batch_in_flight() -> None:
    sink, writer, run = running_writer(3)
    writer.close()
    await turns()
    assert sink.submitted == [[0, 1], [2]]
    assert not run.done()
    for ack in sink.acks:
        ack.set_result(None)
    await asyncio.wait_for(run, 1)
    assert writer.metrics.get("sink.pipe.written") == 3


async def test_a_failed_acknowledgement_stops_the_writer_and_nothing_in_flight_counts() -> None:
    sink, writer, run = running_writer(4)
    flush = asyncio.create_task(writer.flush())
    await turns()
    sink.acks[1].set_result(None)
    sink.acks[0].set_exception(ConnectionError("broker gone"))
    with pytest.raises(SinkError, match="pipe failed.*broker gone"):
        await asyncio.wait_for(flush, 1)
    with pytest.raises(SinkError, match="broker gone"):
        await asyncio.wait_for(run, 1)
    assert writer.metrics.get("sink.pipe.written") == 0  # the second came back, but after a loss
    with pytest.raises(SinkError, match="failed earlier"):
        writer.add(SinkRecord("k", 9))


async def test_a_cancelled_writer_abandons_what_is_in_flight_without_counting_it() -> None:
    sink, writer, run = running_writer(4)
    await turns()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert writer.metrics.get("sink.pipe.written") == 0
