"""The end of a bounded input travels through the topics an app writes to itself (memory broker).

Agent A reads ``raw`` and sends to ``mid``; agent B reads ``mid``. Once ``raw``
has ended, A's lanes finish and what they sent is flushed, ``mid`` ends and B
finishes in turn, so the worker stops by itself with exactly what a plain batch
computation of the same input gives, windows in the later stages included.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.runtime import InputEnds
from asyncflow.testing import TestRun

WINDOW = 10  # seconds

READINGS = [
    {"id": f"s{i % 7}", "v": (i * 37) % 101, "t": 1_700_000_000 + i * 0.7} for i in range(3000)
]


def batch_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The plain computation of the two-stage app: per id, the sum of doubled odd values."""
    totals: Counter[str] = Counter()
    for r in rows:
        if r["v"] % 2:
            totals[r["id"]] += 2 * r["v"]
    return dict(totals)


def batch_window_counts(rows: list[dict[str, Any]]) -> dict[tuple[str, float], int]:
    """Per (id, start of the 10 s tumbling window), how many readings have an odd value."""
    counts: Counter[tuple[str, float]] = Counter()
    for r in rows:
        if r["v"] % 2:
            counts[(r["id"], r["t"] // WINDOW * WINDOW)] += 1
    return dict(counts)


def two_stage_app(partitions: int = 3) -> tuple[af.App, dict[str, int]]:
    app = af.App("two-stages")
    raw = app.topic("raw", key=lambda r: r["id"], partitions=partitions)
    mid = app.topic("mid", key=lambda r: r["id"], partitions=partitions)
    totals: dict[str, int] = {}

    @app.agent(raw, concurrency=3)
    async def double_odd(stream: af.Stream[dict[str, Any]]) -> None:
        async for r in stream:
            if r["v"] % 2:
                await mid.send(r["id"], {**r, "v": 2 * r["v"]})

    @app.agent(mid, concurrency=2)
    async def total(stream: af.Stream[dict[str, Any]]) -> None:
        async for r in stream:
            totals[r["id"]] = totals.get(r["id"], 0) + r["v"]

    return app, totals


def three_stage_windowed_app() -> af.App:
    """raw -> parse -> parsed -> keep_odd (a generator with sink=) -> odd -> count (windows) -> counts."""
    app = af.App("three-stages")
    raw = app.topic("raw", key=lambda r: r["id"], partitions=2)
    parsed = app.topic("parsed", key=lambda r: r["id"], time="t", partitions=3)
    odd = app.topic("odd", key=lambda r: r["id"], time="t", partitions=2)
    counts = app.topic("counts")

    async def forward(r: dict[str, Any]) -> None:  # the topic is reached through a helper
        await parsed.send(r["id"], {"id": r["id"], "v": int(r["v"]), "t": r["t"]})

    @app.agent(raw, concurrency=2)
    async def parse(stream: af.Stream[dict[str, Any]]) -> None:
        async for r in stream:
            await forward(r)

    @app.agent(parsed, concurrency=2, sink=odd)
    async def keep_odd(stream: af.Stream[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        async for r in stream:
            if r["v"] % 2:
                yield r

    @app.agent(odd, concurrency=2)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        windows = stream.window(af.Tumbling(timedelta(seconds=WINDOW)), aggregate=af.Count())
        async for w in windows:
            await counts.send(w.key, {"id": w.key, "start": w.start.timestamp(), "n": w.value})

    return app


async def test_a_two_stage_app_finishes_with_testrun_finish_and_gives_the_batch_result() -> None:
    app, totals = two_stage_app()
    async with TestRun(app) as run:
        for r in READINGS:
            await run.send("raw", r, key=r["id"])
        await run.finish()  # ends "mid" too, early: the worker holds it until double_odd is done
    assert totals == batch_totals(READINGS)


async def test_a_two_stage_app_stops_by_itself_with_run_stop_when_idle() -> None:
    app, totals = two_stage_app()
    raw = app.topic("raw")

    @app.task
    async def replay() -> None:
        for r in READINGS:
            await raw.send(r["id"], r)
        await raw.end()

    broker = MemoryBroker()
    app.set_broker(broker)
    await app.run(stop_when_idle=True)
    assert totals == batch_totals(READINGS)
    assert broker.topic("mid").finished


async def test_a_three_stage_app_fires_the_last_windows_of_its_last_stage() -> None:
    app = three_stage_windowed_app()
    async with TestRun(app) as run:
        for r in READINGS:
            await run.send("raw", {**r, "v": str(r["v"])}, key=r["id"])
        await run.finish()
        got = run.outputs("counts")
    by_window = {(c["id"], c["start"]): c["n"] for c in got}
    assert len(by_window) == len(got)  # each window once
    assert by_window == batch_window_counts(READINGS)


async def test_a_stage_that_sends_nothing_still_ends_the_next_one() -> None:
    app, totals = two_stage_app()
    even = [r for r in READINGS if r["v"] % 2 == 0]
    async with TestRun(app) as run:
        for r in even:
            await run.send("raw", r, key=r["id"])
        await run.finish()
    assert totals == {}


def test_the_writers_of_an_internal_topic_are_its_sinks_and_the_topics_its_code_uses() -> None:
    ends = InputEnds(three_stage_windowed_app(), broker=None)
    assert ends.writers == {"parsed": ["parse"], "odd": ["keep_odd"]}
    assert ends.cyclic == []


def test_nothing_ends_on_a_broker_whose_topics_never_end() -> None:
    class KafkaLike:  # no add_writer / release_writer: topics are unbounded
        url = "kafka://localhost:9092"

    assert not InputEnds(two_stage_app()[0], broker=KafkaLike()).active


async def test_a_cycle_is_named_in_one_warning_and_the_worker_runs_until_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = af.App("loop")
    a_in, mid = app.topic("a-in"), app.topic("mid")
    seen: list[int] = []

    @app.agent(a_in)
    async def a(stream: af.Stream[int]) -> None:
        async for n in stream:
            seen.append(n)
            await mid.send(None, n + 1)

    @app.agent(mid)
    async def b(stream: af.Stream[int]) -> None:
        async for n in stream:
            if n < 5:
                await a_in.send(None, n)

    assert InputEnds(app, broker=None).cyclic == ["a-in", "mid"]
    caplog.set_level(logging.WARNING, "asyncflow.worker")
    async with TestRun(app) as run:
        await run.send("a-in", 0)
        cycle = [r.getMessage() for r in caplog.records if "cycle" in r.getMessage()]
        assert len(cycle) == 1 and "a-in, mid" in cycle[0] and "until it is stopped" in cycle[0]
        await run.stop()
    assert seen[0] == 0


def test_the_cli_worker_exits_0_on_a_two_stage_module(tmp_path: Path) -> None:
    (tmp_path / "stages.py").write_text(textwrap.dedent('''
        import asyncflow as af

        app = af.App("cli-stages")
        raw, mid = app.topic("raw", partitions=2), app.topic("mid", partitions=2)
        total = 0

        @app.agent(raw, concurrency=2)
        async def square(stream):
            async for n in stream:
                await mid.send(str(n), n * n)

        @app.agent(mid)
        async def add(stream):
            global total
            async for n in stream:
                total += n
            print("total", total, flush=True)

        @app.task
        async def numbers():
            for n in range(1000):
                await raw.send(str(n), n)
            await raw.end()
    '''))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("asyncflow")), "worker", "stages:app"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "ASYNCFLOW_BROKER": "memory://",
             "ASYNCFLOW_STATE_STORE": "memory"},
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails the test instead of stalling the suite
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["total", str(sum(n * n for n in range(1000)))]
