"""``stream.map_async``: many lookups in flight per lane, order kept per key, bounded, timed out,
retried, cached; failures to the dead letters; nothing in flight is ever committed.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncflow as af
from asyncflow.errors import AgentError, ConfigError
from asyncflow.testing import CaptureSink, TestRun, reason_of, stream_of


class Service:
    """A lookup with chosen latencies that counts calls and what is in flight at once."""

    def __init__(self, latency: Any = 0.0) -> None:
        self.latency = latency
        self.calls: list[Any] = []
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, value: Any) -> Any:
        self.calls.append(value)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            delay = self.latency(value) if callable(self.latency) else self.latency
            await asyncio.sleep(delay)
            return ("looked up", value)
        finally:
            self.in_flight -= 1


def per_key(values: list[Any], keys: list[Any]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = defaultdict(list)
    for k, v in zip(keys, values, strict=True):
        out[k].append(v)
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.floats(0, 0.004)), min_size=1, max_size=60),
    st.integers(1, 16),
)
def test_results_keep_per_key_order_under_random_latencies(
    items: list[tuple[int, float]], capacity: int
) -> None:
    keys = [k for k, _ in items]
    latency = {i: d for i, (_, d) in enumerate(items)}
    service = Service(lambda v: latency[v])

    async def run() -> tuple[list[Any], list[Any]]:
        s = stream_of(list(range(len(items))), keys=keys)
        got, got_keys = [], []
        async for r in s.map_async(service, capacity=capacity):
            got.append(r[1])
            assert s.current is not None and s.current.value == r
            got_keys.append(s.current.key)
        return got, got_keys

    got, got_keys = asyncio.run(run())
    assert sorted(got) == list(range(len(items)))  # every event once
    assert got_keys == [keys[v] for v in got]  # current is the result's own event
    expected = per_key(list(range(len(items))), keys)
    assert per_key(got, [keys[v] for v in got]) == expected  # in order within each key
    assert service.peak <= capacity


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 0.003), min_size=1, max_size=40), st.sampled_from(["stream", "none"]))
def test_stream_order_is_arrival_order_and_no_order_still_gives_each_result_once(
    latencies: list[float], order: Any
) -> None:
    service = Service(lambda v: latencies[v])

    async def run() -> list[Any]:
        s = stream_of(list(range(len(latencies))), keys=[0] * len(latencies))
        return [r[1] async for r in s.map_async(service, capacity=8, order=order)]

    got = asyncio.run(run())
    if order == "stream":
        assert got == list(range(len(latencies)))
    else:
        assert sorted(got) == list(range(len(latencies)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 30_000)), min_size=1, max_size=40))
def test_windows_after_map_async_equal_a_batch_computation_nothing_made_late(
    events: list[tuple[str, int]],
) -> None:
    """Events come in time order per partition; lookups reorder nothing across a watermark."""
    events = sorted(events, key=lambda e: e[1])
    service = Service(lambda v: random.random() * 0.002)

    async def run() -> list[tuple[str, int, int]]:
        s = stream_of([t for _, t in events], keys=[k for k, _ in events],
                      times=[t for _, t in events])
        windows = s.map_async(service, order="none").window(
            af.Tumbling(timedelta(seconds=5)), aggregate=af.Count())
        return sorted([(w.key, w.start_ms, w.value) async for w in windows])

    expected: dict[tuple[str, int], int] = defaultdict(int)
    for k, t in events:
        expected[(k, t - t % 5000)] += 1
    assert asyncio.run(run()) == sorted((k, s, n) for (k, s), n in expected.items())


@pytest.mark.asyncio
async def test_capacity_bounds_the_lookups_of_a_lane_and_an_inflight_limit_bounds_all_lanes() -> None:
    service = Service(0.005)
    limit = af.InFlight(6)
    app = af.App("bounded")
    names = app.topic("names", partitions=4)
    out = app.sink(CaptureSink("out"))

    @app.agent(names, concurrency=4)
    async def look(stream: af.Stream[Any]) -> None:
        async for r in stream.map_async(service, capacity=4, limit=limit):
            await out.send(stream.current.key if stream.current else None, r)

    async with TestRun(app) as run:
        await run.send_many("names", range(400), key=lambda v: v % 50)
        await run.finish()
    assert len(out.sink.values) == 400  # type: ignore[attr-defined]
    assert 4 < service.peak <= 6  # more than one lane's capacity, never over the shared limit
    assert limit.available == 6


@pytest.mark.asyncio
async def test_a_call_past_its_timeout_is_retried_and_then_dead_lettered_with_the_reason() -> None:
    attempts: dict[int, int] = defaultdict(int)

    async def flaky(v: int) -> int:
        attempts[v] += 1
        if v == 1 and attempts[v] < 3:
            await asyncio.sleep(10)  # hangs: cut by the timeout
        if v == 2:
            await asyncio.sleep(10)  # always hangs
        return v * 10

    app = af.App("timeouts")
    numbers, results = app.topic("numbers"), app.topic("results")

    @app.agent(numbers)
    async def look(stream: af.Stream[int]) -> None:
        mapped = stream.map_async(flaky, timeout=0.02,
                                  retry=af.Retry(times=2, backoff=0.001, max_backoff=0.002))
        async for r in mapped:
            await results.send(None, r)

    async with TestRun(app) as run:
        await run.send_many("numbers", [0, 1, 2, 3])
        await run.finish()
        [dead] = run.dead_letters()
        out = run.outputs("results")
    assert out == [0, 10, 30]
    assert attempts[1] == 3 and attempts[2] == 3  # one call and two retries each
    assert dead.value == b"2"
    assert reason_of(dead) == "lookup failed: TimeoutError: no answer within 0.02s (3 attempts)"
    assert app.metrics.get("lookup_retries") == 4 and app.metrics.get("lookup_timeouts") == 5


@pytest.mark.asyncio
async def test_errors_not_named_in_retry_on_are_not_retried_and_a_fallback_takes_their_place() -> None:
    calls: list[int] = []

    async def picky(v: int) -> int:
        calls.append(v)
        if v < 0:
            raise ValueError(f"{v} is negative")
        return v

    async def run(**options: Any) -> list[Any]:
        s = stream_of([1, -2, 3])
        return [r async for r in s.map_async(picky, retry=af.Retry(times=5), **options)]

    got = await run(fallback=lambda v, error: f"fallback for {v}: {error}")
    assert got == [1, "fallback for -2: -2 is negative", 3]
    assert calls == [1, -2, 3]  # ValueError is not in retry_on: no retry


@pytest.mark.asyncio
async def test_a_cache_answers_repeated_values_and_shares_a_call_in_flight() -> None:
    service = Service(0.01)

    async def run(values: list[str], cache: af.Cache) -> list[Any]:
        s = stream_of(values)
        return [r[1] async for r in s.map_async(service, cache=cache, capacity=10)]

    values = ["a", "b", "a", "a", "c", "b"]
    assert await run(values, af.Cache(size=10)) == values
    assert sorted(service.calls) == ["a", "b", "c"]  # in flight at once: shared, not repeated

    service.calls.clear()
    small = af.Cache(size=1, ttl=None)
    s = stream_of(["a", "b", "a"])
    assert [r[1] async for r in s.map_async(service, cache=small, capacity=1)] == ["a", "b", "a"]
    assert service.calls == ["a", "b", "a"]  # size 1: "b" pushed "a" out

    service.calls.clear()
    s = stream_of(["x", "y"])
    keyed = af.Cache(size=10, key=lambda v: "same")
    assert [r[1] async for r in s.map_async(service, cache=keyed, capacity=1)] == ["x", "x"]
    assert service.calls == ["x"]  # one cache key for both


@pytest.mark.asyncio
async def test_cache_entries_expire_after_their_ttl() -> None:
    service = Service(0.0)
    cache = af.Cache(size=10, ttl=timedelta(milliseconds=20))
    app = af.App("ttl")
    ips = app.topic("ips")

    @app.agent(ips)
    async def look(stream: af.Stream[str]) -> None:
        async for _ in stream.map_async(service, cache=cache, capacity=1):
            pass

    async with TestRun(app) as run:
        await run.send("ips", "1.1.1.1")
        await run.send("ips", "1.1.1.1")
        await asyncio.sleep(0.2)
        await run.send("ips", "1.1.1.1")
        await run.finish()
    assert service.calls == ["1.1.1.1", "1.1.1.1"]  # the second from the cache, the third not
    assert app.metrics.get("lookup_cache_hits") == 1


@pytest.mark.asyncio
async def test_on_failure_raise_hands_the_error_to_the_agents_error_policy() -> None:
    async def lookup(v: int) -> int:
        if v == 2:
            raise ConnectionError("refused")
        await asyncio.sleep(0.001 * (5 - v))
        return v

    def build(on_error: Any) -> tuple[af.App, CaptureSink]:
        app = af.App("raise")
        numbers = app.topic("numbers")
        sink = CaptureSink("out")
        out = app.sink(sink)

        @app.agent(numbers, on_error=on_error)
        async def look(stream: af.Stream[int]) -> None:
            async for r in stream.map_async(lookup, on_failure="raise", order="stream"):
                await out.send(None, r)

        return app, sink

    app, sink = build("dead_letter")
    async with TestRun(app) as run:
        await run.send_many("numbers", [0, 1, 2, 3, 4])
        await run.finish()
        [dead] = run.dead_letters()
    assert sink.values == [0, 1, 3, 4]  # the body restarted with the same lookups in flight
    assert "ConnectionError: refused" in reason_of(dead) and dead.value == b"2"

    app, sink = build("stop")
    run = TestRun(app)
    with pytest.raises(ExceptionGroup) as info:
        async with run:
            await run.send_many("numbers", [0, 1, 2, 3])
            await run.finish()
    assert info.group_contains(AgentError, match="refused")


@pytest.mark.asyncio
async def test_no_checkpoint_covers_an_event_whose_lookup_is_in_flight() -> None:
    """A checkpoint waits for the lookups taken before its barrier: none is committed in flight."""
    gate = asyncio.Event()
    started: list[int] = []

    async def held(v: int) -> int:
        started.append(v)
        if v >= 3:
            await gate.wait()
        return v

    app = af.App("inflight", commit_interval=0.02)
    numbers, results = app.topic("numbers"), app.topic("results")

    @app.agent(numbers)
    async def look(stream: af.Stream[int]) -> None:
        async for r in stream.map_async(held, order="stream"):
            await results.send(None, r)

    async with TestRun(app) as run:
        await run.send_many("numbers", range(3))
        while run.broker.committed("inflight", "numbers", 0) != 3:
            await asyncio.sleep(0.01)
        await run.send_many("numbers", range(3, 6))
        while len(started) < 6:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # ten commit intervals while 3, 4 and 5 are in flight
        assert run.broker.committed("inflight", "numbers", 0) == 3  # still covers 0, 1, 2 only
        assert run.outputs("results") == [0, 1, 2]
        gate.set()
        await run.finish()
        assert run.broker.committed("inflight", "numbers", 0) == 6
        assert run.outputs("results") == [0, 1, 2, 3, 4, 5]


@pytest.mark.asyncio
async def test_a_stop_with_lookups_hanging_cancels_them_and_commits_none_of_them() -> None:
    cancelled: list[int] = []
    started: list[int] = []

    async def never(v: int) -> int:
        started.append(v)
        if v == 0:
            return v
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(v)
            raise
        return v

    app = af.App("cancel", commit_interval=0.02, shutdown_timeout=0.3)
    numbers = app.topic("numbers")

    @app.agent(numbers)
    async def look(stream: af.Stream[int]) -> None:
        async for _ in stream.map_async(never):
            pass

    async with TestRun(app) as run:
        await run.send("numbers", 0)
        while run.broker.committed("cancel", "numbers", 0) != 1:
            await asyncio.sleep(0.01)
        await run.send_many("numbers", range(1, 4))
        while len(started) < 4:
            await asyncio.sleep(0.01)
        await run.stop()
    assert sorted(cancelled) == [1, 2, 3]
    assert run.broker.committed("cancel", "numbers", 0) == 1  # only the event that was answered


@pytest.mark.asyncio
async def test_a_slow_lookup_fills_the_lane_and_pauses_the_partition_instead_of_growing() -> None:
    service = Service(0.002)
    app = af.App("pressure", lane_capacity=50, fetch_max=50)
    numbers = app.topic("numbers")
    seen: list[int] = []

    @app.agent(numbers)
    async def look(stream: af.Stream[int]) -> None:
        mapped = stream.map_async(service, capacity=10)
        async for _ in mapped:
            seen.append(mapped.in_flight)

    async with TestRun(app) as run:
        await run.send_many("numbers", range(2000))
        await run.finish()
    assert len(seen) == 2000
    assert max(seen) <= 10 + 50  # capacity plus one lane slice taken and not started
    assert service.peak <= 10
    assert (app.metrics.get("lanes.peak") or 0) <= 50 + 50  # the lane queue held to its bound


def test_settings_out_of_range_are_refused_with_one_line() -> None:
    async def f(v: Any) -> Any:
        return v

    with pytest.raises(ConfigError, match="capacity=0"):
        stream_of([]).map_async(f, capacity=0)
    with pytest.raises(ConfigError, match="order='sorted'"):
        stream_of([]).map_async(f, order="sorted")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout=0"):
        stream_of([]).map_async(f, timeout=0)
    with pytest.raises(ConfigError, match="InFlight"):
        af.InFlight(0)


@pytest.mark.asyncio
async def test_one_cache_object_is_one_store_shared_by_every_lane() -> None:
    service = Service(0.0)
    cache = af.Cache(size=100, key=lambda v: v["ip"])
    app = af.App("shared-cache")
    visits = app.topic("visits", partitions=4)
    done: list[Any] = []

    @app.agent(visits, concurrency=4)
    async def look(stream: af.Stream[Any]) -> None:
        async for r in stream.map_async(lambda v: service(v["ip"]), cache=cache, capacity=1):
            done.append(r)

    async with TestRun(app) as run:
        for user in range(8):  # eight users (eight keys, spread over the lanes), one address
            await run.send("visits", {"user": user, "ip": "1.1.1.1"}, key=user)
            while len(done) <= user:
                await asyncio.sleep(0.005)
        await run.finish()
    assert service.calls == ["1.1.1.1"]


@pytest.mark.asyncio
async def test_combine_keeps_the_input_beside_the_result_and_the_cache_holds_the_lookup() -> None:
    calls: list[str] = []

    async def country(ip: str) -> str:
        calls.append(ip)
        return {"1.1.1.1": "AU"}.get(ip, "?")

    s = stream_of([{"ip": "1.1.1.1", "user": 1}, {"ip": "1.1.1.1", "user": 2}])
    mapped = s.map_async(lambda v: country(v["ip"]), capacity=1,
                         cache=af.Cache(key=lambda v: v["ip"]),
                         combine=lambda v, c: {**v, "country": c})
    assert [r async for r in mapped] == [
        {"ip": "1.1.1.1", "user": 1, "country": "AU"},
        {"ip": "1.1.1.1", "user": 2, "country": "AU"},
    ]
    assert calls == ["1.1.1.1"]
