"""End-to-end latency at fixed input rates, Kafka -> filter/map -> Kafka: asyncflow vs a hand loop.

What is measured: for each input rate (``--rates``, default 10,000, 40,000 and
80,000 events/s) and each pipeline, a producer writes JSON sensor readings
(1,000 keys, keyed by sensor id) at that rate into a fresh 4-partition topic on
a Tansu broker this script starts (or ``--bootstrap host:port``). Each reading
carries its send time (``"sent"``: wall clock, epoch seconds, taken when the
record is built, just before it is handed to the producer). The pipeline keeps
readings with ``value >= 0``, maps them to Fahrenheit (the stamp is carried
over) and produces them to a fresh output topic; a separate consumer of the
output topic (no group, assigned all partitions, ``fetch_max_wait_ms=10``)
takes latency = receive time - stamp for every output. Producer and measuring
consumer run in this process; the pipelines are:

* ``aiokafka``: a hand-written copy loop: ``getmany`` + ``orjson`` + the same
  filter/map + aiokafka's batch API (one batch per output partition, all in
  flight together), committing a batch's input offsets once its outputs are
  acknowledged while the next batch is processed (aiokafka's defaults
  otherwise, except ``fetch_max_wait_ms``: 100, asyncflow's default, so that
  both wait the same at the broker; ``--aiokafka-fetch-max-wait-ms`` changes it).
* ``asyncflow``: the same pipeline as an asyncflow app with default settings
  (4 lanes, ``stream.filter(...).map(...)``, ``await topic.send(key, value)``);
  the broker URL only turns idempotence off (Tansu) and shortens the group
  join. ``--asyncflow-options 'linger_ms=5&fetch_max_wait_ms=100'`` appends
  Kafka options to its URL; ``ASYNCFLOW_*`` variables (e.g.
  ``ASYNCFLOW_COMMIT_INTERVAL``) reach it through the environment.

Each pipeline runs in its own process, one after the other (never two at once
on a small machine), each with fresh topics and a fresh consumer group. A run
has three phases: a trickle of 200 events/s until the first output comes back
(the group join, excluded), a warm-up at the full rate (``--warmup``, 3 s,
excluded), then the measured phase (``--seconds``, 15 s): only events sent in
it count for the latency percentiles. Then the producer stops and the run waits
(``--drain``, at most 15 s) for every output.

Printed per rate and pipeline: the achieved input rate; whether it kept up
(every output arrived, and the outputs missing when the producer stopped,
``lag@stop``, were less than one second of input); ``drain``, how long after
the producer stopped the last output arrived; p50 / p99 / max latency; the
pipeline process's CPU use during the measured phase (100% = one core) and its
peak RSS; the ratio of asyncflow's p99 to the hand loop's at the same rate; and
the CPU use meanwhile of the broker, of this process (producer + measurer) and
of everything else on the machine. Broker, producer, measurer and pipeline
share the machine: compare within a run, and distrust a run whose "other" CPU
is high. Nothing here asserts a timing.

On Tansu a fetch is answered only after about half its ``fetch_max_wait_ms``,
even when records are waiting (measured: 500 ms gives ~130 ms median, ~260 ms
worst; 10 ms gives ~5 ms), and aiokafka fetches a partition again only once
its buffered records are consumed: every consumer's fetch wait is part of the
latency, the measurer's too (~5 ms).

Usage:
    .venv/bin/python benchmarks/latency.py
    .venv/bin/python benchmarks/latency.py --rates 10000,40000 --seconds 20 --json
    .venv/bin/python benchmarks/latency.py --pipelines asyncflow --asyncflow-options linger_ms=5
    ASYNCFLOW_COMMIT_INTERVAL=5 .venv/bin/python benchmarks/latency.py --pipelines asyncflow
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402

from adapters.kafka import kafka_partition  # noqa: E402
from benchmarks._rss import peak_rss_mb  # noqa: E402
from tests.integration.kafka.broker import (  # noqa: E402
    ENV_BROKER,
    create_topic,
    start_tansu,
    unique_name,
)

KEYS = 1000
PARTITIONS = 4
SESSION_TIMEOUT_MS = 3000  # Tansu holds a group join for half of it
LANES = int(os.environ.get("ASYNCFLOW_BENCH_LANES", "4"))
TICK = 0.005  # the producer sends what is due every TICK seconds
PROBE_RATE = 200  # events/s until the first output comes back (the group join)
MEASURE_FETCH_WAIT_MS = 10  # the measurer's fetch wait: Tansu holds a fetch ~half of it
PIPELINES = ("aiokafka", "asyncflow")
BASE_URL_OPTIONS = (
    f"enable_idempotence=false&session_timeout_ms={SESSION_TIMEOUT_MS}&heartbeat_interval_ms=500"
)


def keep(r: dict[str, Any]) -> bool:
    return bool(r["value"] >= 0)


def fahrenheit(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"],
        "fahrenheit": r["value"] * 1.8 + 32.0,
        "time": r["time"],
        "sent": r["sent"],
    }


# -- the pipelines (each in its own process) ---------------------------------------------------


async def stdin_closed() -> None:
    """Returns when the parent closes our stdin (its signal to stop; also if it dies)."""
    await asyncio.to_thread(sys.stdin.buffer.read)


async def child_asyncflow(spec: dict[str, Any]) -> dict[str, Any]:
    """The asyncflow app, until stdin closes; then it stops (drain, flush, commit)."""
    import asyncflow as af

    query = BASE_URL_OPTIONS + (f"&{spec['options']}" if spec["options"] else "")
    app = af.App(spec["group"], broker=f"kafka://{spec['bootstrap']}?{query}")
    readings: af.Topic[dict[str, Any]] = app.topic(
        spec["input"], partitions=PARTITIONS, create=False
    )
    converted: af.Topic[dict[str, Any]] = app.topic(
        spec["output"], partitions=PARTITIONS, create=False
    )

    @app.agent(readings, concurrency=LANES)
    async def convert(stream: af.Stream[dict[str, Any]]) -> None:
        async for reading in stream.filter(keep).map(fahrenheit):
            await converted.send(reading["id"], reading)

    worker = asyncio.create_task(app.run())
    stop = asyncio.create_task(stdin_closed())
    await asyncio.wait([worker, stop], return_when=asyncio.FIRST_COMPLETED)
    if worker.done():
        worker.result()
        raise RuntimeError("the asyncflow worker stopped before it was asked to")
    app.stop()
    await worker
    m = app.metrics
    return {
        "consumed": int(m.get("events_in")),
        "produced": int(m.get("sink.kafka.written")),
        "partition_pauses": int(m.get("partition_pauses")),  # lanes full: the source paused
        "checkpoints": int(m.get("checkpoints")),
    }


async def child_aiokafka(spec: dict[str, Any]) -> dict[str, Any]:
    """The hand-written copy loop, until stdin closes; then it commits what it did."""
    bootstrap = spec["bootstrap"]
    consumer = AIOKafkaConsumer(
        spec["input"],
        bootstrap_servers=bootstrap,
        group_id=spec["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=500,
        max_poll_records=20_000,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_wait_ms=spec["hand_fetch_wait_ms"],
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, max_batch_size=65_536
    )
    await consumer.start()
    await producer.start()
    stop = asyncio.create_task(stdin_closed())
    out_topic = spec["output"]
    loads, dumps = orjson.loads, orjson.dumps
    partition_of: dict[bytes, int] = {}
    consumed = produced = 0
    previous: tuple[list[Any], dict[TopicPartition, int]] | None = None
    try:
        while not stop.done():
            data = await consumer.getmany(timeout_ms=100, max_records=20_000)
            if not data:
                continue
            outputs: dict[int, list[tuple[bytes, bytes]]] = {}
            offsets: dict[TopicPartition, int] = {}
            for tp, records in data.items():
                consumed += len(records)
                offsets[tp] = records[-1].offset + 1
                for rec in records:
                    r = loads(rec.value)
                    if r["value"] < 0:
                        continue
                    out = dumps(
                        {
                            "id": r["id"],
                            "fahrenheit": r["value"] * 1.8 + 32.0,
                            "time": r["time"],
                            "sent": r["sent"],
                        }
                    )
                    p = partition_of.get(rec.key)
                    if p is None:
                        p = partition_of[rec.key] = kafka_partition(rec.key, PARTITIONS)
                    outputs.setdefault(p, []).append((rec.key, out))
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
    finally:
        stop.cancel()
        await consumer.stop()
        await producer.stop()
    return {"consumed": consumed, "produced": produced}


async def send(
    producer: Any, topic: str, partition: int, records: list[tuple[bytes, bytes]]
) -> list[Any]:
    """``records`` as closed batches for one partition; returns their futures."""
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


CHILDREN = {"asyncflow": child_asyncflow, "aiokafka": child_aiokafka}


def run_child(pipeline: str, spec: dict[str, Any]) -> None:
    result = asyncio.run(CHILDREN[pipeline](spec))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


# -- producer and measuring consumer (this process) --------------------------------------------


class Producer:
    """Writes readings at a fixed rate, stamping each with its send time.

    The readings (key, partition, JSON up to the stamp) are made in advance, a
    cycle of ``CYCLE``; only the stamp is formatted per record, so the producer
    stays cheap at high rates.
    """

    CYCLE = 100_000

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        # one batch per partition per tick, even after a stall: a batch waits for the
        # previous one of its partition to be sent, so small batches would throttle the rate
        self.client = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            enable_idempotence=False,
            linger_ms=0,
            max_batch_size=1024 * 1024,
            max_request_size=8 * 1024 * 1024,
        )
        self.readings = self._make(self.CYCLE, random.Random(42), probe=False)
        self.probes = self._make(KEYS, random.Random(7), probe=True)
        self.i = 0
        self.sent = 0
        self.kept = 0
        self.pending: list[Any] = []

    @staticmethod
    def _make(n: int, rng: random.Random, probe: bool) -> list[tuple[int, bytes, bytes, bool]]:
        out = []
        for i in range(n):
            sensor = f"sensor-{i % KEYS:04d}"
            key = sensor.encode()
            value = round(rng.uniform(0.0 if probe else -50.0, 50.0), 3)
            body = orjson.dumps({"id": sensor, "value": value, "time": 1_700_000_000_000 + i * 10})
            prefix = body[:-1] + b',"sent":'
            out.append((kafka_partition(key, PARTITIONS), key, prefix, value >= 0))
        return out

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.pending)
        await self.client.stop()

    async def _emit(self, n: int, probe: bool) -> None:
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        readings = self.probes if probe else self.readings
        size = len(readings)
        now = time.time
        kept = 0
        i = self.i
        for _ in range(n):
            p, key, prefix, keeps = readings[i % size]
            i += 1
            kept += keeps
            records = by_partition.get(p)
            if records is None:
                records = by_partition[p] = []
            records.append((key, prefix + b"%.6f}" % now()))
        self.i = i
        for p, records in by_partition.items():
            self.pending.extend(await send(self.client, self.topic, p, records))
        self.sent += n
        self.kept += kept
        if len(self.pending) > 256:
            done = [f for f in self.pending if f.done()]
            for f in done:
                f.result()  # a failed send ends the run
            self.pending = [f for f in self.pending if not f.done()]

    async def run(self, rate: float, seconds: float, until: asyncio.Event | None = None) -> int:
        """Send at ``rate`` for ``seconds`` (or until ``until`` is set); the number sent."""
        start = time.perf_counter()
        sent = 0
        probe = until is not None
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds or (until is not None and until.is_set()):
                return sent
            due = int(rate * elapsed) + 1 - sent
            if due > 0:
                await self._emit(due, probe)
                sent += due
            await asyncio.sleep(TICK)


class Measurer:
    """Reads the output topic from its start; latency of every output sent in the measured phase."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.client = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=MEASURE_FETCH_WAIT_MS,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self.first = asyncio.Event()
        self.received = 0
        self.last_at = 0.0
        self.window: tuple[float, float] = (float("inf"), float("inf"))
        self.latencies: list[float] = []  # seconds, events sent inside ``window``
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.start()
        self.client.assign([TopicPartition(self.topic, p) for p in range(PARTITIONS)])
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        client, loads, latencies = self.client, orjson.loads, self.latencies
        while True:
            data = await client.getmany(timeout_ms=100)
            if not data:
                continue
            now = time.time()
            lo, hi = self.window
            for records in data.values():
                self.received += len(records)
                for rec in records:
                    sent = loads(rec.value)["sent"]
                    if lo <= sent < hi:
                        latencies.append(now - sent)
            self.last_at = now
            self.first.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.stop()


