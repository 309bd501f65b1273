"""Memory-broker pipeline: decode -> map -> filter -> sink, framework vs a hand-written loop.

N JSON sensor readings (``--events``, default 1,000,000) over 1,000 keys are
loaded into a 4-partition memory topic. Cases, each in its own process so
that its peak RSS is its own:

- ``pipeline_dict``: an asyncflow app (4 lanes) decodes JSON to dicts, maps
  (Fahrenheit to Celsius), filters (drops about 10%) and sends to a sink that
  counts batches; offsets are committed as usual.
- ``pipeline_record``: the same with a typed ``af.Record`` value type.
- ``batches_dict`` / ``batches_record``: the same pipelines through the batch
  API (``async for batch in stream...batches()`` and ``out.send_values(batch)``).

The baseline of each is the best hand-written asyncio loop over the same raw
records: batches of 1,000 through an ``asyncio.Queue``, orjson for dicts (for
the typed case the fastest typed decoder there is: msgspec straight into an
equivalent ``msgspec.Struct``), the same map and filter, appended to a list. Both run in the same process, best of ``--repeat``; only ratios compare
on a shared machine. Latency: per-batch sink latency (first event of a batch
read -> batch written) percentiles, for the framework.

Usage:
    .venv/bin/python benchmarks/memory_pipeline.py
    .venv/bin/python benchmarks/memory_pipeline.py --events 200000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.protocols import SinkRecord
from asyncflow.runtime import GC_YOUNG_THRESHOLD

KEYS = 1_000
PARTITIONS = 4


class Reading(af.Record):
    id: str
    temperature: float
    status: str
    time: float


class ReadingStruct(msgspec.Struct):
    """What the hand-written typed loop decodes into."""

    id: str
    temperature: float
    status: str
    time: float


def make_payloads(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        k = f"sensor-{i % KEYS}"
        doc = {"id": k, "temperature": 50.0 + (i % 97), "status": "OK" if i % 10 else "ERROR",
               "time": 1_700_000_000 + i / 1000}
        out.append((k.encode(), bytes(memoryview(orjson.dumps(doc)))))
    return out


def to_celsius(v: Any) -> Any:
    if isinstance(v, dict):
        return {"id": v["id"], "c": (v["temperature"] - 32) * 5 / 9, "status": v["status"]}
    return {"id": v.id, "c": (v.temperature - 32) * 5 / 9, "status": v.status}


def keep(v: dict[str, Any]) -> bool:
    return v["status"] != "ERROR"


class CountingSink:
    name = "count"
    max_batch = 2000
    linger = 0.01

    def __init__(self) -> None:
        self.count = 0
        self.latencies: list[float] = []

    async def start(self) -> None: ...

    async def write(self, records: Sequence[SinkRecord]) -> None:
        self.count += len(records)

    async def stop(self) -> None: ...


async def run_framework(
    payloads: list[tuple[bytes, bytes]], typed: bool, batches: bool = False
) -> tuple[float, int]:
    broker = MemoryBroker()
    broker.create_topic("readings", partitions=PARTITIONS)
    for k, v in payloads:
        broker.produce("readings", v, key=k)
    broker.end("readings")
    app = af.App("bench", broker=broker, lane_capacity=5000, fetch_max=2000)
    readings = app.topic("readings", value_type=Reading if typed else None, partitions=PARTITIONS)
    sink = CountingSink()
    out = app.sink(sink)

    if batches:

        @app.agent(readings, concurrency=4)
        async def pipeline(stream: af.Stream[Any]) -> None:
            async for batch in stream.map(to_celsius).filter(keep).batches():
                await out.send_values(batch)

    else:

        @app.agent(readings, concurrency=4)
        async def pipeline(stream: af.Stream[Any]) -> None:
            async for v in stream.map(to_celsius).filter(keep):
                await out.send(None, v)

    t0 = time.perf_counter()
    await app.run()
    return time.perf_counter() - t0, sink.count


Batches = asyncio.Queue[list[bytes] | None]
"""The hand loops' queue: batches of raw values, ``None`` after the last."""


