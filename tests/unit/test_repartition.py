"""Repartitioning: ``topic.repartition(name, key=...)`` re-keys an input through an internal topic.

Records keyed at random (or not at all) are forwarded to
``<app>-<name>-repartition`` keyed by the new key, so every event of a key is on
one partition there, with its event time and headers; windows downstream give
what a plain batch computation of the same readings gives. A key that cannot be
computed is a dead letter, and a mistake in the declaration is one clear error.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.repartition import KeySpread, repartition_key_bytes
from asyncflow.testing import CaptureSink, TestRun, wait_for

WINDOW_S = 5
T0 = 1_700_000_000


def readings(n: int, sensors: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"sensor": f"s{rng.randrange(sensors)}", "v": rng.randrange(100), "t": T0 + i * 0.37}
        for i in range(n)
    ]


def batch_means(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Per (sensor, 5 s window start), the mean of ``v``: the plain computation."""
    sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0])
    for r in rows:
        acc = sums[(r["sensor"], int(r["t"] // WINDOW_S * WINDOW_S))]
        acc[0] += r["v"]
        acc[1] += 1
    return {k: s / n for k, (s, n) in sums.items()}


def windowed_app(partitions: int = 3) -> tuple[af.App, CaptureSink]:
    """Readings keyed at random on ``raw``; repartitioned by sensor; 5 s tumbling means."""
    app = af.App("sensors")
    raw = app.topic("raw", time="t", partitions=partitions)
    by_sensor = raw.repartition("by-sensor", key=lambda r: r["sensor"])
    means = CaptureSink("means")
    out = app.sink(means)

    @app.agent(by_sensor, concurrency=2)
    async def average(stream: af.Stream[dict[str, Any]]) -> None:
        windows = stream.window(
            af.Tumbling(timedelta(seconds=WINDOW_S)), aggregate=af.Mean("v"), wait=timedelta(0)
        )
        async for w in windows:
            await out.send(w.key, {"sensor": w.key, "start": w.start_ms // 1000, "mean": w.value})

    return app, means


async def run_windowed(rows: list[dict[str, Any]], partitions: int = 3) -> tuple[
    list[dict[str, Any]], MemoryBroker
]:
    app, means = windowed_app(partitions)
    broker = MemoryBroker()
    rng = random.Random(7)
    async with TestRun(app, broker=broker) as run:
        for r in rows:  # random record keys: one sensor's readings on every partition
            await run.send("raw", r, key=f"r{rng.randrange(10**6)}")
        await run.finish()
    return list(means.values), broker


async def test_windows_after_a_repartition_equal_a_batch_computation_of_randomly_keyed_input() -> None:
    rows = readings(3000, sensors=23)
    got, _ = await run_windowed(rows)
    by_window = {(r["sensor"], r["start"]): r["mean"] for r in got}
    assert len(by_window) == len(got)  # each window once
    assert by_window == pytest.approx(batch_means(rows))


async def test_every_record_of_a_key_lands_on_one_partition_of_the_internal_topic() -> None:
    rows = readings(2000, sensors=31)
    _, broker = await run_windowed(rows, partitions=4)
    internal = broker.topic("sensors-by-sensor-repartition")
    assert len(internal.partitions) == 4  # the source's count
    where: dict[bytes, set[int]] = defaultdict(set)
    markers = 0
    for p, log in enumerate(internal.partitions):
        for rec in log:
            if rec.key is None:  # a watermark marker: the forwarder's, into every partition
                markers += 1
                assert dict(rec.headers)["asyncflow.watermark"].endswith(b"/4")
            else:
                where[rec.key].add(p)
    assert len(where) == 31 and all(len(ps) == 1 for ps in where.values())
    assert sum(len(log) for log in internal.partitions) - markers == len(rows)
    assert markers > 0 and markers % 4 == 0


async def test_a_source_partition_read_late_holds_the_windows_back_instead_of_being_late() -> None:
    # partition 0 of the input is forwarded entirely before partition 1 has a record: its
    # markers alone must not move the internal partitions' event time past partition 1's
    rows = readings(600, sensors=5)
    app, means = windowed_app(partitions=2)
    broker = MemoryBroker()
    raw = app.channels["raw"]
    internal = "sensors-by-sensor-repartition"
    async with TestRun(app, broker=broker) as run:
        for r in rows[::2]:
            broker.produce("raw", raw.codec.encode(r), None, partition=0)
        await wait_for(lambda: internal in broker.topics and sum(
            1 for log in broker.topic(internal).partitions for rec in log if rec.key
        ) == len(rows[::2]))
        for r in rows[1::2]:
            broker.produce("raw", raw.codec.encode(r), None, partition=1)
        await run.finish()
        dead = broker.records("sensors-dead-letters") if "sensors-dead-letters" in broker.topics else []
    assert dead == []  # no late events
    got = {(r["sensor"], r["start"]): r["mean"] for r in means.values}
    assert got == pytest.approx(batch_means(rows))


async def test_a_forwarded_record_keeps_the_event_time_and_the_headers() -> None:
    app = af.App("fwd")
    clicks = app.topic("clicks", partitions=2)  # event time: the record timestamps
    by_user = clicks.repartition("by-user", key=lambda c: c["user"])
    seen = CaptureSink("seen")
    out = app.sink(seen)

    @app.agent(by_user)
    async def copy(stream: af.Stream[dict[str, Any]]) -> None:
        async for ev in stream.events():
            await out.send(ev.key, (ev.value["n"], ev.time, dict(ev.headers)))

    async with TestRun(app) as run:
        for n in range(10):
            await run.send("clicks", {"user": f"u{n % 3}", "n": n}, timestamp=1_000 + n,
                           headers=[("trace", f"t{n}".encode())])
        await run.finish()
    got = sorted(seen.values)
    assert [(n, t, h["trace"]) for n, t, h in got] == [
        (n, 1_000 + n, f"t{n}".encode()) for n in range(10)
    ]
    origins = sorted(h["asyncflow.origin"] for _, _, h in got)  # "<partition>:<offset>"
    assert len(set(origins)) == 10 and all(o[:2] in (b"0:", b"1:") for o in origins)
    assert sorted(r.key for r in seen.records) == sorted(f"u{n % 3}" for n in range(10))


async def test_a_value_whose_key_cannot_be_computed_is_a_dead_letter_and_the_rest_go_on() -> None:
    app = af.App("bad-keys", dead_letter="dead")
    orders = app.topic("orders")
    by_user = orders.repartition("by-user", key=lambda o: o["user"])
    got = CaptureSink("got")
    out = app.sink(got)

    @app.agent(by_user)
    async def copy(stream: af.Stream[dict[str, Any]]) -> None:
        async for o in stream:
            await out.send(None, o["n"])

    async with TestRun(app) as run:
        for n, order in enumerate([{"user": "a"}, {"nobody": 1}, {"user": None}, {"user": "b"}]):
            await run.send("orders", {**order, "n": n})
        await run.finish()
        dead = run.broker.records("dead")
    assert sorted(got.values) == [0, 3]
    reasons = [dict(r.headers)["asyncflow.reason"].decode() for r in dead]
    assert len(reasons) == 2
    assert "repartition 'by-user': KeyError: 'user'" in reasons[0]
    assert "repartition 'by-user'" in reasons[1] and "is None" in reasons[1]


async def test_the_internal_topic_takes_the_partition_count_the_source_has_on_the_broker() -> None:
    broker = MemoryBroker()
    broker.create_topic("raw", 5)  # created elsewhere with 5 partitions; declared with 1
    app = af.App("count")
    raw = app.topic("raw")
    by_x = raw.repartition("by-x", key=lambda v: v)

    @app.agent(by_x)
    async def drain(stream: af.Stream[int]) -> None:
        async for _ in stream:
            pass

    async with TestRun(app, broker=broker) as run:
        await run.finish()
    assert len(broker.topic("count-by-x-repartition").partitions) == 5


def test_an_explicit_partition_count_is_the_internal_topics() -> None:
    app = af.App("a")
    t = app.topic("raw", partitions=2).repartition("by-x", key=lambda v: v, partitions=8)
    assert (t.spec.partitions, t.spec.partitions_like) == (8, None)


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (lambda app: app.topic("t").repartition("a b", key=len), "not usable in a topic name"),
        (lambda app: app.topic("t").repartition("x"), "needs key="),
        (lambda app: app.topic("t").repartition("x", key=len, partitions=0), "partitions=0"),
        (
            lambda app: app.source(MemoryBroker().source([], "g"), name="ext").repartition(
                "x", key=len
            ),
            "needs partitions=N",
        ),
    ],
)
def test_a_mistake_in_a_repartition_is_one_clear_error(declare: Any, message: str) -> None:
    with pytest.raises(af.ConfigError, match=message):
        declare(af.App("a"))


def test_the_same_repartition_twice_is_refused() -> None:
    app = af.App("a")
    t = app.topic("t")
    t.repartition("x", key=len)
    with pytest.raises(af.ConfigError, match="already declared"):
        t.repartition("x", key=len)


def test_the_input_key_function_is_the_default_new_key() -> None:
    app = af.App("a")
    t = app.topic("t", key=lambda v: v["id"]).repartition("by-id")
    assert t.key_of({"id": 3}) == 3


@pytest.mark.parametrize(
    ("key", "raw"),
    [("s-1", b"s-1"), (b"\x00k", b"\x00k"), (42, b"42"), (("a", 1), b'["a",1]'), (2.5, b"2.5")],
)
def test_repartition_key_bytes_are_the_same_for_equal_keys(key: Any, raw: bytes) -> None:
    assert repartition_key_bytes(key) == raw


def test_a_key_seen_on_two_partitions_logs_one_warning_that_says_to_repartition(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "asyncflow.repartition")
    spread = KeySpread("readings", "key function")
    for p, k in [(0, "a"), (1, "b"), (0, "a"), (1, "a"), (2, "a"), (2, "b")]:
        spread.observe(p, k)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "'readings'" in lines[0] and "'a'" in lines[0] and ".repartition(" in lines[0]


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcdefg"), st.integers(0, 50), st.floats(0, 60)),
        min_size=1,
        max_size=120,
    ),
    st.integers(1, 4),
)
async def test_repartitioned_windows_equal_the_batch_means_for_any_readings(
    rows: list[tuple[str, int, float]], partitions: int
) -> None:
    # event times are sorted: a repartition keeps event time, not the order between
    # source partitions, so disorder would be a matter of the windows' wait
    data = [
        {"sensor": s, "v": v, "t": T0 + t} for s, v, t in sorted(rows, key=lambda r: r[2])
    ]
    got, _ = await run_windowed(data, partitions)
    assert {(r["sensor"], r["start"]): r["mean"] for r in got} == pytest.approx(batch_means(data))
    assert len(got) == len(batch_means(data))


async def test_a_worker_warns_once_when_a_topic_keyed_by_its_values_has_a_key_on_two_partitions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "asyncflow.repartition")
    app = af.App("split")
    raw = app.topic("raw", key=lambda r: r["sensor"], partitions=2)

    @app.agent(raw)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        async for _ in stream:
            pass

    async with TestRun(app) as run:
        for i in range(40):  # the same sensor on both partitions
            run.broker.produce("raw", b'{"sensor": "s1"}', None, partition=i % 2)
        await run.finish()
    lines = [r.getMessage() for r in caplog.records if "two partitions" in r.getMessage()]
    assert len(lines) == 1 and "'raw'" in lines[0] and "'s1'" in lines[0]


