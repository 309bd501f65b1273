"""Joins in a running app: the same matches as a batch join, across a restart in the middle.

Both inputs are produced in a random order that stays within the join's
``wait``; the worker is stopped half way (drain, checkpoint, commit) and a new
worker with the same local store (SQLite) and broker, and one lane more, reads on. The outputs of
both runs together are exactly the batch join's: no match missing, none twice.
"""

from __future__ import annotations

import random
import tempfile
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.joins import interval_join, join_table
from asyncflow.memory import MemoryBroker
from asyncflow.testing import CaptureSink, TestRun, reason_of, wait_for

WAIT_MS = 40
LOWER, UPPER = -100, 150

Ev = tuple[int, str, int, int]  # side, key, time ms, id


@st.composite
def inputs(draw: Any) -> list[Ev]:
    n = draw(st.integers(1, 70))
    times = sorted(draw(st.lists(st.integers(0, 3_000), min_size=n, max_size=n, unique=True)))
    events = [
        (draw(st.integers(0, 1)), draw(st.sampled_from("abcde")), t, i) for i, t in enumerate(times)
    ]
    jitter = [draw(st.integers(0, WAIT_MS)) for _ in events]
    return [events[i] for i in sorted(range(n), key=lambda i: (events[i][2] + jitter[i], i))]


def batch_interval(events: list[Ev]) -> list[tuple[int, int]]:
    return sorted(
        (a[3], b[3])
        for a in events
        if a[0] == 0
        for b in events
        if b[0] == 1 and a[1] == b[1] and a[2] + LOWER <= b[2] <= a[2] + UPPER
    )


def batch_as_of(events: list[Ev], how: str) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    for s in (e for e in events if e[0] == 0):
        seen = [u for u in events if u[0] == 1 and u[1] == s[1] and u[2] <= s[2]]
        row = max(seen, key=lambda u: u[2])[3] if seen else None
        if row is not None or how == "left":
            out.append((s[3], row))
    return sorted(out)


