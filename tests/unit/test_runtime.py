"""The runtime on the memory broker: lanes, order, backpressure, acks, dead letters, errors."""

import asyncio
from collections import defaultdict
from typing import Any

import pytest

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.testing import CaptureSink, TestRun, reason_of, wait_for


class Reading(af.Record):
    id: str
    seq: int
    value: float


def committed(broker: MemoryBroker, group: str, topic: str) -> dict[int, int | None]:
    n = len(broker.topics[topic].partitions)
    return {p: broker.committed(group, topic, p) for p in range(n)}


async def test_per_key_order_holds_under_16_lanes_with_10000_keys() -> None:
    app = af.App("order", lane_capacity=500)
    readings = app.topic("readings", value_type=Reading, key=lambda r: r.id, partitions=4)
    seen: dict[str, list[int]] = defaultdict(list)
    lanes_of_key: dict[str, set[int]] = defaultdict(set)

    @app.agent(readings, concurrency=16)
    async def track(stream: af.Stream[Reading]) -> None:
        lane = stream._lane
        async for r in stream:
            seen[r.id].append(r.seq)
            lanes_of_key[r.id].add(lane.index)
            if r.seq % 7 == 0:
                await asyncio.sleep(0)  # let other lanes interleave

    async with TestRun(app) as run:
        for seq in range(5):
            for k in range(10_000):
                await run.send("readings", {"id": f"k{k}", "seq": seq, "value": 1.0}, key=f"k{k}")
        await run.finish()
    assert len(seen) == 10_000
    assert all(v == [0, 1, 2, 3, 4] for v in seen.values())
    assert all(len(lanes) == 1 for lanes in lanes_of_key.values())
    assert len({next(iter(s)) for s in lanes_of_key.values()}) == 16


async def test_a_slow_sink_pauses_the_source_and_lane_queues_stay_within_bounds() -> None:
    app = af.App("slow", lane_capacity=200, fetch_max=100)
    readings = app.topic("readings", value_type=Reading, key=lambda r: r.id, partitions=2)
    slow = app.sink(CaptureSink("slow", delay=0.002, max_batch=20, linger=0.001))

    @app.agent(readings, concurrency=2)
    async def forward(stream: af.Stream[Reading]) -> None:
        async for r in stream:
            await slow.send(r.id, r.seq)

    async with TestRun(app) as run:
        for i in range(5_000):
            await run.send("readings", {"id": f"k{i % 10}", "seq": i, "value": 0.0})
        await run.finish(timeout=60)
        runtime_queues = app.metrics.snapshot()
    assert runtime_queues["partition_pauses"] > 0
    assert len(slow.sink.records) == 5_000
    # peak of each lane queue: capacity plus at most one fetched part (fetch_max)
    assert app.metrics.get("events_in") == 5_000


async def test_lane_queues_never_exceed_capacity_plus_one_fetch() -> None:
    from asyncflow.channels import Channel
    from asyncflow.clock import ManualClock
    from asyncflow.dispatch import Dispatcher, Route
    from asyncflow.lanes import LaneQueue
    from asyncflow.metrics import Metrics
    from asyncflow.protocols import TopicSpec
    from asyncflow.watermarks import PartitionWatermarks

    broker = MemoryBroker()
    broker.create_topic("t", partitions=3)
    for i in range(3_000):
        broker.produce("t", b'{"x": %d}' % i, key=str(i).encode())
    src = broker.source([TopicSpec("t")], "g")
    src.fetch_max = 50
    lanes = [LaneQueue(100) for _ in range(2)]
    paused: list[Any] = []

    class Listener:
        async def on_assigned(self, p: Any) -> None: ...
        async def on_revoked(self, p: Any) -> None: ...

    await src.start(Listener())
    d = Dispatcher(
        src, {"t": Route(Channel("t"), [lanes])}, PartitionWatermarks(None),
        ManualClock(), Metrics(), lambda *a: None,
    )
    for _ in range(50):  # nobody consumes: the source must stop delivering
        for b in await src.fetch(0):
            dispatch_paused = set(d.paused)
            paused.append(dispatch_paused)
            d.dispatch(b)
    assert all(q.peak <= q.maxsize for q in lanes)
    assert d.paused  # partitions are paused, not buffered
    assert sum(q.size for q in lanes) <= 2 * 100