@dataclass
class Row:
    """One line of the report."""

    rate: int
    pipeline: str
    input_per_s: float
    kept_up: bool
    outputs: int  # outputs received of the events sent (all phases)
    expected: int  # events sent that pass the filter (all phases)
    lag_at_stop: int  # outputs missing when the producer stopped
    drain_ms: float | None  # producer stop -> last output
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    measured: int  # latencies taken (outputs of events sent in the measured phase)
    join_s: float  # pipeline start -> first output (the group join; excluded)
    cpu_pct: float | None  # the pipeline process during the measured phase (100 = one core)
    broker_cpu_pct: float | None  # the broker we started (None with --bootstrap)
    driver_cpu_pct: float | None  # this process: producer and measuring consumer
    other_cpu_pct: float | None  # every other process on the machine (noise)
    peak_rss_mb: float | None
    p99_ratio: float | None = None
    partition_pauses: int | None = None  # asyncflow: times a full lane paused a partition
    checkpoints: int | None = None  # asyncflow: checkpoints taken


def percentile(values: list[float], q: float) -> float:
    """Nearest rank of sorted ``values``."""
    return values[min(len(values) - 1, int(q * len(values)))]


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Free the broker's memory between runs (best effort: Tansu keeps topics in memory)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        async with asyncio.timeout(10):
            await admin.start()
            await admin.delete_topics(topics)
    except Exception:  # noqa: BLE001 - only memory is at stake
        pass
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


