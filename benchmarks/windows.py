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
events held in memory (``input_rss_mb``: the RSS once they are built).

Each case also runs as a full app on the memory broker (``<case>/app``), in a
process of its own: the events are produced to a 4-partition topic as they
are generated (the list is never held), ``input_rss_mb`` is the RSS right
after that, before the app starts, and ``beyond_input_mb`` is the peak RSS
minus that: what the app itself took. The app runs once; its results are
checked against the baseline's, which is timed afterwards in the same process
(best of ``--repeat``) over the same input as the app's: the raw records (key
bytes, JSON value, timestamp), decoded with orjson inside the loop.

Usage:
    .venv/bin/python benchmarks/windows.py                  # a table
    .venv/bin/python benchmarks/windows.py --events 200000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from heapq import heappop, heappush
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from asyncflow.windows import Count, Hopping, Mean, Tumbling, WindowOperator
from benchmarks._cases import run_case_process

KEYS = 1_000
EVENTS_PER_MS = 10
DISORDER_MS = 2_000
WAIT_MS = 2_000
WATERMARK_EVERY = 1_000
T0 = 1_709_294_400_000  # 2024-03-01T12:00:00Z

Event = tuple[str, int, dict[str, float]]
Window = tuple[str, int, int]


def iter_events(n: int, seed: int = 7) -> Iterator[Event]:
    rng = random.Random(seed)
    keys = [f"sensor-{k}" for k in range(KEYS)]
    for i in range(n):
        yield (
            keys[rng.randrange(KEYS)],
            T0 + i // EVENTS_PER_MS - rng.randrange(DISORDER_MS),
            {"value": rng.random() * 100},
        )


def make_events(n: int, seed: int = 7) -> list[Event]:
    return list(iter_events(n, seed))


def run_operator(op: WindowOperator, events: list[Event]) -> dict[Window, Any]:
    """Events through the operator, a watermark every WATERMARK_EVERY events."""
    out: dict[Window, Any] = {}
    on_event, results = op.on_event, op.results
    frontier = -(2**62)  # the first event's time, once it is seen
    for i, (key, t, value) in enumerate(events):
        on_event(key, t, value)
        if t > frontier:
            frontier = t
        if i % WATERMARK_EVERY == WATERMARK_EVERY - 1:
            op.on_watermark(frontier, wall_ms=0)
            for r in results:
                out[r.key, r.start_ms, r.end_ms] = r.value
            results.clear()
            op.dirty.clear()  # the keys a checkpoint would export
    op.flush_all()
    for r in results:
        out[r.key, r.start_ms, r.end_ms] = r.value
    results.clear()
    return out


def baseline_tumbling_mean(events: Iterable[Event], size: int = 5_000) -> dict[Window, Any]:
    """The hand-written ceiling: {end: {key: [sum, n]}}, closed as the watermark passes."""
    out: dict[Window, Any] = {}
    buckets: dict[int, defaultdict[str, list[float]]] = {}
    ends: list[int] = []
    frontier = -(2**62)  # the first event's time, once it is seen
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
    events: Iterable[Event], size: int = 60_000, step: int = 10_000
) -> dict[Window, Any]:
    """The hand-written ceiling: {end: {key: count}} over every window of each event."""
    out: dict[Window, Any] = {}
    buckets: dict[int, defaultdict[str, int]] = {}
    ends: list[int] = []
    frontier = -(2**62)  # the first event's time, once it is seen
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
    str, tuple[Callable[[], WindowOperator], Callable[[Iterable[Event]], dict[Window, Any]]]
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


# -- the full app on the memory broker ------------------------------------------------------
APP_PARTITIONS = 4
APP_LANES = 4


async def run_app(case: str, broker: Any) -> tuple[float, dict[Window, Any]]:
    """The case through a full app on ``broker`` (input produced and ended); seconds, results.

    The timed part is the worker: fetch, decode, dispatch to 4 lanes,
    watermarks, ``stream.window(...)``, checkpoints of the window state, and
    the agent's loop over results, until the input ends and it stops.
    """
    import asyncflow as af
    from asyncflow.testing import TestRun

    assigner, aggregate = {
        "tumbling_5s_mean": (Tumbling(5 * S), Mean("value")),
        "hopping_60s_10s_count": (Hopping(60 * S, 10 * S), Count()),
    }[case]
    app = af.App("windows-bench", idle_timeout=60.0)
    readings: af.Topic[Any] = app.topic("readings", partitions=APP_PARTITIONS)
    got: dict[Window, Any] = {}

    @app.agent(readings, concurrency=APP_LANES)
    async def windowed(stream: af.Stream[Any]) -> None:
        async for w in stream.window(assigner, aggregate=aggregate, wait=WAIT):
            got[w.key, w.start_ms, w.end_ms] = w.value

    started = time.perf_counter()
    async with TestRun(app, broker=broker) as run:
        await run.finish(timeout=1800)
    return time.perf_counter() - started, got


