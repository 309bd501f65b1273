"""Repartition benchmark: 5 s tumbling means over an input keyed at random, re-keyed first.

The events of ``benchmarks/windows.py`` (1,000 keys, up to 2 s out of order),
each value carrying its key (``{"k": key, "value": v}``), produced to a
4-partition memory topic with no record key (so every key is on every
partition). Cases, each in a process of its own, one after another:

- ``keyed/app``: the producers keyed the records by ``k``; the app reads them
  directly (``key=lambda v: v["k"]``): what a correctly keyed input costs.
- ``repartitioned/app``: the records keyed at random; the app re-keys them with
  ``topic.repartition("by-k", key=...)`` and computes the windows downstream:
  forwarder, internal topic, watermark markers and all.

Both are checked against the hand-written dict aggregation of
``windows.py`` over the same raw records (JSON decoded in the loop), timed in
the same process (best of ``--repeat``); ``ratio`` is the app's events/s over
the hand loop's.

Usage:
    .venv/bin/python benchmarks/repartition.py                  # a table
    .venv/bin/python benchmarks/repartition.py --events 200000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from windows import (
    APP_LANES,
    APP_PARTITIONS,
    WAIT,
    Window,
    baseline_checked,
    baseline_tumbling_mean,
    iter_events,
    peak_rss_mb,
    rss_mb,
)

from asyncflow.windows import Mean, Tumbling
from benchmarks._cases import run_case_process

S = timedelta(seconds=1)
CASES = ("keyed", "repartitioned")


async def run_app(case: str, broker: Any) -> tuple[float, dict[Window, Any]]:
    """The windowed app of ``case`` on ``broker`` (input produced and ended); seconds, results."""
    import asyncflow as af
    from asyncflow.testing import TestRun

    app = af.App("repartition-bench", idle_timeout=60.0)
    readings: af.Topic[Any] = app.topic(
        "readings", partitions=APP_PARTITIONS, key=lambda v: v["k"]
    )
    source = readings.repartition("by-k") if case == "repartitioned" else readings
    got: dict[Window, Any] = {}

    @app.agent(source, concurrency=APP_LANES)
    async def windowed(stream: af.Stream[Any]) -> None:
        async for w in stream.window(Tumbling(5 * S), aggregate=Mean("value"), wait=WAIT):
            got[w.key, w.start_ms, w.end_ms] = w.value

    started = time.perf_counter()
    async with TestRun(app, broker=broker) as run:
        await run.finish(timeout=1800)
    return time.perf_counter() - started, got


def measure(case: str, n: int, repeat: int) -> dict[str, Any]:
    from asyncflow.memory import MemoryBroker

    broker = MemoryBroker()
    broker.create_topic("readings", APP_PARTITIONS)
    for key, t, value in iter_events(n):
        record_key = key.encode() if case == "keyed" else None  # None: round robin
        broker.produce("readings", orjson.dumps({"k": key, **value}), record_key, (), t)
    broker.end("readings")
    input_rss = rss_mb()
    seconds, got = asyncio.run(run_app(case, broker))
    peak = peak_rss_mb()
    del broker
    raw = [(orjson.dumps({"k": key, **value}), t) for key, t, value in iter_events(n)]
    loads = orjson.loads
    expected, best = baseline_checked(
        got, lambda: baseline_tumbling_mean(((v := loads(vb))["k"], t, v) for vb, t in raw), repeat
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
        "beyond_input_mb": round(peak - input_rss, 1),
        "windows": len(expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="baseline runs; best time counts")
    parser.add_argument("--json", action="store_true", help="one JSON object per case per line")
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.events, args.repeat)), flush=True)
        return
    rows = []
    for case in CASES:  # one process per case: its own peak RSS
        command = [sys.executable, __file__, "--case", case, "--events", str(args.events),
                   "--repeat", str(args.repeat)]
        rows += run_case_process(command, case, limit=120 + args.events * args.repeat / 1_000)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'case':<22}{'events':>10}{'seconds':>9}{'events/s':>11}{'baseline/s':>12}"
          f"{'ratio':>7}{'peak MB':>9}{'beyond MB':>11}")
    for r in rows:
        print(f"{r['case']:<22}{r['events']:>10}{r['seconds']:>9.3f}{r['events_per_s']:>11,}"
              f"{r['baseline_events_per_s']:>12,}{r['ratio']:>7.2f}{r['peak_rss_mb']:>9.0f}"
              f"{r['beyond_input_mb']:>11.0f}")


if __name__ == "__main__":
    main()