class CpuMeter:
    """CPU use (user + system) of some processes and of everything else, in % of one core."""

    def __init__(self, pids: list[int | None]) -> None:
        self.procs = [None if pid is None else psutil.Process(pid) for pid in pids]
        self.before: list[float | None] = []
        self.began = 0.0

    def _now(self) -> list[float | None]:
        out: list[float | None] = []
        for proc in self.procs:
            try:
                out.append(None if proc is None else sum(proc.cpu_times()[:2]))
            except psutil.Error:
                out.append(None)
        t = psutil.cpu_times()
        out.append(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))
        return out

    def start(self) -> None:
        self.before, self.began = self._now(), time.perf_counter()

    def stop(self) -> list[float | None]:
        """Per process, then the machine's busy time not spent in those processes."""
        span = time.perf_counter() - self.began
        used = [
            None if a is None or b is None else 100 * (b - a) / span
            for a, b in zip(self.before, self._now(), strict=True)
        ]
        *ours, machine = used
        others = None if machine is None else max(0.0, machine - sum(x or 0.0 for x in ours))
        return [None if x is None else round(x) for x in (*ours, others)]


async def measure(
    bootstrap: str, pipeline: str, rate: int, args: argparse.Namespace, broker_pid: int | None
) -> Row:
    """One pipeline at one rate: fresh topics and group, the pipeline in a subprocess."""
    in_topic = await create_topic(bootstrap, PARTITIONS, unique_name("latency-in"))
    out_topic = await create_topic(bootstrap, PARTITIONS, unique_name("latency-out"))
    spec = {
        "bootstrap": bootstrap,
        "input": in_topic,
        "output": out_topic,
        "group": unique_name(f"latency-{pipeline}"),
        "options": args.asyncflow_options,
        "hand_fetch_wait_ms": args.aiokafka_fetch_max_wait_ms,
    }
    producer, measurer = Producer(bootstrap, in_topic), Measurer(bootstrap, out_topic)
    await measurer.start()
    await producer.start()
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child", pipeline, "--spec", json.dumps(spec),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
    )
    try:
        # 1. a trickle until the first output is back: the group join is not measured
        died = asyncio.create_task(proc.wait())
        probing = asyncio.create_task(producer.run(PROBE_RATE, 120.0, until=measurer.first))
        await asyncio.wait([probing, died], return_when=asyncio.FIRST_COMPLETED)
        if died.done() or not measurer.first.is_set():
            raise RuntimeError(f"{pipeline} produced nothing: {tail(log)}")
        join_s = time.perf_counter() - started
        # 2. warm-up at the full rate, then 3. the measured phase
        await producer.run(rate, args.warmup)
        cpu = CpuMeter([proc.pid, broker_pid, os.getpid()])
        cpu.start()
        measurer.window = (time.time(), float("inf"))
        t0 = time.perf_counter()
        sent = await producer.run(rate, args.seconds)
        span = time.perf_counter() - t0
        measurer.window = (measurer.window[0], time.time())
        cpu_pct, broker_cpu, driver_cpu, other_cpu = cpu.stop()
        stopped_at = time.time()
        lag_at_stop = producer.kept - measurer.received
        deadline = time.perf_counter() + args.drain
        while measurer.received < producer.kept and time.perf_counter() < deadline:
            if died.done():
                raise RuntimeError(f"{pipeline} stopped during the run: {tail(log)}")
            await asyncio.sleep(0.01)
        drain_ms = (
            max(0.0, measurer.last_at - stopped_at) * 1000
            if measurer.received >= producer.kept
            else None
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        out = await asyncio.wait_for(proc.stdout.read(), 60)
        if await asyncio.wait_for(died, 60) != 0:
            raise RuntimeError(f"{pipeline} failed: {tail(log)}")
        child = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await producer.stop()
        await measurer.stop()
        await delete_topics(bootstrap, [in_topic, out_topic])
    latencies = sorted(measurer.latencies)
    ms = [x * 1000 for x in (percentile(latencies, 0.5), percentile(latencies, 0.99),
                             latencies[-1])] if latencies else [None, None, None]
    complete = measurer.received >= producer.kept
    return Row(
        rate=rate,
        pipeline=pipeline,
        input_per_s=round(sent / span),
        kept_up=complete and lag_at_stop < rate / 2,  # < 1 s of kept input (half pass)
        outputs=measurer.received,
        expected=producer.kept,
        lag_at_stop=lag_at_stop,
        drain_ms=None if drain_ms is None else round(drain_ms, 1),
        p50_ms=None if ms[0] is None else round(ms[0], 2),
        p99_ms=None if ms[1] is None else round(ms[1], 2),
        max_ms=None if ms[2] is None else round(ms[2], 2),
        measured=len(latencies),
        join_s=round(join_s, 2),
        cpu_pct=cpu_pct,
        broker_cpu_pct=broker_cpu,
        driver_cpu_pct=driver_cpu,
        other_cpu_pct=other_cpu,
        peak_rss_mb=round(child["peak_rss_mb"], 1),
        partition_pauses=child.get("partition_pauses"),
        checkpoints=child.get("checkpoints"),
    )


def tail(log: Any, size: int = 3000) -> str:
    log.seek(0)
    return str(log.read()[-size:].decode(errors="replace"))


def report(rows: list[Row], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(asdict(r)), flush=True)
        return

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    print(
        f"{'rate':>7} {'pipeline':<10} {'input/s':>8} {'kept up':>7} {'out/expected':>15} "
        f"{'lag@stop':>8} {'drain':>8} {'p50':>8} {'p99':>8} {'max':>8} {'CPU':>5} "
        f"{'peak RSS':>8} {'p99 ratio':>9}  {'broker/driver/other CPU':>23}"
    )
    for r in rows:
        cpus = " / ".join(
            num(x, ".0f") + "%" for x in (r.broker_cpu_pct, r.driver_cpu_pct, r.other_cpu_pct)
        )
        print(
            f"{r.rate:>7,} {r.pipeline:<10} {r.input_per_s:>8,.0f} "
            f"{'yes' if r.kept_up else 'NO':>7} {f'{r.outputs:,}/{r.expected:,}':>15} "
            f"{r.lag_at_stop:>8,} {num(r.drain_ms, '.0f') + ' ms':>8} "
            f"{num(r.p50_ms, '.1f') + ' ms':>8} {num(r.p99_ms, '.1f') + ' ms':>8} "
            f"{num(r.max_ms, '.0f') + ' ms':>8} {num(r.cpu_pct, '.0f') + '%':>5} "
            f"{num(r.peak_rss_mb, '.0f') + ' MB':>8} {num(r.p99_ratio, '.2f'):>9}  "
            f"{cpus:>23}"
        )


async def run_all(
    bootstrap: str, args: argparse.Namespace, broker_pid: int | None
) -> list[Row]:
    rows: list[Row] = []
    for rate in args.rates:
        by_pipeline: dict[str, Row] = {}
        for pipeline in args.pipelines:  # one after the other: never two pipelines at once
            row = await measure(bootstrap, pipeline, rate, args, broker_pid)
            by_pipeline[pipeline] = row
            rows.append(row)
            if not args.json:
                print(f"  measured {pipeline} at {rate:,}/s", file=sys.stderr, flush=True)
        af, hand = by_pipeline.get("asyncflow"), by_pipeline.get("aiokafka")
        if af is not None and hand is not None and af.p99_ms and hand.p99_ms:
            af.p99_ratio = round(af.p99_ms / hand.p99_ms, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10_000, 40_000, 80_000],
        help="input rates, events/s, comma-separated (10000,40000,80000)",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured phase (15 s)")
    parser.add_argument("--warmup", type=float, default=3.0, help="full-rate warm-up (3 s)")
    parser.add_argument("--drain", type=float, default=15.0, help="wait for outputs (15 s)")
    parser.add_argument(
        "--pipelines",
        type=lambda s: s.split(","),
        default=list(PIPELINES),
        help="comma-separated, run in this order (aiokafka,asyncflow)",
    )
    parser.add_argument(
        "--asyncflow-options",
        default="",
        help="Kafka options appended to asyncflow's broker URL, e.g. 'linger_ms=5'",
    )
    parser.add_argument(
        "--aiokafka-fetch-max-wait-ms",
        type=int,
        default=100,
        help="the hand loop consumer's fetch_max_wait_ms (100, asyncflow's default; "
        "aiokafka's own is 500)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument(
        "--bootstrap", default=os.environ.get(ENV_BROKER), help="use this broker, start none"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        run_child(args.child, json.loads(args.spec))
        return
    unknown = set(args.pipelines) - set(PIPELINES)
    if unknown:
        parser.error(f"unknown pipelines {sorted(unknown)}; choose from {', '.join(PIPELINES)}")

    tansu = None if args.bootstrap else start_tansu()
    try:
        bootstrap = args.bootstrap or tansu.bootstrap  # type: ignore[union-attr]
        pid = None if tansu is None or tansu.process is None else tansu.process.pid
        rows = asyncio.run(run_all(bootstrap, args, pid))
        if not args.json:
            settings = args.asyncflow_options or "defaults"
            env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                           if k.startswith("ASYNCFLOW_") and k != ENV_BROKER)
            print(f"asyncflow: {settings}{' ' + env if env else ''}; aiokafka loop: "
                  f"fetch_max_wait_ms={args.aiokafka_fetch_max_wait_ms}; "
                  f"{args.warmup:g} s warm-up, {args.seconds:g} s measured per row", flush=True)
        report(rows, args.json)
    finally:
        if tansu is not None:
            tansu.stop()
            tansu.log_path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