def measure_app(case: str, n: int, repeat: int) -> dict[str, Any]:
    """``<case>/app``: the input produced to a memory topic, its RSS, the app, the baseline."""
    import asyncio
    import json

    from asyncflow.memory import MemoryBroker

    _, baseline = CASES[case]
    broker = MemoryBroker()
    broker.create_topic("readings", APP_PARTITIONS)
    for key, t, value in iter_events(n):  # JSON values; the broker timestamp is the event time
        broker.produce("readings", json.dumps(value).encode(), key.encode(), (), t)
    broker.end("readings")
    input_rss = rss_mb()
    seconds, got = asyncio.run(run_app(case, broker))
    peak = peak_rss_mb()
    del broker
    # the same input as the app's: raw key bytes, JSON value bytes, timestamps; decoded in the loop
    raw = [(key.encode(), json.dumps(value).encode(), t) for key, t, value in iter_events(n)]
    loads = orjson.loads
    expected, best = baseline_checked(
        got, lambda: baseline((kb.decode(), t, loads(vb)) for kb, vb, t in raw), repeat
    )
    baseline_rate = n / best
    return {
        "case": f"{case}/app",
        "events": n,
        "seconds": round(seconds, 4),
        "events_per_s": round(n / seconds),
        "baseline_events_per_s": round(baseline_rate),
        "ratio": round(n / seconds / baseline_rate, 3),
        "peak_rss_mb": round(peak, 1),
        "input_rss_mb": round(input_rss, 1),
        "beyond_input_mb": round(peak - input_rss, 1),
        "windows": len(expected),
    }


def baseline_checked(
    got: dict[Window, Any], run: Callable[[], dict[Window, Any]], repeat: int
) -> tuple[dict[Window, Any], float]:
    """Time the hand loop ``run`` ``repeat`` times; its windows, its best seconds.

    Fails unless the app's windows ``got`` are the hand loop's, with the same
    values (to 1e-9): otherwise the comparison would mean nothing.
    """
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        expected = run()
        times.append(time.perf_counter() - started)
    assert got.keys() == expected.keys(), "the app and the baseline disagree on windows"
    assert all(abs(got[w] - expected[w]) <= 1e-9 * abs(expected[w]) for w in got)
    return expected, min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """The current RSS (the peak so far can be higher)."""
    import psutil  # type: ignore[import-untyped]

    return float(psutil.Process().memory_info().rss) / 2**20


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
    peak = peak_rss_mb()
    return [
        {
            "case": case,
            "events": n,
            "seconds": round(min(op_times), 4),
            "events_per_s": round(n / min(op_times)),
            "baseline_events_per_s": round(baseline_rate),
            "ratio": round(baseline_rate and (n / min(op_times)) / baseline_rate, 3),
            "peak_rss_mb": round(peak, 1),
            "input_rss_mb": round(input_rss, 1),
            "beyond_input_mb": round(peak - input_rss, 1),
            "windows": len(expected),
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="alternate runs; best time counts")
    parser.add_argument("--json", action="store_true", help="one JSON object per case per line")
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--app", action="store_true", help="with --case: its full-app run")
    parser.add_argument("--no-app", action="store_true", help="the operator cases only")
    args = parser.parse_args()

    if args.case:
        rows = [measure_app(args.case, args.events, args.repeat)] if args.app else measure(
            args.case, args.events, args.repeat
        )
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    rows = []
    runs = [(case, app) for case in CASES for app in (False, True) if not (app and args.no_app)]
    for case, app in runs:  # one process per case and kind: its own peak RSS
        command = [sys.executable, __file__, "--case", case] + (["--app"] if app else [])
        command += ["--events", str(args.events), "--repeat", str(args.repeat)]
        rows += run_case_process(command, case, limit=120 + args.events * args.repeat / 1_000)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'case':<26}{'events':>10}{'seconds':>9}{'events/s':>11}{'baseline/s':>12}"
        f"{'ratio':>7}{'peak MB':>9}{'input MB':>10}{'beyond MB':>11}"
    )
    for r in rows:
        print(
            f"{r['case']:<26}{r['events']:>10}{r['seconds']:>9.3f}{r['events_per_s']:>11,}"
            f"{r['baseline_events_per_s']:>12,}{r['ratio']:>7.2f}{r['peak_rss_mb']:>9.0f}"
            f"{r['input_rss_mb']:>10.0f}{r['beyond_input_mb']:>11.0f}"
        )


if __name__ == "__main__":
    main()