async def test_no_warning_of_split_keys_for_an_input_that_is_repartitioned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "asyncflow.repartition")
    rows = readings(500, sensors=3)
    await run_windowed(rows, partitions=3)
    assert not [r for r in caplog.records if "two partitions" in r.getMessage()]


async def test_records_a_restarted_forwarder_sends_again_count_once_downstream() -> None:
    # what a forwarder killed before its commit leaves: the records it forwarded since, twice
    app, means = windowed_app(partitions=1)
    rows = readings(400, sensors=4)
    broker = MemoryBroker()
    raw = app.channels["raw"]
    internal = "sensors-by-sensor-repartition"
    broker.create_topic(internal, 1)
    copies = [  # as the forwarder writes them: key, value, event time, origin header
        (r["sensor"].encode(), raw.codec.encode(r), round(r["t"] * 1000), i)
        for i, r in enumerate(rows)
    ]
    for kb, vb, t, i in copies + copies[150:300]:  # offsets 150..299 forwarded twice
        broker.produce(internal, vb, kb, (("asyncflow.origin", f"0:{i}".encode()),), t)
    for kb, vb, t, i in copies[300:]:
        broker.produce(internal, vb, kb, (("asyncflow.origin", f"0:{i}".encode()),), t)
    broker.produce("raw", raw.codec.encode({"sensor": "end", "v": 0, "t": T0 + 10**6}), None)
    async with TestRun(app, broker=broker) as run:
        await run.finish()
    got = {(r["sensor"], r["start"]): r["mean"] for r in means.values if r["sensor"] != "end"}
    assert got == pytest.approx(batch_means(rows))