async def test_a_crash_loses_nothing_and_replays_exactly_the_uncommitted_events() -> None:
    broker = MemoryBroker(options={"session_timeout_ms": "50"})
    gate = asyncio.Event()

    def build(sink: CaptureSink) -> af.App:
        app = af.App("crash", commit_interval=0.01, broker=broker)
        readings = app.topic("readings", value_type=Reading, key=lambda r: r.id, partitions=2)
        out = app.sink(sink)

        @app.agent(readings, concurrency=4)
        async def forward(stream: af.Stream[Reading]) -> None:
            async for r in stream:
                if r.seq >= 600:
                    await gate.wait()  # the first worker hangs here until it "crashes"
                await out.send(r.id, (stream.current.partition.partition, stream.current.offset))

        return app

    first = CaptureSink("out", linger=0.001)
    app1 = build(first)
    run1 = TestRun(app1, broker=broker)
    await run1.__aenter__()
    for i in range(1_000):
        await run1.send("readings", {"id": f"k{i % 20}", "seq": i, "value": 0.0}, key=f"k{i % 20}")
    await wait_for(lambda: len(first.records) >= 200)
    await asyncio.sleep(0.05)  # let a few commits happen
    assert run1._task is not None
    run1._task.cancel()  # crash: no drain, no flush, no final commit
    with pytest.raises(asyncio.CancelledError):
        await run1._task
    at_crash = committed(broker, "crash", "readings")
    gate.set()
    await asyncio.sleep(0.1)  # the crashed member's session expires, as on Kafka

    second = CaptureSink("out")
    async with TestRun(build(second), broker=broker) as run2:
        await run2.finish()
    replayed = {(p, o) for p, o in second.values}
    expected = {
        (p, r.offset)
        for p, part in enumerate(broker.topics["readings"].partitions)
        for r in part
        if r.offset >= (at_crash[p] or 0)
    }
    assert replayed == expected
    done_first = {(p, o) for p, o in first.values}
    assert done_first | replayed == {
        (p, r.offset) for p, part in enumerate(broker.topics["readings"].partitions) for r in part
    }


async def test_malformed_and_mistyped_records_go_to_dead_letters_and_processing_goes_on() -> None:
    app = af.App("dlq")
    readings = app.topic("readings", value_type=Reading, key=lambda r: r.id)
    out = app.sink(CaptureSink("out"))

    @app.agent(readings)
    async def forward(stream: af.Stream[Reading]) -> None:
        async for r in stream:
            await out.send(r.id, r.seq)

    async with TestRun(app) as run:
        await run.send("readings", {"id": "a", "seq": 1, "value": 1})
        run.send_raw("readings", b"{oops")
        run.send_raw("readings", b'{"id": "b", "seq": "two", "value": 1}')
        await run.send("readings", {"id": "c", "seq": 3, "value": 1})
        await run.finish()
        dead = run.dead_letters()
        assert out.sink.values == [1, 3]
        assert [r.value for r in dead] == [b"{oops", b'{"id": "b", "seq": "two", "value": 1}']
        assert "malformed JSON" in reason_of(dead[0])
        assert reason_of(dead[1]) == "field 'seq': expected int, got str"
        headers = dict(dead[1].headers)
        assert headers["asyncflow.topic"] == b"readings" and headers["asyncflow.offset"] == b"2"
        assert run.broker.committed("dlq", "readings", 0) == 4