def make_app(
    kind: str, state_dir: str | None, how: Any = "inner", lanes: int = 2
) -> tuple[af.App, CaptureSink]:
    app = af.App(
        "joins",
        state_dir=state_dir,
        state_store="sqlite" if state_dir else None,
        commit_interval=0.05,
    )
    left: af.Topic[Any] = app.topic(
        "left", key=lambda v: v["k"], time="t", time_unit="ms", partitions=2
    )
    right: af.Topic[Any] = app.topic(
        "right", key=lambda v: v["k"], time="t", time_unit="ms", partitions=3
    )
    wait = timedelta(milliseconds=WAIT_MS)
    join: Any
    if kind == "interval":
        join = interval_join(
            left,
            right,
            name="lr",
            lower=timedelta(milliseconds=LOWER),
            upper=timedelta(milliseconds=UPPER),
            wait=wait,
        )
    else:
        join = join_table(left, right, name="lr", how=how, wait=wait)
    found = CaptureSink("found")
    out = app.sink(found)

    @app.agent(join.topic, concurrency=lanes)
    async def pairs(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await out.send(j.key, (j.left["id"], None if j.right is None else j.right["id"]))

    return app, found


async def produce(run: TestRun, events: list[Ev]) -> None:
    for side, key, t, ident in events:
        await run.send("left" if side == 0 else "right", {"k": key, "t": t, "id": ident}, key=key)


async def run_with_restart(kind: str, events: list[Ev], how: Any, cut: int) -> list[Any]:
    broker = MemoryBroker()
    got: list[Any] = []
    with tempfile.TemporaryDirectory() as state_dir:
        app, found = make_app(kind, state_dir, how)
        async with TestRun(app, broker=broker) as run:
            await produce(run, events[:cut])
            await wait_for(lambda: app.metrics.get("events_in") >= cut)  # the inputs are read
            await run.stop()
        got.extend(found.values)
        app, found = make_app(kind, state_dir, how, lanes=3)  # state moves to other lanes
        async with TestRun(app, broker=broker) as run:
            await produce(run, events[cut:])
            await run.finish()
            assert [reason_of(r) for r in run.dead_letters()] == []
        got.extend(found.values)
    return sorted(got, key=lambda p: (p[0], -1 if p[1] is None else p[1]))


def watermark_of(join: Any) -> int | None:
    """The highest watermark a join's operators have reached (on any lane and partition)."""
    marks = [
        op.watermark
        for joined in list(join._streams.values())
        for op in joined._ops.values()
        if op.watermark is not None
    ]
    return max(marks, default=None)


SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(events=inputs(), cut=st.floats(0, 1))
async def test_an_interval_join_across_a_restart_finds_the_batch_pairs_once(
    events: list[Ev], cut: float
) -> None:
    got = await run_with_restart("interval", events, "inner", int(cut * len(events)))
    assert got == batch_interval(events)


@SETTINGS
@given(events=inputs(), cut=st.floats(0, 1), how=st.sampled_from(["inner", "left"]))
async def test_a_table_join_across_a_restart_equals_the_batch_as_of_join(
    events: list[Ev], cut: float, how: str
) -> None:
    got = await run_with_restart("table", events, how, int(cut * len(events)))
    assert got == sorted(
        batch_as_of(events, how), key=lambda p: (p[0], -1 if p[1] is None else p[1])
    )


async def test_a_late_event_goes_to_the_late_output_and_is_not_matched() -> None:
    app = af.App("late")
    left: af.Topic[Any] = app.topic("left", key=lambda v: v["k"], time="t", time_unit="ms")
    right: af.Topic[Any] = app.topic("right", key=lambda v: v["k"], time="t", time_unit="ms")
    late = app.sink(CaptureSink("late"))
    join = interval_join(
        left, right, name="lr", lower=timedelta(0), upper=timedelta(seconds=10), late=late
    )
    found = app.sink(CaptureSink("found"))

    @app.agent(join.topic)
    async def pairs(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await found.send(j.key, (j.left["id"], j.right["id"]))

    async with TestRun(app) as run:
        await run.send("left", {"k": "a", "t": 1_000, "id": 1})
        await run.send("right", {"k": "a", "t": 50_000, "id": 2})  # both sides reach 50 s
        await run.send("left", {"k": "a", "t": 60_000, "id": 3})
        await wait_for(lambda: (watermark_of(join) or 0) > 11_000)  # left 1 (1 s + 10 s) gone
        await run.send("right", {"k": "a", "t": 2_000, "id": 4})  # late: left 1 is forgotten
        await run.finish()
    assert found.sink.values == []  # type: ignore[attr-defined]
    assert late.sink.values == [{"k": "a", "t": 2_000, "id": 4}]  # type: ignore[attr-defined]


async def test_records_forwarded_twice_into_the_join_topic_count_once() -> None:
    app, found = make_app("interval", None)
    broker = MemoryBroker()
    codec = app.channels["joins-lr-join"].codec
    broker.create_topic("joins-lr-join", 2)
    rows: list[tuple[tuple[int, dict[str, Any]], str, int]] = [
        ((0, {"k": "a", "t": 0, "id": 0}), "L0:0", 0),
        ((1, {"k": "a", "t": 10, "id": 1}), "R0:0", 10),
    ]
    for value, origin, t in rows + rows:  # a restarted forwarder sent both again
        broker.produce(
            "joins-lr-join",
            codec.encode(value),
            b"a",
            (("asyncflow.origin", origin.encode()),),
            t,
        )
    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert found.values == [(0, 1)]


def test_a_join_of_topics_without_keys_says_which_key_it_needs() -> None:
    app = af.App("a")
    with pytest.raises(af.ConfigError, match="table_key="):
        join_table(app.topic("s", key=len), app.topic("t"), name="st")


def test_a_join_declared_twice_is_refused() -> None:
    app = af.App("a")
    s, t = app.topic("s", key=len), app.topic("t", key=len)
    join_table(s, t, name="st")
    with pytest.raises(af.ConfigError, match="already declared"):
        join_table(s, t, name="st")


def test_interval_bounds_the_wrong_way_round_are_refused() -> None:
    app = af.App("a")
    with pytest.raises(af.ConfigError, match="must not be above"):
        interval_join(
            app.topic("s", key=len),
            app.topic("t", key=len),
            name="st",
            lower=timedelta(seconds=5),
            upper=timedelta(0),
        )


async def test_one_topic_of_two_kinds_is_both_sides_of_a_join_with_where() -> None:
    app = af.App("kinds")
    events: af.Topic[Any] = app.topic("events", time="t")
    join = join_table(
        events,
        events,
        name="ap",
        stream_key=lambda e: e["seller"],
        table_key=lambda e: e["id"],
        stream_where=lambda e: e["type"] == "auction",
        table_where=lambda e: e["type"] == "person",
    )
    found = app.sink(CaptureSink("found"))

    @app.agent(join.topic)
    async def pairs(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await found.send(j.key, (j.left["id"], j.right["name"]))

    async with TestRun(app) as run:
        await run.send_many(
            "events",
            [
                {"type": "person", "id": 1, "name": "Ann", "t": 0},
                {"type": "auction", "id": 10, "seller": 1, "t": 1},
                {"type": "auction", "id": 11, "seller": 2, "t": 2},  # no such person: dropped
                {"type": "person", "id": 2, "name": "Bo", "t": 3},
            ],
        )
        await run.finish()
    assert found.sink.values == [(10, "Ann")]  # type: ignore[attr-defined]


async def test_state_in_the_loop_acts_on_the_key_of_the_result_being_handled() -> None:
    app = af.App("counted")
    left: af.Topic[Any] = app.topic("left", key=lambda v: v["k"], time="t", time_unit="ms")
    right: af.Topic[Any] = app.topic("right", key=lambda v: v["k"], time="t", time_unit="ms")
    join = interval_join(left, right, name="lr", lower=timedelta(0), upper=timedelta(seconds=1))
    counts = app.table("pairs-per-key", default=0)
    found = app.sink(CaptureSink("found"))

    @app.agent(join.topic, concurrency=2)
    async def pairs(stream: af.Stream[Any]) -> None:
        n = stream.state(counts)
        async for j in join.joined(stream):
            await found.send(j.key, (j.key, n.update(lambda c: (c or 0) + 1)))

    events: list[Ev] = [
        (0, "a", 0, 0),
        (0, "b", 5, 1),
        (1, "a", 10, 2),
        (1, "b", 12, 3),
        (1, "a", 14, 4),
    ]
    async with TestRun(app) as run:
        await produce(run, events)
        await run.finish()
    assert sorted(found.sink.values) == [("a", 1), ("a", 2), ("b", 1)]  # type: ignore[attr-defined]
    assert run.table("pairs-per-key") == {"a": 2, "b": 1}


async def test_system_wait_joins_what_waits_once_a_partition_is_quiet() -> None:
    app = af.App("quiet", idle_timeout=0.1)
    rides: af.Topic[Any] = app.topic("rides", key=lambda r: r["d"], time="t")
    drivers: af.Topic[Any] = app.topic("drivers", key=lambda d: d["id"], time="t")
    join = join_table(
        rides,
        drivers,
        name="rd",
        how="left",
        wait=timedelta(seconds=60),
        system_wait=timedelta(milliseconds=300),
    )
    found = app.sink(CaptureSink("found"))

    @app.agent(join.topic)
    async def enrich(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await found.send(j.key, (j.left["r"], j.right and j.right["name"]))

    async with TestRun(app) as run:
        await run.send("drivers", {"id": 1, "name": "Ann", "t": 0})
        await run.send("rides", {"r": "x", "d": 1, "t": 5})  # 60 s of wait: only quiet frees it
        await wait_for(lambda: bool(found.sink.values), timeout=10)  # type: ignore[attr-defined]
        await run.finish()
    assert found.sink.values == [("x", "Ann")]  # type: ignore[attr-defined]


class FlakyLate:
    """A late output that refuses one value (raises), and keeps the others."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    async def send(self, key: Any, value: Any) -> None:
        if value["id"] == 4:
            raise RuntimeError("late output refused id 4")
        self.values.append(value["id"])


async def test_a_late_output_that_raises_dead_letters_that_event_and_the_join_goes_on() -> None:
    app = af.App("flaky")
    left: af.Topic[Any] = app.topic("left", key=lambda v: v["k"], time="t", time_unit="ms")
    right: af.Topic[Any] = app.topic("right", key=lambda v: v["k"], time="t", time_unit="ms")
    late = FlakyLate()
    join = interval_join(
        left, right, name="lr", lower=timedelta(0), upper=timedelta(seconds=1), late=late
    )
    found = app.sink(CaptureSink("found"))

    @app.agent(join.topic)
    async def pairs(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await found.send(j.key, (j.left["id"], j.right["id"]))

    async with TestRun(app) as run:
        await run.send("left", {"k": "a", "t": 50_000, "id": 1})
        await run.send("right", {"k": "a", "t": 50_500, "id": 2})
        await wait_for(lambda: bool(found.sink.values))  # type: ignore[attr-defined]
        for i, t in ((3, 1_000), (4, 2_000), (5, 3_000)):  # late, in one slice
            await run.send("right", {"k": "a", "t": t, "id": i})
        await run.send("right", {"k": "a", "t": 50_900, "id": 6})
        await run.finish()
        dead = [reason_of(r) for r in run.dead_letters()]
    assert found.sink.values == [(1, 2), (1, 6)]  # type: ignore[attr-defined]
    assert late.values == [3, 5]
    assert len(dead) == 1 and "late output refused id 4" in dead[0]


async def test_a_takeover_between_two_workers_keeps_the_table_and_finds_the_batch_matches() -> None:
    rng = random.Random(5)
    times = sorted(rng.sample(range(20_000), 600))
    events: list[Ev] = [
        (rng.randrange(2), rng.choice("abcdefgh"), t, i) for i, t in enumerate(times)
    ]
    events.sort(key=lambda e: e[2] + rng.randrange(WAIT_MS))
    broker = MemoryBroker()
    worker_b, found_b = make_app("table", None, "left")
    worker_a, found_a = make_app("table", None, "left")
    async with TestRun(worker_b, broker=broker) as run_b:
        await produce(run_b, events[:200])
        await wait_for(lambda: worker_b.metrics.get("events_in") >= 200)
        async with TestRun(worker_a, broker=broker) as run_a:  # takes half the partitions
            await wait_for(lambda: worker_a.metrics.get("state.restored_shards") >= 1)
            await produce(run_a, events[200:400])
            await run_b.stop()  # B leaves: A takes its partitions over, table and all
            await produce(run_a, events[400:])
            await run_a.finish()
    got = sorted(
        found_b.values + found_a.values, key=lambda p: (p[0], -1 if p[1] is None else p[1])
    )
    expected = batch_as_of(events, "left")
    assert got == sorted(expected, key=lambda p: (p[0], -1 if p[1] is None else p[1]))
    assert worker_a.metrics.get("late_events") == worker_b.metrics.get("late_events") == 0


async def test_state_ahead_of_the_committed_offsets_finds_no_match_twice() -> None:
    # a crash after the changelog write and before the offset commit: every input and the
    # join topic are read again from where the group had committed (here: the start)
    rng = random.Random(9)
    times = sorted(rng.sample(range(5_000), 300))
    events: list[Ev] = [(rng.randrange(2), rng.choice("abcd"), t, i) for i, t in enumerate(times)]
    for kind in ("interval", "table"):
        broker = MemoryBroker()
        app, found = make_app(kind, None, "left")
        async with TestRun(app, broker=broker) as run:
            await produce(run, events)
            await run.finish()
        first = list(found.values)
        group = broker._groups["joins"]
        for tp in list(group.committed):
            group.committed[tp] = 1  # back to offset 0, as if the commits never happened
        for t in broker.topics.values():
            t.ended = False
        app, found = make_app(kind, None, "left")
        async with TestRun(app, broker=broker) as run:
            await run.finish()
        assert found.values == [], f"{kind}: the replay found matches the state had already"
        for topic in ("left", "right", "joins-lr-join"):  # read again (skipped) and committed
            logs = broker.topics[topic].partitions
            assert all(
                broker.committed("joins", topic, p) == (len(log) or None)
                for p, log in enumerate(logs)
            )
        expected = batch_interval(events) if kind == "interval" else batch_as_of(events, "left")
        assert sorted(first, key=str) == sorted(expected, key=str)


async def test_as_of_latest_joins_each_event_at_once_with_the_value_read_before_it() -> None:
    app = af.App("latest")
    rides: af.Topic[Any] = app.topic("rides", key=lambda r: r["d"])  # no event time needed
    drivers: af.Topic[Any] = app.topic("drivers", key=lambda d: d["id"])
    join = join_table(rides, drivers, name="rd", how="left", as_of="latest")
    found = app.sink(CaptureSink("found"))

    @app.agent(join.topic)
    async def enrich(stream: af.Stream[Any]) -> None:
        async for j in join.joined(stream):
            await found.send(j.key, (j.left["r"], j.right and j.right["name"]))

    async with TestRun(app) as run:
        await run.send("drivers", {"id": 1, "name": "Ann"})
        await wait_for(lambda: app.metrics.get("events_in") >= 2)  # read and forwarded
        await run.send("rides", {"r": "x", "d": 1})
        await wait_for(lambda: bool(found.sink.values))  # type: ignore[attr-defined]
        await run.send("drivers", {"id": 1, "name": "Ann B."})
        await wait_for(lambda: app.metrics.get("events_in") >= 6)
        await run.send("rides", {"r": "y", "d": 1})
        await run.finish()
    assert found.sink.values == [("x", "Ann"), ("y", "Ann B.")]  # type: ignore[attr-defined]