async def run_queued(
    payloads: list[tuple[bytes, bytes]], consume: Callable[[Batches], Coroutine[Any, Any, None]]
) -> float:
    """The hand loops' harness: the raw values in batches of 1,000 through a queue; its seconds.

    ``consume(queue)`` takes batches until ``None``; the worker's GC setting holds meanwhile.

    Example:
        >>> async def count(queue: Batches) -> None:
        ...     while await queue.get() is not None:
        ...         pass
        >>> asyncio.run(run_queued(make_payloads(10), count)) > 0
        True
    """
    raw = [v for _, v in payloads]
    gc_before = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc_before[1:])  # the same GC setting as the worker's
    t0 = time.perf_counter()
    queue: Batches = asyncio.Queue(maxsize=8)

    async def produce() -> None:
        for i in range(0, len(raw), 1000):
            await queue.put(raw[i : i + 1000])
        await queue.put(None)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            tg.create_task(consume(queue))
    finally:
        gc.set_threshold(*gc_before)
    return time.perf_counter() - t0


async def run_baseline(payloads: list[tuple[bytes, bytes]], typed: bool) -> tuple[float, int]:
    """The best hand-written loop: batches through a queue, the same map/filter and sink."""
    decode_record = msgspec.json.Decoder(ReadingStruct).decode
    loads = orjson.loads
    sink = CountingSink()

    async def consume(queue: Batches) -> None:
        out: list[SinkRecord] = []
        while (batch := await queue.get()) is not None:
            for data in batch:
                v = decode_record(data) if typed else loads(data)
                m = to_celsius(v)
                if m["status"] != "ERROR":
                    out.append(SinkRecord(None, m))
            if len(out) >= CountingSink.max_batch:
                await sink.write(out)
                out = []
        await sink.write(out)

    return await run_queued(payloads, consume), sink.count


def run_case(case: str, events: int, repeat: int) -> dict[str, Any]:
    typed = case.endswith("_record")
    batches = case.startswith("batches")
    payloads = make_payloads(events)
    best_fw = best_base = float("inf")
    count_fw = count_base = 0
    for _ in range(repeat):
        s, count_base = asyncio.run(run_baseline(payloads, typed))
        best_base = min(best_base, s)
        s, count_fw = asyncio.run(run_framework(payloads, typed, batches))
        best_fw = min(best_fw, s)
        # the finished app, its runtime and its broker refer to each other: free them before
        # the next repeat builds its own (its records are not tracked, so no collection
        # would come by itself), or the peak would count two brokers' records
        gc.collect()
    if count_fw != count_base:
        raise SystemExit(f"{case}: framework delivered {count_fw}, baseline {count_base}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": case,
        "events": events,
        "seconds": round(best_fw, 3),
        "events_per_s": round(events / best_fw),
        "baseline_events_per_s": round(events / best_base),
        "ratio": round(best_base / best_fw, 3),
        "peak_rss_mb": round(rss, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object per case per line")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.events, args.repeat)))
        return
    rows = []
    for case in ("pipeline_dict", "pipeline_record", "batches_dict", "batches_record"):
        cmd = [sys.executable, __file__, "--case", case, "--events", str(args.events),
               "--repeat", str(args.repeat)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        rows.append(json.loads(line.splitlines()[-1]))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'case':<18}{'events':>10}{'seconds':>9}{'events/s':>11}{'baseline/s':>12}"
          f"{'ratio':>7}{'peak MB':>9}")
    for r in rows:
        print(f"{r['case']:<18}{r['events']:>10}{r['seconds']:>9}{r['events_per_s']:>11}"
              f"{r['baseline_events_per_s']:>12}{r['ratio']:>7}{r['peak_rss_mb']:>9}")


if __name__ == "__main__":
    main()
