"""Records a sink refuses for what they are go to the dead letters with the sink's reason.

A sink's ``write`` returns what it refuses (``Rejected``); the worker sends
those to the dead-letter output before the write counts as done, goes on with
the next records, and commits past them. What a sink fails to write for a
transient reason still stops the worker uncommitted. An error raised while an
agent handles a window result follows the agent's error policy.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import asyncflow as af
from asyncflow.errors import AgentError, SinkError
from asyncflow.memory import MemoryBroker, MemorySource
from asyncflow.protocols import SinkRecord
from asyncflow.testing import CaptureSink, TestRun, reason_of
from asyncflow.writer import SinkWriter

pytestmark = pytest.mark.asyncio


def header(record: Any, name: str) -> str | None:
    for key, value in record.headers:
        if key == name:
            return value.decode()
    return None


def refuse_negative(record: SinkRecord) -> str | None:
    value = record.value
    return f"field 'n': {value['n']} is negative" if value["n"] < 0 else None


def copy_app(sink: CaptureSink, dead_letter: Any = None) -> af.App:
    app = af.App("copy", dead_letter=dead_letter)
    numbers = app.topic("numbers", partitions=2)
    out = app.sink(sink)

    @app.agent(numbers, concurrency=2)
    async def copy(stream: af.Stream[Any]) -> None:
        async for v in stream:
            await out.send(str(v["n"]), v)

    return app


async def test_records_a_sink_refuses_become_dead_letters_naming_the_sink_and_the_rest_are_written() -> None:
    sink = CaptureSink("ledger", refuse=refuse_negative)
    app = copy_app(sink)
    values = [{"n": n} for n in (1, -2, 3, -4, 5)]
    async with TestRun(app) as run:
        await run.send_many("numbers", values, key=lambda v: v["n"])
        await run.finish()
        dead = run.dead_letters()
        committed = {p: run.broker.committed("copy", "numbers", p) for p in (0, 1)}
    assert sorted(v["n"] for v in sink.values) == [1, 3, 5]
    assert sorted(reason_of(d) for d in dead) == [
        "sink ledger refused the record: field 'n': -2 is negative",
        "sink ledger refused the record: field 'n': -4 is negative",
    ]
    assert sorted(d.value for d in dead) == [b'{"n": -2}', b'{"n": -4}']  # the value, as JSON
    assert {header(d, "asyncflow.sink") for d in dead} == {"ledger"}
    assert sorted(d.key for d in dead) == [b"-2", b"-4"]
    # the refused records count as done: the commits cover every input
    produced = {p: len(run.broker.topics["numbers"].partitions[p]) for p in (0, 1)}
    assert committed == {p: produced[p] or None for p in (0, 1)}
    assert app.metrics.get("dead_letters") == 2
    assert app.metrics.get("sink.ledger.rejected") == 2


async def test_an_output_over_the_brokers_record_limit_is_a_dead_letter_without_its_value() -> None:
    """The dead-letter topic refuses the dead letter too (same limit): it goes again without its value."""
    broker = MemoryBroker("memory://?max_record_bytes=200")
    app = af.App("big")
    words, lines = app.topic("words"), app.topic("lines")

    @app.agent(words)
    async def repeat(stream: af.Stream[Any]) -> None:
        async for w in stream:
            await lines.send(w, w * int(w[-1]) * 10)

    async with TestRun(app, broker=broker) as run:
        for word in ("ab1", "cd9", "ef2"):
            await run.send("words", word, key=word)
        await run.finish()
        out = run.outputs("lines")
        [dead] = run.dead_letters()
    assert sorted(len(v) for v in out) == [30, 60]
    assert reason_of(dead) == (
        "sink memory-producer refused the record: a record of 275 bytes is larger than the broker "
        "allows (max_record_bytes=200)"
    )
    assert header(dead, "asyncflow.topic") == "lines"
    assert dead.value is None and dead.key == b"cd9"
    assert "272 bytes" in (header(dead, "asyncflow.value_dropped") or "")


async def test_a_dead_letter_refused_even_without_its_value_is_dropped_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead_sink = CaptureSink("dead", refuse=lambda r: "no dead letters today")
    app = copy_app(CaptureSink("ledger", refuse=refuse_negative), dead_letter=dead_sink)
    async with TestRun(app) as run:
        await run.send("numbers", {"n": -1}, key=-1)
        await run.send("numbers", {"n": 1}, key=1)
        await run.finish()
    assert dead_sink.records == []
    assert app.metrics.get("dead_letters_dropped") == 1
    assert "refused a dead letter even without its value" in caplog.text


async def test_a_sink_that_fails_for_a_transient_reason_still_stops_the_worker_uncommitted() -> None:
    app = copy_app(CaptureSink("ledger", fail_times=1_000))
    run = TestRun(app)
    with pytest.raises(ExceptionGroup) as info:
        async with run:
            await run.send("numbers", {"n": 1}, key=1)
            await run.finish()
    assert info.group_contains(SinkError, match="injected failure")
    assert run.broker.committed("copy", "numbers", 0) is None
    assert run.broker.committed("copy", "numbers", 1) is None


async def test_a_writer_without_a_dead_letter_output_fails_on_a_refused_record() -> None:
    writer = SinkWriter(CaptureSink("ledger", refuse=refuse_negative))
    task = asyncio.create_task(writer.run())
    writer.add(SinkRecord("k", {"n": -1}))
    with pytest.raises(SinkError, match="refused 1 record.*negative.*no dead-letter output"):
        await writer.flush()
    with pytest.raises(SinkError, match="refused 1 record"):
        await task


async def test_the_checkpoint_commits_only_once_the_dead_letters_of_refused_records_are_durable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outputs are flushed first, then the dead letters their sinks refused on the way."""
    dead_sink = CaptureSink("dead", delay=0.05)
    ledger = CaptureSink("ledger", delay=0.05, refuse=refuse_negative)
    app = copy_app(ledger, dead_letter=dead_sink)
    commits: list[tuple[int, int]] = []  # (inputs committed, dead letters durable) at each commit
    original = MemorySource.commit

    async def watched_commit(self: MemorySource, positions: Any) -> None:
        commits.append((sum(o + 1 for o in positions.values()), len(dead_sink.records)))
        await original(self, positions)

    monkeypatch.setattr(MemorySource, "commit", watched_commit)
    async with TestRun(app) as run:
        await run.send_many("numbers", [{"n": -n} for n in range(1, 21)], key=lambda v: v["n"])
        await run.finish()
    assert len(dead_sink.records) == 20
    assert commits
    for inputs, durable in commits:  # every input a commit covers has its dead letter written
        assert durable >= inputs


