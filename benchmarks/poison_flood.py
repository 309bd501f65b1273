"""A flood of poison records on a real Kafka broker: flat memory, every one dead-lettered, alive.

Issue 11: a worker fed 1,000,000 records it cannot use must keep its memory
flat (a reader stops reading while the dead-letter writer is over its bound:
``reads_held_for_outputs``), write every one of them to the app's dead-letter
topic (``<app id>-dead-letters``, through the producer) and keep running.

What runs:

1. A Tansu broker (``tests/integration/kafka/broker.py``; or ``--broker``), a
   4-partition input topic and a 4-partition output topic.
2. A worker subprocess, ``asyncflow worker benchmarks.poison_flood:app``
   (``app`` below, configured by ``POISON_*`` variables, the broker by
   ``ASYNCFLOW_BROKER``, the Tansu test options from ``TEST_OPTIONS``). Its app
   decodes a typed ``Reading`` (``id``, ``value: float``, ``time: EventTime``)
   and sends every reading it gets to the output topic.
3. Once the worker has joined and idled (its baseline RSS), ``--events`` poison
   records are produced with the batch-API helper ``produce`` in chunks, four
   kinds in turn (the record key names the kind):

   * ``invalid-json``: bytes that are not JSON (bad UTF-8, or truncated JSON);
   * ``wrong-type``: JSON that is not a ``Reading`` (``"value": "hot"``, or a list);
   * ``time-out-of-range``: an event time that is no time (1e14 epoch seconds,
     after the year 9999);
   * ``time-ahead``: an event time ten years ahead (beyond ``max_time_ahead``);

   and one good reading after every ``--good-every`` (5,000) of them.
4. While the worker works, this process samples its RSS (psutil, every
   0.1 s) and tails the dead-letter topic, counting dead letters (never end
   offsets: inexact on Tansu), each one's kind from its ``asyncflow.reason``
   header, and its input position (``asyncflow.partition``/``asyncflow.offset``)
   to find duplicates.

Printed: baseline RSS (idle after start), RSS when 10% of the dead letters are
in the topic, RSS when all are, the peak (the worker's ``VmHWM``, the figure
``benchmarks/_rss.py`` reports for its own process, read here from
``/proc/<pid>/status``; the sampled maximum too), RSS at each tenth, the
dead-lettering rate, the reasons by kind, the worker's own counters from its
last log line. Checks (exit 1 if one fails): every poison record in the
dead-letter topic exactly once with the reason of its kind, every good record
in the output topic, RSS flat (peak and end within ``--flat-mb`` of the RSS
at 10%), the worker alive at the end, and exit code 0 after SIGTERM.

Usage:
    .venv/bin/python benchmarks/poison_flood.py --events 100000
    .venv/bin/python benchmarks/poison_flood.py                     # 1,000,000
    .venv/bin/python benchmarks/poison_flood.py --broker 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncflow as af  # noqa: E402

PARTITIONS = 4
KINDS = ("invalid-json", "wrong-type", "time-out-of-range", "time-ahead")
TEN_YEARS_S = 10 * 365 * 86_400
CHUNK = 100_000  # records per produce() call (each call holds its chunk in memory)
SAMPLE_S = 0.1  # RSS sampling interval


# -- the app the worker runs ---------------------------------------------------------


class Reading(af.Record):
    """A good input record: a sensor reading with its event time (epoch seconds)."""

    id: str
    value: float
    time: af.EventTime


def app() -> af.App:
    """The worker's app (``asyncflow worker benchmarks.poison_flood:app``), from the environment.

    ``POISON_APP_ID`` (app id and consumer group; the dead letters go to
    ``<id>-dead-letters``), ``POISON_INPUT``, ``POISON_OUTPUT``, ``POISON_LANES``
    (4); the broker is ``ASYNCFLOW_BROKER`` (or ``--broker``).
    """
    from tests.integration.kafka.broker import TEST_OPTIONS

    env = os.environ
    application = af.App(env["POISON_APP_ID"], broker_options=dict(TEST_OPTIONS))
    readings: af.Topic[Reading] = application.topic(
        env["POISON_INPUT"],
        value_type=Reading,
        key=lambda r: r.id,
        partitions=PARTITIONS,
        create=False,
    )
    good: af.Topic[dict[str, Any]] = application.topic(
        env["POISON_OUTPUT"], partitions=PARTITIONS, create=False
    )

    @application.agent(readings, concurrency=int(env.get("POISON_LANES", "4")))
    async def keep(stream: af.Stream[Reading]) -> None:
        async for r in stream:
            await good.send(r.id, {"id": r.id, "value": r.value, "time": r.time.isoformat()})

    @application.timer(1.0)
    async def memstats() -> None:
        # Python's own allocations: flat while RSS rises means the allocator keeps freed memory
        logging.getLogger("poison_flood").info(
            "memstats dead_letters=%d blocks=%d",
            application.metrics.get("dead_letters"),
            sys.getallocatedblocks(),
        )

    return application


def logged_blocks(log_text: str) -> list[tuple[int, int]]:
    """``(dead letters, Python blocks allocated)`` from the worker's ``memstats`` lines."""
    out = []
    for line in log_text.splitlines():
        at = line.find(" memstats dead_letters=")
        if at >= 0:
            dead, blocks = line[at + 23 :].split(" blocks=")
            out.append((int(dead), int(blocks)))
    return out


