"""Kafka -> filter/map -> Kafka throughput: a hand-written aiokafka loop vs asyncflow.

Loads N JSON sensor readings (1,000 keys, keyed by sensor id) into a 4-partition
topic on a Tansu broker this script starts (or ``--bootstrap host:port``), then
runs each case in its own process (so its peak RSS is its own) over the same
input:

* ``aiokafka-baseline``: the best plain loop we can write: ``getmany`` +
  ``orjson`` + keep readings with ``value >= 0`` and map them to Fahrenheit +
  produce with aiokafka's batch API, one batch per output partition, all in
  flight together; a batch's input offsets are committed once its output is
  acknowledged, while the next batch is already being processed.
* ``asyncflow``: the same pipeline as an asyncflow app (``run_asyncflow_case``):
  a JSON topic, ``stream.filter(...).map(...)`` in 4 lanes (``ASYNCFLOW_BENCH_LANES``),
  ``await topic.send(key, value)`` per output.

Timing starts at the first record a case receives (the group join, ~1.5 s on
Tansu, is excluded) and ends when all N input records are consumed and their
outputs acknowledged (the baseline also commits its last batch; asyncflow commits
when it stops, right after). The cases alternate ``--repeat`` times, each run in a
fresh process with a fresh consumer group and output topic; the best time of each
case counts and its peak RSS is the largest of its runs. On a shared 2-core
machine only the ratio compares. Completion counts records, never end offsets
(inexact on Tansu). The broker helpers come from
``tests/integration/kafka/broker.py`` (the repository root is put on
``sys.path``), so tests and benchmark start Tansu the same way.

Usage:
    .venv/bin/python benchmarks/kafka_throughput.py --events 200000
    .venv/bin/python benchmarks/kafka_throughput.py --events 200000 --json --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from adapters.kafka import KafkaBroker, kafka_partition  # noqa: E402
from asyncflow.protocols import SinkRecord  # noqa: E402
from tests.integration.kafka.broker import (  # noqa: E402
    ENV_BROKER,
    create_topic,
    start_tansu,
    unique_name,
)

KEYS = 1000
PARTITIONS = 4
SESSION_TIMEOUT_MS = 3000  # Tansu holds a group join for half of it


@dataclass
class Workload:
    """Where the input is and what a correct run produces."""

    bootstrap: str
    input_topic: str
    events: int
    kept: int  # readings passing the filter


@dataclass
class CaseResult:
    """One line of the report."""

    case: str
    events: int
    seconds: float
    events_per_s: float
    baseline_events_per_s: float | None = None
    ratio: float | None = None
    peak_rss_mb: float | None = None


def reading(i: int, rng: random.Random) -> tuple[bytes, bytes, float]:
    sensor = f"sensor-{i % KEYS:04d}"
    value = round(rng.uniform(-50.0, 50.0), 3)
    event = {"id": sensor, "value": value, "time": 1_700_000_000_000 + i * 10}
    return sensor.encode(), orjson.dumps(event), value


def transform(value: bytes) -> bytes | None:
    """The pipeline: keep readings with ``value >= 0``, convert them to Fahrenheit."""
    r = orjson.loads(value)
    v = r["value"]
    if v < 0:
        return None
    return orjson.dumps({"id": r["id"], "fahrenheit": v * 1.8 + 32.0, "time": r["time"]})


async def load(bootstrap: str, events: int) -> Workload:
    """Create the input topic and write ``events`` readings with the asyncflow Kafka sink."""
    topic = await create_topic(bootstrap, partitions=PARTITIONS, name=unique_name("readings"))
    broker = KafkaBroker(f"kafka://{bootstrap}", {"enable_idempotence": "false"})
    sink = broker.sink()
    await sink.start()
    rng = random.Random(42)
    kept = 0
    try:
        for start in range(0, events, sink.max_batch):
            chunk = []
            for i in range(start, min(events, start + sink.max_batch)):
                key, value, v = reading(i, rng)
                kept += v >= 0
                chunk.append(SinkRecord(key, value, topic=topic))
            await sink.write(chunk)
    finally:
        await sink.stop()
        await broker.close()
    return Workload(bootstrap, topic, events, kept)


async def run_baseline(w: Workload) -> tuple[float, int]:
    """The hand-written aiokafka loop; returns (seconds, records produced)."""
    out_topic = await create_topic(w.bootstrap, partitions=PARTITIONS)
    consumer = AIOKafkaConsumer(
        w.input_topic,
        bootstrap_servers=w.bootstrap,
        group_id=unique_name("baseline"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=500,
        max_poll_records=20_000,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=w.bootstrap, enable_idempotence=False, max_batch_size=65_536
    )
    await consumer.start()
    await producer.start()
    partition_of: dict[bytes, int] = {}
    consumed = produced = 0
    started: float | None = None
    previous: tuple[list[Any], dict[TopicPartition, int]] | None = None
    try:
        while consumed < w.events:
            data = await consumer.getmany(timeout_ms=200, max_records=20_000)
            if not data:
                continue
            if started is None:
                started = time.perf_counter()
            outputs: dict[int, list[tuple[bytes, bytes]]] = {}
            offsets: dict[TopicPartition, int] = {}
            for tp, records in data.items():
                consumed += len(records)
                offsets[tp] = records[-1].offset + 1
                for r in records:
                    out = transform(r.value)
                    if out is None:
                        continue
                    p = partition_of.get(r.key)
                    if p is None:
                        p = partition_of[r.key] = kafka_partition(r.key, PARTITIONS)
                    outputs.setdefault(p, []).append((r.key, out))
            sends = await asyncio.gather(
                *(send(producer, out_topic, p, recs) for p, recs in outputs.items())
            )
            produced += sum(len(recs) for recs in outputs.values())
            if previous is not None:  # the previous batch's outputs, then its commit
                await asyncio.gather(*previous[0])
                await consumer.commit(previous[1])
            previous = ([f for group in sends for f in group], offsets)
        if previous is not None:
            await asyncio.gather(*previous[0])
            await consumer.commit(previous[1])
        assert started is not None
        return time.perf_counter() - started, produced
    finally:
        await consumer.stop()
        await producer.stop()


async def send(
    producer: Any, topic: str, partition: int, records: list[tuple[bytes, bytes]]
) -> list[Any]:
    futures = []
    batch = producer.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    batch.close()
    futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


LANES = int(os.environ.get("ASYNCFLOW_BENCH_LANES", "4"))


async def run_asyncflow_case(w: Workload) -> tuple[float, int]:
    """The same pipeline as an asyncflow app; returns (seconds, records produced).

    Reads ``w.input_topic`` as a fresh group, keeps ``value >= 0``, writes
    ``{"id", "fahrenheit", "time"}`` keyed by id to a fresh 4-partition topic. The
    clock starts at the first reading through the filter (the first or second record
    read) and stops when the sink has had every output acknowledged
    (``sink.kafka.written``, counted per acked batch) and every input was read; the
    worker then stops, which commits.
    """
    import asyncflow as af

    out_topic = await create_topic(w.bootstrap, partitions=PARTITIONS)
    app = af.App(
        unique_name("asyncflow"),
        broker=f"kafka://{w.bootstrap}",
        broker_options={
            "enable_idempotence": "false",
            "session_timeout_ms": str(SESSION_TIMEOUT_MS),
            "heartbeat_interval_ms": "500",
        },
    )
    readings: af.Topic[dict[str, Any]] = app.topic(
        w.input_topic, partitions=PARTITIONS, create=False
    )
    converted: af.Topic[dict[str, Any]] = app.topic(out_topic, partitions=PARTITIONS, create=False)
    started: list[float] = []

    def fahrenheit(r: dict[str, Any]) -> dict[str, Any]:
        return {"id": r["id"], "fahrenheit": r["value"] * 1.8 + 32.0, "time": r["time"]}

    @app.agent(readings, concurrency=LANES)
    async def convert(stream: af.Stream[dict[str, Any]]) -> None:
        async for reading in stream.filter(lambda r: r["value"] >= 0).map(fahrenheit):
            if not started:
                started.append(time.perf_counter())
            await converted.send(reading["id"], reading)

    metrics = app.metrics
    worker = asyncio.create_task(app.run())
    try:
        while not (
            metrics.get("sink.kafka.written") >= w.kept and metrics.get("events_in") >= w.events
        ):
            if worker.done():
                worker.result()
                raise RuntimeError("the asyncflow worker stopped before the end of the input")
            await asyncio.sleep(0.002)
        finished = time.perf_counter()
    finally:
        app.stop()
        await worker
    return finished - started[0], int(metrics.get("sink.kafka.written"))


CASES = {"aiokafka-baseline": run_baseline, "asyncflow": run_asyncflow_case}


def run_case_here(case: str, w: Workload) -> dict[str, Any]:
    """Run one case in this process; report its time and this process's peak RSS."""
    seconds, produced = asyncio.run(CASES[case](w))
    if produced != w.kept:
        raise SystemExit(f"{case}: produced {produced} records, expected {w.kept}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def run_case_child(case: str, w: Workload) -> dict[str, Any] | None:
    """Run one case in a fresh interpreter; ``None`` if the case is not implemented yet."""
    command = [sys.executable, __file__, "--child", case, "--workload", json.dumps(asdict(w))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def report(results: list[CaseResult], as_json: bool) -> None:
    if as_json:
        for r in results:
            print(json.dumps(asdict(r)), flush=True)
        return
    print(
        f"{'case':<20} {'events':>9} {'seconds':>8} {'events/s':>10} {'ratio':>6} {'peak RSS':>9}"
    )
    for r in results:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        rss = f"{r.peak_rss_mb:.0f} MB" if r.peak_rss_mb is not None else "-"
        print(
            f"{r.case:<20} {r.events:>9,} {r.seconds:>8.2f} {r.events_per_s:>10,.0f} "
            f"{ratio:>6} {rss:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="input records (200,000)")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternate runs of the cases; best time counts (3)"
    )
    parser.add_argument(
        "--bootstrap", default=os.environ.get(ENV_BROKER), help="use this broker, start none"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        try:
            result = run_case_here(args.child, Workload(**json.loads(args.workload)))
        except NotImplementedError:
            raise SystemExit(3) from None
        print(json.dumps(result))
        return

    tansu = None if args.bootstrap else start_tansu()
    try:
        bootstrap = args.bootstrap or tansu.bootstrap  # type: ignore[union-attr]
        workload = asyncio.run(load(bootstrap, args.events))
        best: dict[str, float] = {}
        peak: dict[str, float] = {}
        for _ in range(args.repeat):  # alternate the cases; the best time of each counts
            for case in CASES:
                measured = run_case_child(case, workload)
                if measured is None:
                    continue
                best[case] = min(best.get(case, float("inf")), measured["seconds"])
                peak[case] = max(peak.get(case, 0.0), measured["peak_rss_mb"])
        results: list[CaseResult] = []
        baseline = args.events / best["aiokafka-baseline"]
        for case, seconds in best.items():
            rate = args.events / seconds
            results.append(
                CaseResult(
                    case=case,
                    events=args.events,
                    seconds=round(seconds, 3),
                    events_per_s=round(rate),
                    baseline_events_per_s=round(baseline),
                    ratio=round(rate / baseline, 3),
                    peak_rss_mb=round(peak[case], 1),
                )
            )
        report(results, args.json)
    finally:
        if tansu is not None:
            tansu.stop()
            tansu.log_path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