async def test_an_error_while_handling_a_window_result_goes_to_dead_letters_and_the_agent_goes_on() -> None:
    app = af.App("windows")
    readings = app.topic("readings", time="t")
    totals = app.topic("totals")

    @app.agent(readings)
    async def total(stream: af.Stream[Any]) -> None:
        windows = stream.key_by(lambda r: r["k"]).window(af.Tumbling(timedelta(seconds=5)),
                                                          aggregate=af.Count())
        async for w in windows:
            if w.key == "bad":
                raise ValueError("cannot publish this window")
            await totals.send(w.key, w.value)

    async with TestRun(app) as run:
        for i in range(12):
            await run.send("readings", {"k": "bad" if i % 3 == 0 else "ok", "t": i})
        await run.finish()
        out = run.outputs("totals")
        dead = run.dead_letters()
    assert out == [3, 3, 2]  # ok's windows [0, 5), [5, 10) and [10, 15)
    assert len(dead) == 2  # bad's two windows (t = 0, 3 and t = 6, 9), each a dead letter
    for d in dead:
        assert "ValueError: cannot publish this window" in reason_of(d)
        assert b"window_result_of_key" in (d.value or b"")


async def test_an_error_while_handling_a_window_result_stops_the_worker_under_on_error_stop() -> None:
    app = af.App("windows-stop")
    readings = app.topic("readings", time="t")

    @app.agent(readings, on_error="stop")
    async def total(stream: af.Stream[Any]) -> None:
        async for _ in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
            raise ValueError("cannot publish this window")

    run = TestRun(app)
    with pytest.raises(ExceptionGroup) as info:
        async with run:
            await run.send("readings", {"t": 1})
            await run.finish()
    assert info.group_contains(AgentError, match="cannot publish this window")
