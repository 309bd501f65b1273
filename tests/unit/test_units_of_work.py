"""What is committed when: nothing a lane did not finish, whatever cancels it.

Regression tests for the defects of the ambient unit-of-work model (a context
variable deciding what an output kept uncommitted): each failed before
checkpoints replaced it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.testing import CaptureSink, TestRun, reason_of, wait_for


def committed(broker: MemoryBroker, group: str, topic: str) -> list[int | None]:
    return [broker.committed(group, topic, p) for p in range(len(broker.topics[topic].partitions))]


async def test_a_lane_cancelled_at_shutdown_commits_nothing_it_did_not_finish() -> None:
    broker = MemoryBroker()
    app = af.App("stuck", shutdown_timeout=0.2, commit_interval=0.05)
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))
    never = asyncio.Event()

    @app.agent(numbers)
    async def lookup(stream: af.Stream[int]) -> None:
        async for n in stream:
            if n == 1:
                await never.wait()  # a lookup that never answers
            await out.send(None, n)

    async with TestRun(app, broker=broker) as run:
        await run.send("numbers", 0)
        await wait_for(lambda: broker.committed("stuck", "numbers", 0) == 1)
        await run.send("numbers", 1)
        await wait_for(lambda: app.metrics.get("events_in") == 2)
        await run.stop()
    assert out.sink.values == [0]
    assert committed(broker, "stuck", "numbers") == [1]  # offset 1 is read again next time


async def test_a_window_whose_result_was_not_sent_before_a_stop_comes_out_after_the_restart() -> None:
    broker = MemoryBroker()
    sent: list[tuple[Any, int, int]] = []
    never = asyncio.Event()

    def build(block: bool) -> af.App:
        app = af.App("unsent", shutdown_timeout=0.2)
        readings = app.topic("readings", time=lambda v: v["t"])

        @app.agent(readings)
        async def count(stream: af.Stream[dict[str, int]]) -> None:
            async for w in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
                if block:
                    await never.wait()  # a sink that never answers: cancelled at shutdown
                sent.append((w.key, w.start_ms, w.value))

        return app

    async with TestRun(build(block=True), broker=broker) as run:
        for t in (1, 2, 6):
            await run.send("readings", {"t": t}, key="k")
        await wait_for(lambda: run.app.metrics.get("events_in") == 3)
        await asyncio.sleep(0.3)  # the window [0, 5) fired and its handling hangs
        await run.stop()
    assert sent == []
    async with TestRun(build(block=False), broker=broker) as run:
        await run.finish()
    assert ("k", 0, 2) in sent


async def test_a_generator_agent_sends_window_results_with_their_window_key() -> None:
    app = af.App("gen")
    readings = app.topic("readings", key=lambda v: v["k"], time=lambda v: v["t"])
    out = app.sink(CaptureSink("out"))

    @app.agent(readings, sink=out)
    async def count(stream: af.Stream[dict[str, Any]]) -> Any:
        async for w in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
            yield w.value

    async with TestRun(app) as run:
        await run.send_many("readings", [{"k": "a", "t": 1}, {"k": "b", "t": 2}])
        await run.finish()
    assert sorted((r.key, r.value) for r in out.sink.records) == [("a", 1), ("b", 1)]


async def test_an_error_while_handling_a_window_result_follows_the_dead_letter_policy() -> None:
    app = af.App("badresult")
    readings = app.topic("readings", key=lambda v: v["k"], time=lambda v: v["t"])
    out = app.sink(CaptureSink("out"))

    @app.agent(readings, on_error="dead_letter")
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        async for w in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
            if w.key == "bad":
                raise ValueError("cannot format this window")
            await out.send(w.key, w.value)

    async with TestRun(app) as run:
        await run.send_many("readings", [{"k": "bad", "t": 1}, {"k": "good", "t": 2}])
        await run.finish()
        dead = run.dead_letters()
    assert [(r.key, r.value) for r in out.sink.records] == [("good", 1)]
    assert len(dead) == 1 and "cannot format this window" in reason_of(dead[0])
    assert dead[0].key == b"bad"


async def test_batches_sent_item_by_item_cost_nothing_per_send_beyond_the_record() -> None:
    # each send buffers one record: no per-event bookkeeping grows with the batch
    app = af.App("batched")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers)
    async def forward(stream: af.Stream[int]) -> None:
        async for batch in stream.batch(1_000, timeout=0.05):
            for n in batch:
                await out.send(None, n)

    async with TestRun(app) as run:
        await run.send_many("numbers", range(5_000))
        await run.finish()
    assert out.sink.values == list(range(5_000))