async def test_an_agent_error_sends_the_event_to_dead_letters_and_the_lane_goes_on() -> None:
    app = af.App("boom")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers)
    async def divide(stream: af.Stream[int]) -> None:
        async for n in stream:
            await out.send(None, 10 // n)

    async with TestRun(app) as run:
        await run.send_many("numbers", [5, 0, 2])
        await run.finish()
        assert out.sink.values == [2, 5]
        (dead,) = run.dead_letters()
        assert "ZeroDivisionError" in reason_of(dead) and "divide" in reason_of(dead)


async def test_retry_policy_redelivers_the_failing_event_before_giving_up() -> None:
    app = af.App("retry")
    numbers = app.topic("numbers")
    attempts: list[int] = []

    @app.agent(numbers, on_error=af.Retry(times=2, backoff=0.001))
    async def flaky(stream: af.Stream[int]) -> None:
        async for n in stream:
            attempts.append(n)
            if n == 1 and attempts.count(1) < 3:
                raise RuntimeError("transient")

    async with TestRun(app) as run:
        await run.send_many("numbers", [0, 1, 2])
        await run.finish()
        assert attempts == [0, 1, 1, 1, 2]
        assert run.dead_letters() == []


async def test_stop_policy_stops_the_worker_with_a_clear_error() -> None:
    app = af.App("stopper")
    numbers = app.topic("numbers")

    @app.agent(numbers, on_error="stop")
    async def fail(stream: af.Stream[int]) -> None:
        async for _ in stream:
            raise ValueError("bad")

    with pytest.raises(BaseExceptionGroup) as info:
        async with TestRun(app) as run:
            await run.send("numbers", 1)
            await run.finish()
    (err,) = info.value.exceptions
    assert isinstance(err, af.AgentError) and "fail" in str(err) and "ValueError: bad" in str(err)


async def test_every_agent_on_a_topic_must_finish_before_its_offset_commits() -> None:
    app = af.App("fanout")
    numbers = app.topic("numbers")
    release = asyncio.Event()
    fast_seen: list[int] = []

    @app.agent(numbers)
    async def fast(stream: af.Stream[int]) -> None:
        async for n in stream:
            fast_seen.append(n)

    @app.agent(numbers)
    async def slow(stream: af.Stream[int]) -> None:
        async for _ in stream:
            await release.wait()

    async with TestRun(app) as run:
        await run.send_many("numbers", [1, 2, 3])
        await wait_for(lambda: len(fast_seen) == 3)
        await asyncio.sleep(app.commit_interval * 1.5)
        assert run.broker.committed("fanout", "numbers", 0) is None
        release.set()
        await run.finish()
        assert run.broker.committed("fanout", "numbers", 0) == 3


async def test_stop_flushes_and_commits_what_was_processed_and_leaves_the_rest_for_replay() -> None:
    app = af.App("graceful", commit_interval=60, fetch_max=10)
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out", linger=30))  # would not flush on its own for 30 s
    processed: list[int] = []

    @app.agent(numbers, concurrency=3)
    async def forward(stream: af.Stream[int]) -> None:
        async for n in stream:
            processed.append(n)
            await out.send(None, n)
            await asyncio.sleep(0.001)

    async with TestRun(app) as run:
        await run.send_many("numbers", range(300))
        await wait_for(lambda: len(processed) >= 20)
        await run.stop()
        assert sorted(out.sink.values) == sorted(processed)  # everything handled was flushed
        done = run.broker.committed("graceful", "numbers", 0)
        assert done is not None
        assert set(range(done)) <= set(processed)  # the commit covers only finished events
        assert len(processed) < 300  # the queued rest was left for the replay, not rushed


async def test_timers_run_periodically_while_the_worker_runs() -> None:
    app = af.App("timers")
    ticks: list[int] = []

    @app.timer(0.01)
    async def tick() -> None:
        ticks.append(1)

    async with TestRun(app) as run:
        await wait_for(lambda: len(ticks) >= 3)
        await run.stop()


async def test_a_failing_sink_stops_the_worker_without_committing_its_events() -> None:
    app = af.App("badsink")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out", fail_times=100))

    @app.agent(numbers)
    async def forward(stream: af.Stream[int]) -> None:
        async for n in stream:
            await out.send(None, n)

    broker = MemoryBroker()
    with pytest.raises(BaseExceptionGroup) as info:
        async with TestRun(app, broker=broker) as run:
            await run.send_many("numbers", [1, 2])
            await run.finish()
    assert any(isinstance(e, af.SinkError) for e in info.value.exceptions)
    assert broker.committed("badsink", "numbers", 0) is None


async def test_window_state_survives_an_agent_error_and_restart() -> None:
    from datetime import timedelta

    app = af.App("winretry")
    readings = app.topic("readings", time=lambda v: v["t"])
    out = app.sink(CaptureSink("out"))
    failed: list[int] = []

    @app.agent(readings)
    async def count(stream: af.Stream[dict[str, int]]) -> None:
        windows = stream.map(_fail_once(failed)).window(
            af.Tumbling(timedelta(seconds=10)), aggregate=af.Count()
        )
        async for w in windows:
            await out.send(w.key, w.value)

    async with TestRun(app) as run:
        for t in range(5):
            await run.send("readings", {"t": t}, key="k")
        await run.finish()
    assert failed == [2]
    assert out.sink.values == [4]  # the failing event went to dead letters, the others counted once


def _fail_once(failed: list[int]) -> Any:
    def check(v: dict[str, int]) -> dict[str, int]:
        if v["t"] == 2 and not failed:
            failed.append(2)
            raise RuntimeError("boom")
        return v

    return check


async def test_stopping_commits_open_windows_as_state_and_a_restart_resumes_them() -> None:
    from datetime import timedelta

    broker = MemoryBroker()

    def build() -> tuple[af.App, CaptureSink]:
        app = af.App("winstop")
        readings = app.topic("readings", time=lambda v: v["t"])
        out = app.sink(CaptureSink("out"))

        @app.agent(readings)
        async def count(stream: af.Stream[dict[str, int]]) -> None:
            async for w in stream.window(af.Tumbling(timedelta(seconds=5)), aggregate=af.Count()):
                await out.send(w.key, (w.start_ms, w.value))

        return app, out.sink  # type: ignore[return-value]

    app, sink = build()
    async with TestRun(app, broker=broker) as run:
        for t in (1, 2, 6):
            await run.send("readings", {"t": t}, key="k")
        await wait_for(lambda: app.metrics.get("events_in") == 3)
        await run.stop()
    assert sink.values == [(0, 2)]  # the watermark (6 s) closed [0, 5) only
    assert broker.committed("winstop", "readings", 0) == 3  # t=6 is in the window state

    app, sink = build()
    async with TestRun(app, broker=broker) as run:
        await run.send("readings", {"t": 7}, key="k")
        await run.finish()
    assert sink.values == [(5_000, 2)]  # [0, 5) not again; [5, 10) with t=6 and t=7


async def test_lane_gauges_are_reported_in_the_metrics() -> None:
    app = af.App("gauges", watermark_interval=0.01)
    numbers = app.topic("numbers")
    gate = asyncio.Event()

    @app.agent(numbers)
    async def wait(stream: af.Stream[int]) -> None:
        async for _ in stream:
            await gate.wait()

    async with TestRun(app) as run:
        await run.send_many("numbers", range(10))
        await wait_for(lambda: app.metrics.get("lanes.peak") >= 9)
        gate.set()
        await run.finish()


async def _run_numbers(app: af.App, values: list[Any]) -> TestRun:
    async with TestRun(app) as run:
        await run.send_many("numbers", values)
        await run.finish()
    return run


async def test_a_map_that_raises_dead_letters_that_event_and_commits_after_it() -> None:
    app = af.App("badmap")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers)
    async def inverse(stream: af.Stream[int]) -> None:
        async for v in stream.map(lambda n: 12 // n):
            await out.send(None, v)

    run = await _run_numbers(app, [0, 1, 0, 2, 3])
    assert out.sink.values == [12, 6, 4]
    assert [r.value for r in run.dead_letters()] == [b"0", b"0"]
    assert run.broker.committed("badmap", "numbers", 0) == 5


async def test_a_failing_batch_is_dead_lettered_whole_and_the_rest_goes_on() -> None:
    app = af.App("badbatch")
    numbers = app.topic("numbers")
    out = app.sink(CaptureSink("out"))

    @app.agent(numbers)
    async def sums(stream: af.Stream[int]) -> None:
        async for batch in stream.batch(3, timeout=0.05):
            if 0 in batch:
                raise ValueError("zero in batch")
            await out.send(None, sum(batch))

    run = await _run_numbers(app, [1, 0, 2, 3, 4, 5])
    assert out.sink.values == [12]
    assert [r.value for r in run.dead_letters()] == [b"1", b"0", b"2"]
    assert run.broker.committed("badbatch", "numbers", 0) == 6


async def test_an_unhashable_key_is_a_dead_letter_not_a_crash() -> None:
    app = af.App("badkey")
    numbers = app.topic("numbers", key=lambda v: v["k"])
    seen: list[Any] = []

    @app.agent(numbers, concurrency=2)
    async def keep(stream: af.Stream[Any]) -> None:
        async for v in stream:
            seen.append(v)

    run = await _run_numbers(app, [{"k": "a"}, {"k": ["x"]}, {"k": "b"}])
    assert seen == [{"k": "a"}, {"k": "b"}] or seen == [{"k": "b"}, {"k": "a"}]
    assert "unhashable" in reason_of(run.dead_letters()[0])


async def test_flush_returns_while_other_lanes_keep_sending() -> None:
    from asyncflow.protocols import SinkRecord
    from asyncflow.writer import SinkWriter

    sink = CaptureSink("busy", delay=0.001, max_batch=10, linger=0.001)
    writer = SinkWriter(sink)
    stop = asyncio.Event()

    async def keep_sending() -> None:
        while not stop.is_set():
            await writer.send(SinkRecord(None, 1))
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run())
        sender = tg.create_task(keep_sending())
        await writer.send(SinkRecord(None, "mine"))
        await asyncio.wait_for(writer.flush(), 5)
        assert "mine" in sink.values
        stop.set()
        await sender
        writer.close()


async def test_a_window_aggregate_that_raises_follows_the_agents_error_policy() -> None:
    from datetime import timedelta

    app = af.App("badagg")
    readings = app.topic("readings", time=lambda v: v["t"])
    out = app.sink(CaptureSink("out"))

    @app.agent(readings)
    async def total(stream: af.Stream[dict[str, Any]]) -> None:
        async for w in stream.window(af.Tumbling(timedelta(seconds=10)), aggregate=af.Sum("v")):
            await out.send(w.key, w.value)

    async with TestRun(app) as run:
        for t, v in [(1, 1), (2, "oops"), (3, 2)]:
            await run.send("readings", {"t": t, "v": v}, key="k")
        await run.finish()
        assert out.sink.values == [3]
        assert [r.value for r in run.dead_letters()] == [b'{"t":2,"v":"oops"}']
        assert run.broker.committed("badagg", "readings", 0) == 3
