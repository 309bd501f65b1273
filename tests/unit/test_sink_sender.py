"""An output's ``send`` while the app runs: ``SinkWriter.value_sender`` and ``record_sender``.

The senders append most records without ``push``'s checks, counting down to
the next record that needs them. What must hold is everything the checks do:
the writer hears of the first record of a batch and of a full batch, a lane
waits once the buffer is over its bound, a failed writer refuses records;
whatever else changes the buffer meanwhile (the other sender, ``push``,
``send_many``, a write taking the buffer).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.errors import SinkError
from asyncflow.protocols import SinkRecord
from asyncflow.testing import CaptureSink
from asyncflow.writer import SinkWriter

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 1)),  # a value (0) or a record (1)
        st.tuples(st.just("push"), st.just(0)),
        st.tuples(st.just("many"), st.integers(1, 4)),
        st.tuples(st.just("take"), st.just(0)),
    ),
    max_size=60,
)


async def observe(writer: SinkWriter, op: str, arg: int, senders: list[Any] | None) -> tuple[Any, ...]:
    """Do ``op`` on ``writer``; what it did: waited or not, buffered, full, writer woken."""
    waits: Any = None
    if op == "send" and senders is not None:
        sent = senders[0](None, arg) if arg == 0 else senders[1](SinkRecord(None, arg))
        waits = not sent.done() if isinstance(sent, asyncio.Future) else True
    elif op == "send":
        sent = writer.push_value(None, arg) if arg == 0 else writer.push(SinkRecord(None, arg))
        waits = not sent.done() if isinstance(sent, asyncio.Future) else True
    elif op == "push":
        sent = writer.push(SinkRecord(None, "pushed"))
        waits = not sent.done() if isinstance(sent, asyncio.Future) else True
    elif op == "many":
        writer.add_many([SinkRecord(None, "many")] * arg)
    else:
        await writer._write_buffered()
    woken = writer._wake.is_set()
    writer._wake.clear()
    return op, waits, writer.buffered, writer.full, woken


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 5), st.integers(1, 8))
async def test_senders_do_what_push_does_whatever_else_changes_the_buffer(
    ops: list[tuple[str, int]], max_batch: int, max_buffer: int
) -> None:
    checked = SinkWriter(CaptureSink("a"), max_batch=max_batch, max_buffer=max_buffer)
    counted = SinkWriter(CaptureSink("b"), max_batch=max_batch, max_buffer=max_buffer)
    senders = [counted.value_sender(), counted.record_sender()]
    for op, arg in ops:
        expected = await observe(checked, op, arg, None)
        assert await observe(counted, op, arg, senders) == expected
    assert counted.sink.values == checked.sink.values  # type: ignore[attr-defined]


async def test_a_full_batch_is_written_at_once_and_the_next_record_waits_for_the_linger() -> None:
    sink = CaptureSink("out")
    writer = SinkWriter(sink, max_batch=3, linger=60.0)  # a linger no test waits for
    send = writer.value_sender()

    async def written(n: int) -> None:
        while len(sink.values) < n:
            await asyncio.sleep(0.001)

    async def turns() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        await send(None, 0)
        await turns()  # the writer lingers for more
        await send(None, 1)
        await send(None, 2)
        await asyncio.wait_for(written(3), timeout=30)  # the full batch: the writer woke
        assert sink.values == [0, 1, 2]
        await send(None, 3)
        await turns()
        assert sink.values == [0, 1, 2]  # the first of a batch: the writer lingers
        await writer.flush()
        assert sink.values == [0, 1, 2, 3]
        writer.close()


async def test_a_sender_refuses_records_once_its_writer_has_failed() -> None:
    writer = SinkWriter(CaptureSink("out"), max_batch=2)
    send = writer.value_sender()
    for v in range(3):
        await send(None, v)  # from the second on, the sender counts: the next go unchecked
    writer._fail(SinkError("out: the service went away"))  # as a write or acknowledgement does
    with pytest.raises(SinkError, match="failed earlier"):
        await send(None, 3)
    assert writer.buffered == 3


async def test_every_record_after_a_tracer_is_set_carries_its_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    carried: list[Any] = []
    monkeypatch.setattr("asyncflow.writer.carry_traceparent", carried.append)
    writer = SinkWriter(CaptureSink("out"), max_batch=100)
    send = writer.value_sender()
    for v in range(3):
        await send(None, v)  # counted: the next go unchecked
    writer.tracer = object()
    for v in range(3, 6):
        await send(None, v)
    assert [r.value for r in carried] == [3, 4, 5]
