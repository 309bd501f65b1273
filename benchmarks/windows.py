"""Window benchmark: the window operator beside a hand-written dict aggregation of the same events.

1,000,000 events (``--events``) over 1,000 keys, 10,000 events per second of
event time, each up to 2 s out of order; the watermark (frontier - 2 s) moves
every 1,000 events, as the dispatcher sends one per batch. Cases:

- ``tumbling_5s_mean``: ``Tumbling(5 s)`` with ``Mean("value")``
- ``hopping_60s_10s_count``: ``Hopping(60 s, 10 s)`` with ``Count()`` (6 windows an event)

The baseline is the loop one would write by hand for the same result: dicts of
per-window accumulators, closed when the watermark passes. Both run in the
same process, alternately, ``--repeat`` times; the best time of each counts
(only ratios compare on a shared machine). Each case runs in its own process,
so its peak RSS (``resource.getrusage``) is its own; it includes the input
events held in memory (``input_rss_mb``).

Usage:
    .venv/bin/python benchmarks/windows.py                  # a table
    .venv/bin/python benchmarks/windows.py --events 200000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from heapq import heappop, heappush
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from asyncflow.windows import Count, Hopping, Mean, Tumbling, WindowOperator

KEYS = 1_000
EVENTS_PER_MS = 10
DISORDER_MS = 2_000
WAIT_MS = 2_000
WATERMARK_EVERY = 1_000
T0 = 1_709_294_400_000  # 2024-03-01T12:00:00Z

Event = tuple[str, int, dict[str, float]]
Window = tuple[str, int, int]


def make_events(n: int, seed: int = 7) -> list[Event]:
    rng = random.Random(seed)
    keys = [f"sensor-{k}" for k in range(KEYS)]
    return [
        (
            keys[rng.randrange(KEYS)],
            T0 + i // EVENTS_PER_MS - rng.randrange(DISORDER_MS),
            {"value": rng.random() * 100},
        )
        for i in range(n)
    ]


def run_operator(op: WindowOperator, events: list[Event]) -> dict[Window, Any]:
    """Events through the operator, a watermark every WATERMARK_EVERY events."""
    out: dict[Window, Any] = {}
    on_event, results = op.on_event, op.results
    frontier = events[0][1] if events else 0
    for i, (key, t, value) in enumerate(events):
        on_event(key, t, value)
        if t > frontier:
            frontier = t
        if i % WATERMARK_EVERY == WATERMARK_EVERY - 1:
            op.on_watermark(frontier, wall_ms=0)
            for r in results:
                out[r.key, r.start_ms, r.end_ms] = r.value
            results.clear()
            op.dirty.clear()  # state changes a checkpoint would export
    op.flush_all()
    for r in results:
        out[r.key, r.start_ms, r.end_ms] = r.value
    results.clear()
    return out


def baseline_tumbling_mean(events: list[Event], size: int = 5_000) -> dict[Window, Any]:
    """The hand-written ceiling: {end: {key: [sum, n]}}, closed as the watermark passes."""
    out: dict[Window, Any] = {}
    buckets: dict[int, defaultdict[str, list[float]]] = {}
    ends: list[int] = []
    frontier = events[0][1] if events else 0
    for i, (key, t, value) in enumerate(events):
        end = t - t % size + size
        bucket = buckets.get(end)
        if bucket is None:
            bucket = buckets[end] = defaultdict(lambda: [0.0, 0])
            heappush(ends, end)
        acc = bucket[key]
        acc[0] += value["value"]
        acc[1] += 1
        if t > frontier:
            frontier = t
        if i % WATERMARK_EVERY == WATERMARK_EVERY - 1:
            wm = frontier - WAIT_MS
            while ends and ends[0] - 1 <= wm:
                end = heappop(ends)
                for k, (total, n) in buckets.pop(end).items():
                    out[k, end - size, end] = total / n
    while ends:
        end = heappop(ends)
        for k, (total, n) in buckets.pop(end).items():
            out[k, end - size, end] = total / n
    return out


def baseline_hopping_count(
    events: list[Event], size: int = 60_000, step: int = 10_000
) -> dict[Window, Any]:
    """The hand-written ceiling: {end: {key: count}} over every window of each event."""
    out: dict[Window, Any] = {}
    buckets: dict[int, defaultdict[str, int]] = {}
    ends: list[int] = []
    frontier = events[0][1] if events else 0
    for i, (key, t, _value) in enumerate(events):
        lowest = t - size
        start = t - t % step
        while start > lowest:
            end = start + size
            bucket = buckets.get(end)
            if bucket is None:
                bucket = buckets[end] = defaultdict(int)
                heappush(ends, end)
            bucket[key] += 1
            start -= step
        if t > frontier:
            frontier = t
        if i % WATERMARK_EVERY == WATERMARK_EVERY - 1:
            wm = frontier - WAIT_MS
            while ends and ends[0] - 1 <= wm:
                end = heappop(ends)
                for k, n in buckets.pop(end).items():
                    out[k, end - size, end] = n
    while ends:
        end = heappop(ends)
        for k, n in buckets.pop(end).items():
            out[k, end - size, end] = n
    return out


S = timedelta(seconds=1)
WAIT = timedelta(milliseconds=WAIT_MS)
CASES: dict[
    str, tuple[Callable[[], WindowOperator], Callable[[list[Event]], dict[Window, Any]]]
] = {
    "tumbling_5s_mean": (
        lambda: WindowOperator(Tumbling(5 * S), Mean("value"), wait=WAIT),
        baseline_tumbling_mean,
    ),
    "hopping_60s_10s_count": (
        lambda: WindowOperator(Hopping(60 * S, 10 * S), Count(), wait=WAIT),
        baseline_hopping_count,
    ),
}


# -- the full app: wired against the lead's runtime (asyncflow.app / memory / testing) ----------
APP_PARTITIONS = 4
APP_LANES = 4


def run_app(case: str, events: list[Event]) -> float | None:
    """The same case through a full app on the memory broker; elapsed seconds.

    The events are produced to a 4-partition topic first (JSON values, the broker
    timestamp is the event time; not timed, but in the peak RSS). The timed part is the worker:
    fetch, decode, dispatch to 4 lanes, watermarks, ``stream.window(...)``
    and the agent's loop over results, until the input ends and it stops.
    Returns ``None`` if the runtime is not importable.
    """
    try:
        import asyncflow as af
        from asyncflow.memory import MemoryBroker
        from asyncflow.testing import TestRun
    except ImportError:
        return None
    import asyncio
    import json

    assigner, aggregate = {
        "tumbling_5s_mean": (Tumbling(5 * S), Mean("value")),
        "hopping_60s_10s_count": (Hopping(60 * S, 10 * S), Count()),
    }[case]
    broker = MemoryBroker()
    broker.create_topic("readings", APP_PARTITIONS)
    for key, t, value in events:
        # stdlib json, not orjson: each kept orjson.dumps() result pins ~4 KB of RSS
        # (orjson 3.13), which would swamp the app's peak memory with the input's.
        broker.produce("readings", json.dumps(value).encode(), key.encode(), (), t)

    app = af.App("windows-bench", idle_timeout=60.0)
    readings: af.Topic[Any] = app.topic("readings", partitions=APP_PARTITIONS)
    seen = [0]

    @app.agent(readings, concurrency=APP_LANES)
    async def windowed(stream: af.Stream[Any]) -> None:
        async for _ in stream.window(assigner, aggregate=aggregate, wait=WAIT):
            seen[0] += 1

    async def timed() -> float:
        started = time.perf_counter()
        async with TestRun(app, broker=broker) as run:
            await run.finish(timeout=600)
        return time.perf_counter() - started

    seconds = asyncio.run(timed())
    assert seen[0] > 0, "the app produced no window results"
    return seconds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(case: str, n: int, repeat: int) -> list[dict[str, Any]]:
    make_op, baseline = CASES[case]
    events = make_events(n)
    input_rss = peak_rss_mb()
    op_times, base_times = [], []
    for attempt in range(repeat):
        started = time.perf_counter()
        expected = baseline(events)
        base_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        got = run_operator(make_op(), events)
        op_times.append(time.perf_counter() - started)
        if attempt == 0:  # the same windows and values, or the comparison means nothing
            assert got.keys() == expected.keys(), "operator and baseline disagree on windows"
            assert all(abs(got[w] - expected[w]) <= 1e-9 * abs(expected[w]) for w in got)
    baseline_rate = n / min(base_times)
    rows = [
        {
            "case": case,
            "events": n,
            "seconds": round(min(op_times), 4),
            "events_per_s": round(n / min(op_times)),
            "baseline_events_per_s": round(baseline_rate),
            "ratio": round(baseline_rate and (n / min(op_times)) / baseline_rate, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "input_rss_mb": round(input_rss, 1),
            "windows": len(expected),
        }
    ]
    app_seconds = run_app(case, events)
    if app_seconds is not None:
        rows.append(
            {
                **rows[0],
                "case": f"{case}/app",
                "seconds": round(app_seconds, 4),
                "events_per_s": round(n / app_seconds),
                "ratio": round(n / app_seconds / baseline_rate, 3),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternate runs; best time counts")
    parser.add_argument("--json", action="store_true", help="one JSON object per case per line")
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    args = parser.parse_args()

    if args.case:
        for row in measure(args.case, args.events, args.repeat):
            print(json.dumps(row), flush=True)
        return
    rows = []
    for case in CASES:  # one process per case: its own peak RSS
        command = [sys.executable, __file__, "--case", case]
        command += ["--events", str(args.events), "--repeat", str(args.repeat)]
        limit = 120 + args.events * args.repeat / 1_000  # seconds; generous, but never forever
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=limit
            )
        except subprocess.TimeoutExpired:
            sys.exit(f"case {case} did not finish within {limit:.0f} s")
        if done.returncode != 0:
            sys.exit(f"case {case} failed:\n{done.stderr[-2000:]}")
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'case':<24}{'events':>10}{'seconds':>9}{'events/s':>11}{'baseline/s':>12}"
        f"{'ratio':>7}{'peak MB':>9}{'input MB':>10}"
    )
    for r in rows:
        print(
            f"{r['case']:<24}{r['events']:>10}{r['seconds']:>9.3f}{r['events_per_s']:>11,}"
            f"{r['baseline_events_per_s']:>12,}{r['ratio']:>7.2f}{r['peak_rss_mb']:>9.0f}"
            f"{r['input_rss_mb']:>10.0f}"
        )
    if not any(r["case"].endswith("/app") for r in rows):
        print("full app on the memory broker: not wired yet (see run_app)")


if __name__ == "__main__":
    main()