# -- the input -----------------------------------------------------------------------


def poison(i: int, now_s: float) -> tuple[bytes, bytes]:
    """Poison record ``i``: kind ``i % 4`` (the key says which), two variants of each."""
    kind = i % len(KINDS)
    variant = (i // len(KINDS)) % 2
    key = f"{KINDS[kind]}-{i % 1000}".encode()
    if kind == 0:  # not JSON
        value = b'\xff\xfe{"id": "p%d"}' % i if variant else b'{"id": "p%d", "value": ' % i
    elif kind == 1:  # JSON, but not a Reading
        value = (
            orjson.dumps({"id": f"p{i}", "value": "hot", "time": now_s})
            if variant
            else orjson.dumps([f"p{i}", 1.0, now_s])
        )
    elif kind == 2:  # no time at all in epoch seconds
        value = orjson.dumps({"id": f"p{i}", "value": 1.0, "time": 1e14 + i})
    else:  # a time, ten years ahead of the wall clock and of every good reading
        value = orjson.dumps({"id": f"p{i}", "value": 1.0, "time": now_s + TEN_YEARS_S + i})
    return key, value


def flood(events: int, good_every: int, now_s: float) -> Iterator[tuple[bytes, bytes]]:
    """The input in order: the poison, with one good reading after every ``good_every``."""
    half = good_every // 2
    j = 0
    for i in range(events):
        yield poison(i, now_s)
        if i % good_every == half:
            gid = f"good-{j}"
            yield gid.encode(), orjson.dumps({"id": gid, "value": float(j), "time": now_s})
            j += 1


def good_count(events: int, good_every: int) -> int:
    half = good_every // 2
    return 0 if events <= half else (events - 1 - half) // good_every + 1


def kind_of_reason(reason: str) -> str:
    """Which poison kind a dead letter's ``asyncflow.reason`` describes.

    Example:
        >>> kind_of_reason("field 'value': expected float, got str")
        'wrong-type'
    """
    if reason.startswith("malformed JSON"):
        return "invalid-json"
    if reason.startswith("field 'time'") and "is not a time" in reason:
        return "time-out-of-range"
    if reason.startswith("event time ") and " ahead of the partition's event time" in reason:
        return "time-ahead"
    if reason.startswith(("field 'value': expected", "field 'id': expected", "expected a JSON")):
        return "wrong-type"
    return "other"


# -- observing the worker ------------------------------------------------------------


@dataclass
class Tail:
    """What the dead-letter topic holds so far (read by ``tail_dead_letters``)."""

    records: int = 0
    unique: int = 0
    duplicates: int = 0
    no_position: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    mismatched: int = 0  # reason kind differs from the kind the key names
    examples: dict[str, str] = field(default_factory=dict)
    first_at: float | None = None
    all_at: float | None = None  # when ``unique`` reached the target
    done: bool = False


async def tail_dead_letters(
    bootstrap: str, topic: str, target: int, tail: Tail, sentinel: list[bytes]
) -> None:
    """Count the dead letters from the start of ``topic``, until the value ``sentinel[0]``.

    ``sentinel`` is empty until the worker has exited; then this process
    appends that value to every partition, and reading stops at it there, so
    the count is exact (including what the worker wrote while stopping).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from tests.integration.kafka.broker import _partitions

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    seen: set[int] = set()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await _partitions(consumer, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        open_ = {tp.partition for tp in tps}
        while open_:
            batches = await consumer.getmany(timeout_ms=200, max_records=50_000)
            for tp, records in batches.items():
                if tp.partition not in open_:
                    continue
                for r in records:
                    if sentinel and r.value == sentinel[0]:
                        open_.discard(tp.partition)
                        consumer.pause(tp)
                        break
                    headers = dict(r.headers)
                    tail.records += 1
                    reason = headers.get("asyncflow.reason", b"").decode(errors="replace")
                    kind = kind_of_reason(reason)
                    tail.kinds[kind] += 1
                    tail.examples.setdefault(kind, reason)
                    key_kind = (r.key or b"").decode(errors="replace").rsplit("-", 1)[0]
                    if key_kind != kind:
                        tail.mismatched += 1
                    try:
                        pos = int(headers["asyncflow.partition"]) << 40 | int(
                            headers["asyncflow.offset"]
                        )
                    except (KeyError, ValueError):
                        tail.no_position += 1
                        continue
                    if pos in seen:
                        tail.duplicates += 1
                    else:
                        seen.add(pos)
                        tail.unique = len(seen)
            if tail.records and tail.first_at is None:
                tail.first_at = time.perf_counter()
            if tail.all_at is None and tail.unique >= target:
                tail.all_at = time.perf_counter()
    finally:
        tail.done = True
        await consumer.stop()


def vm_hwm_mb(pid: int) -> float:
    """Peak RSS of process ``pid``: its ``VmHWM`` (what ``benchmarks/_rss.py`` reads for itself)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


@dataclass
class Sampler:
    """The worker's RSS every ``SAMPLE_S`` seconds, with the dead letters counted then."""

    pid: int
    tail: Tail
    target: int  # dead letters expected: progress is printed at each tenth
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (t, MB, dead)
    stop: bool = False

    async def run(self) -> None:
        import psutil  # type: ignore[import-untyped]

        proc = psutil.Process(self.pid)
        started = time.perf_counter()
        tenth = max(1, self.target // 10)
        reported = 0
        while not self.stop:
            try:
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                return
            now, dead = time.perf_counter(), self.tail.unique
            self.samples.append((now, rss, dead))
            if dead >= reported + tenth:
                reported = dead - dead % tenth
                print(
                    f"  {now - started:6.1f} s: {dead:>10,} dead letters, RSS {rss:6.1f} MB",
                    flush=True,
                )
            await asyncio.sleep(SAMPLE_S)

    def at(self, dead: int) -> tuple[float, float] | None:
        """(time, RSS) of the first sample taken with at least ``dead`` dead letters counted."""
        for t, rss, n in self.samples:
            if n >= dead:
                return t, rss
        return None


def logged_rate(log_text: str) -> tuple[int, float] | None:
    """From the worker's log: dead letters from #1 to the last one logged, and the seconds between.

    The worker logs dead letters #1 to #10 and then every thousandth, each line
    with its time (``%(asctime)s``, milliseconds): the rate it dead-letters at
    on its side, whatever this process's producer and consumer manage.
    """
    from datetime import datetime

    first: datetime | None = None
    last: tuple[int, datetime] | None = None
    for line in log_text.splitlines():
        at = line.find(" asyncflow.worker: dead letter #")
        if at < 0:
            continue
        number = int(line[at + 32 :].split(" ", 1)[0])
        when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        if number == 1:
            first = when
        last = (number, when)
    if first is None or last is None or last[0] == 1:
        return None
    return last[0] - 1, (last[1] - first).total_seconds()


def final_metrics(log_text: str) -> dict[str, float]:
    """The worker's counters from its last line (``worker <id> stopped: {...}``)."""
    for line in reversed(log_text.splitlines()):
        marker = " stopped: {"
        if marker in line:
            try:
                out: dict[str, float] = ast.literal_eval(line[line.index(marker) + 10 :])
                return out
            except (ValueError, SyntaxError):
                return {}
    return {}


# -- the run -------------------------------------------------------------------------


async def run(args: argparse.Namespace, bootstrap: str) -> bool:
    import psutil

    from tests.integration.kafka.apps_for_tests import Worker, read_all
    from tests.integration.kafka.broker import create_topic, produce, unique_name

    n, every = args.events, args.good_every
    goods = good_count(n, every)
    app_id = unique_name("poison")
    dead_topic = af.App(app_id).dead_letter_target  # the default: "<id>-dead-letters"
    assert isinstance(dead_topic, str)
    input_topic = await create_topic(bootstrap, PARTITIONS, unique_name("poison-in"))
    output_topic = await create_topic(bootstrap, PARTITIONS, unique_name("poison-out"))
    log_dir = Path(args.log_dir or tempfile.gettempdir())
    worker = Worker(
        "benchmarks.poison_flood:app",
        env={
            "ASYNCFLOW_BROKER": f"kafka://{bootstrap}",
            "POISON_APP_ID": app_id,
            "POISON_INPUT": input_topic,
            "POISON_OUTPUT": output_topic,
            "POISON_LANES": str(args.lanes),
        },
        log_dir=log_dir,
        name="poison-worker",
    ).start()
    print(
        f"events: {n:,} poison + {goods:,} good; input {input_topic}, "
        f"dead letters {dead_topic}; worker pid {worker.pid}, log {worker.log_path}",
        flush=True,
    )
    checks: list[tuple[str, bool]] = []
    tail = Tail()
    sampler = Sampler(worker.pid, tail, n)
    sentinel: list[bytes] = []
    tail_task: asyncio.Task[None] | None = None
    sampler_task: asyncio.Task[None] | None = None
    try:
        await worker.wait_log(r"worker \S+ running", timeout=60)
        await worker.wait_log(r"assigned .*partition", timeout=60)
        # the same worker, idle after its start: its baseline
        proc = psutil.Process(worker.pid)
        await asyncio.sleep(args.idle)
        idle = []
        for _ in range(20):
            idle.append(proc.memory_info().rss / 2**20)
            await asyncio.sleep(0.1)
        baseline = statistics.median(idle)
        hwm_idle = vm_hwm_mb(worker.pid)
        cpu_before = proc.cpu_times()

        tail_task = asyncio.create_task(tail_dead_letters(bootstrap, dead_topic, n, tail, sentinel))
        sampler_task = asyncio.create_task(sampler.run())
        started = time.perf_counter()
        items = flood(n, every, time.time())
        produced = 0
        while True:
            chunk = [next(items, None) for _ in range(CHUNK)]
            chunk_items = [c for c in chunk if c is not None]
            if not chunk_items:
                break
            produced += await produce(bootstrap, input_topic, chunk_items)
            if worker.process is not None and worker.process.poll() is not None:
                break
        produce_s = time.perf_counter() - started
        print(
            f"produced {produced:,} records in {produce_s:.1f} s ({produced / produce_s:,.0f}/s)",
            flush=True,
        )

        produced_at, dead_at_produced = time.perf_counter(), tail.unique
        deadline = time.monotonic() + args.timeout
        alive = True
        while tail.all_at is None:
            if worker.process is not None and worker.process.poll() is not None:
                alive = False
                break
            if tail_task.done():
                tail_task.result()
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        finished = time.perf_counter()
        alive = alive and worker.process is not None and worker.process.poll() is None
        hwm = vm_hwm_mb(worker.pid) if alive else float("nan")
        cpu_after = proc.cpu_times() if alive else cpu_before
        sampler.stop = True
        await sampler_task
        if alive:  # one sample more, with everything counted
            sampler.samples.append(
                (time.perf_counter(), proc.memory_info().rss / 2**20, tail.unique)
            )

        outputs = await read_all(bootstrap, output_topic, PARTITIONS, timeout=60)
        out_ids = [orjson.loads(r.value)["id"] for r in outputs]

        alive_at_end = worker.process is not None and worker.process.poll() is None
        code: int | None = None
        if alive_at_end:
            worker.signal(signal.SIGTERM)
            code = await worker.wait_exit(timeout=90)
        # an exact count: a sentinel after whatever the worker wrote, then read up to it
        from aiokafka import AIOKafkaProducer

        sentinel.append(b"__poison_flood_end__" + os.urandom(8).hex().encode())
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for p in sorted(await producer.partitions_for(dead_topic)):
                await producer.send_and_wait(dead_topic, sentinel[0], partition=p)
        finally:
            await producer.stop()
        await asyncio.wait_for(tail_task, timeout=120)
    finally:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(10)
        for task in (tail_task, sampler_task):
            if task is not None and not task.done():
                task.cancel()

    # -- figures -------------------------------------------------------------------
    metrics = final_metrics(worker.log())
    at10 = sampler.at(max(1, n // 10))
    rss_values = [rss for _, rss, _ in sampler.samples]
    rss_end = rss_values[-1] if rss_values else float("nan")
    peak_sampled = max(rss_values) if rss_values else float("nan")
    rss10 = at10[1] if at10 else float("nan")
    dl_s = None
    if tail.first_at is not None and tail.all_at is not None:
        dl_s = tail.all_at - started
    cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)

    print()
    print(
        f"worker RSS, baseline (idle after start, median of 2 s): {baseline:8.1f} MB"
        f"   (VmHWM then {hwm_idle:.1f} MB)"
    )
    print(f"worker RSS at 10% of the dead letters:                  {rss10:8.1f} MB")
    print(f"worker RSS at the end (all dead letters in the topic):  {rss_end:8.1f} MB")
    print(
        f"worker peak RSS (VmHWM):                                {hwm:8.1f} MB"
        f"   (sampled max {peak_sampled:.1f} MB)"
    )
    print(
        f"growth: peak - RSS at 10% = {hwm - rss10:+.1f} MB; end - RSS at 10% = "
        f"{rss_end - rss10:+.1f} MB; peak - baseline = {hwm - baseline:+.1f} MB"
    )
    blocks = logged_blocks(worker.log())
    if blocks:
        idle_blocks = blocks[0][1]
        b10 = next((b for d, b in blocks if d >= n // 10), None)
        done = [b for d, b in blocks if d >= n]
        print(
            f"Python blocks allocated (sys.getallocatedblocks, each second): idle {idle_blocks:,}, "
            f"at 10% {b10 or 0:,}, when the last was counted {done[0] if done else 0:,}, "
            f"last (idle again, before SIGTERM) {blocks[-1][1]:,}, max {max(b for _, b in blocks):,}"
        )
    print(
        "RSS by progress:",
        ", ".join(
            f"{pct}% {s[1]:.0f}"
            for pct in range(0, 101, 10)
            if (s := sampler.at(max(1, n * pct // 100))) is not None
        ),
        "MB",
    )
    if dl_s is not None:
        print(
            f"dead-lettering: {n:,} in {dl_s:.1f} s from the first record produced: "
            f"{n / dl_s:,.0f} events/s (worker CPU {cpu_s:.1f} s, "
            f"{100 * cpu_s / (finished - started):.0f}% of a core)"
        )
        backlog = n - dead_at_produced
        if backlog >= n // 20 and tail.all_at is not None:
            print(
                f"dead-lettering after the producer finished (a backlog of {backlog:,}): "
                f"{backlog / (tail.all_at - produced_at):,.0f} events/s"
            )
        logged = logged_rate(worker.log())
        if logged is not None and logged[1] > 0:
            print(
                f"dead-lettering on the worker's side (its log, dead letter #1 to #{logged[0] + 1:,}):"
                f" {logged[1]:.1f} s, {logged[0] / logged[1]:,.0f} events/s"
            )
    else:
        print(
            f"dead-lettering: only {tail.unique:,} of {n:,} dead letters arrived "
            f"within {args.timeout:.0f} s"
        )
    print(
        f"dead-letter topic: {tail.records:,} records, {tail.unique:,} distinct input "
        f"positions, {tail.duplicates:,} duplicates, {tail.no_position:,} without a position"
    )
    print("reasons (asyncflow.reason of every dead letter):")
    for kind in (*KINDS, "other"):
        if tail.kinds.get(kind) or kind != "other":
            print(
                f"  {kind:<18} {tail.kinds.get(kind, 0):>9,}   e.g. "
                f"{tail.examples.get(kind, '-')[:110]}"
            )
    print(f"  reason differs from the kind its key names: {tail.mismatched:,}")
    print(
        f"output topic: {len(outputs):,} records, {len(set(out_ids)):,} distinct good ids "
        f"(expected {goods:,})"
    )
    wanted = (
        "events_in",
        "dead_letters",
        "future_events",
        "reads_held_for_outputs",
        "partition_pauses",
        "sink.kafka.written",
        "dead_letters_dropped",
    )
    print(
        "worker counters at exit:",
        ", ".join(f"{k}={int(metrics[k]):,}" for k in wanted if k in metrics) or "(no final line)",
    )
    rebalances = len(worker.lines(r"revoking |lost .*no longer a member"))
    print(
        f"worker: alive at the end: {alive_at_end}; exit code after SIGTERM: {code}; "
        f"rebalances: {rebalances}"
    )

    expected_ids = {f"good-{j}" for j in range(goods)}
    checks += [
        ("all poison records in the dead-letter topic", tail.unique == n),
        ("no dead letter twice", tail.duplicates == 0 and tail.records == tail.unique),
        ("every reason of its kind", tail.mismatched == 0 and not tail.kinds.get("other")),
        ("all good records in the output topic", set(out_ids) == expected_ids),
        ("no good record twice", len(out_ids) == len(set(out_ids))),
        (
            f"RSS flat: peak within {args.flat_mb:g} MB of the RSS at 10%",
            hwm - rss10 <= args.flat_mb,
        ),
        (
            f"RSS flat: end within {args.flat_mb:g} MB of the RSS at 10%",
            rss_end - rss10 <= args.flat_mb,
        ),
        ("worker alive at the end", alive_at_end),
        ("exit code 0 after SIGTERM", code == 0),
    ]
    failed = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if failed:
        print(f"worker log: {worker.log_path}\n{worker.log()[-3000:]}", file=sys.stderr)
    elif not args.log_dir:  # asked for: kept
        worker.log_path.unlink(missing_ok=True)
    return not failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="poison records (1,000,000)")
    parser.add_argument(
        "--good-every",
        type=int,
        default=5_000,
        help="one good reading after every this many poison records (5,000)",
    )
    parser.add_argument("--lanes", type=int, default=4, help="the agent's lanes (4)")
    parser.add_argument(
        "--flat-mb",
        type=float,
        default=25.0,
        help="RSS is flat if peak and end are within this of the RSS at 10%% (25)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=3.0,
        help="seconds the worker idles after joining before its baseline (3)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for every dead letter after producing (1800)",
    )
    parser.add_argument("--log-dir", help="where the worker's log goes (the temp directory)")
    parser.add_argument(
        "--broker",
        default=os.environ.get("ASYNCFLOW_TEST_KAFKA"),
        help="host:port of a running broker (default: start Tansu)",
    )
    args = parser.parse_args()
    if args.events < 10:
        parser.error("--events must be at least 10")

    from tests.integration.kafka.broker import start_tansu

    bootstrap = args.broker.removeprefix("kafka://") if args.broker else None
    tansu = None if bootstrap else start_tansu()
    try:
        ok = asyncio.run(run(args, bootstrap or tansu.bootstrap))  # type: ignore[union-attr]
        if tansu is not None and tansu.process is not None:
            import psutil

            try:
                mb = psutil.Process(tansu.process.pid).memory_info().rss / 2**20
                print(f"(the Tansu broker, memory storage, holds {mb:,.0f} MB RSS)")
            except psutil.Error:
                pass
    finally:
        if tansu is not None:
            tansu.stop()
            tansu.log_path.unlink(missing_ok=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
