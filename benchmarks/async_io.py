"""Async I/O: ``stream.map_async`` beside a hand-written asyncio loop with a semaphore.

10,000 events (``--events``) over 1,000 keys (``--keys``) each go through a
lookup of 50 ms latency (``--latency``) with 100 lookups in flight
(``--in-flight``): the ideal is in-flight / latency = 2,000 events/s, and
``ideal`` is the fraction of it reached (the issue's target: at least 0.8).
Two lookups:

- ``sleep``: ``await asyncio.sleep(0.05)`` in the process, returning a value
  made from the event;
- ``http``: a GET through one ``aiohttp.ClientSession`` (a connection pool of
  ``--in-flight``) to a local aiohttp server that sleeps 50 ms and answers
  JSON. The server runs in a process of its own, started once by this
  script, so the measured loop is not shared with it (on a 2-core machine the
  two processes take a core each).

The asyncflow side is an ``af.App`` on the memory broker (a 4-partition topic
loaded and ended before the start) with one agent, ``async for r in
stream.map_async(lookup, capacity=in_flight)``: ``<lookup>/1_lane`` is one
lane; ``<lookup>/4_lanes`` is ``concurrency=4``, each lane with
``capacity=in_flight`` and all four sharing one ``af.InFlight(in_flight)``.
The baseline is the loop one would write by hand: for each event, ``await
semaphore.acquire()``, a task for its lookup that releases the semaphore
when done, and a consumer awaiting the tasks in arrival order (which keeps
per-key order too). Both consume the same JSON records (orjson) and are timed
from start to end (the app's start-up and shutdown included), alternately,
``--repeat`` times in the same process; the best and the median run are
printed, and only ratios (asyncflow / hand loop) compare on a shared machine.

Every run is checked: each event's result arrives exactly once, it is the
right result for that event, and the results of each key come in the order
of its events; otherwise the script exits non-zero. Latency is, per event,
the time from its lookup's start to its result reaching the loop body
(lookup + waiting for its turn + the framework): p50 / p99 / max of the best
run. ``peak MB`` is the case process's peak RSS over all its runs, the input
held included (each case runs in its own process). Nothing here asserts a
timing: the fraction of ideal is printed, not checked.

Usage:
    .venv/bin/python benchmarks/async_io.py
    .venv/bin/python benchmarks/async_io.py --events 4000 --repeat 5 --cases sleep/1_lane --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import asyncflow as af
from asyncflow.memory import MemoryBroker
from benchmarks._rss import peak_rss_mb

PARTITIONS = 4
CASES = ("sleep/1_lane", "sleep/4_lanes", "http/1_lane", "http/4_lanes")

Lookup = Callable[[dict[str, Any]], Coroutine[Any, Any, int]]


def make_payloads(n: int, keys: int) -> list[tuple[bytes, bytes]]:
    """``(key, JSON value)``: event ``i`` of key ``k{i % keys}``, its sequence number in the key."""
    out = []
    for i in range(n):
        key = f"k{i % keys}"
        out.append((key.encode(), orjson.dumps({"id": i, "key": key, "seq": i // keys})))
    return out


def answer_for(event_id: int) -> int:
    """The result the lookup gives event ``event_id`` (what the checks expect)."""
    return event_id * 2 + 1


# -- the lookups --------------------------------------------------------------------------------
class Timings:
    """Per event: when its lookup started (latency = result handed out - start)."""

    def __init__(self, n: int) -> None:
        self.started = [0.0] * n
        self.latencies: list[float] = []

    def delivered(self, event_id: int) -> None:
        self.latencies.append(time.perf_counter() - self.started[event_id])


def sleep_lookup(latency: float, timings: Timings) -> Lookup:
    async def lookup(value: dict[str, Any]) -> int:
        timings.started[value["id"]] = time.perf_counter()
        await asyncio.sleep(latency)
        return answer_for(value["id"])

    return lookup


class HttpLookup:
    """GET ``{url}/{id}`` through one session; the server answers ``{"answer": ...}``."""

    def __init__(self, url: str, in_flight: int, timings: Timings) -> None:
        self.url = url
        self.in_flight = in_flight
        self.timings = timings
        self.session: Any = None

    async def __aenter__(self) -> HttpLookup:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.in_flight)
        self.session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def __call__(self, value: dict[str, Any]) -> int:
        self.timings.started[value["id"]] = time.perf_counter()
        async with self.session.get(f"{self.url}/{value['id']}") as response:
            response.raise_for_status()
            body = await response.read()
        answer: int = orjson.loads(body)["answer"]
        return answer


# -- the HTTP server (its own process) ----------------------------------------------------------
def serve(latency: float) -> None:
    """Answer ``GET /lookup/{id}`` after ``latency`` s; print the port, run until killed."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)
        answer = answer_for(int(request.match_info["id"]))
        return web.Response(body=orjson.dumps({"answer": answer}), content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/lookup/{id}", handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class Server:
    """The lookup server as a child process (``--serve``)."""

    def __init__(self, latency: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--latency", str(latency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        port = self.process.stdout.readline().strip()
        if not port:
            self.stop()
            raise SystemExit("the lookup server did not start")
        self.url = f"http://127.0.0.1:{port}/lookup"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# -- the two sides ------------------------------------------------------------------------------
Delivered = list[tuple[Any, int]]
"""(key, result) as the loop body got them, in its order."""


async def run_asyncflow(
    payloads: list[tuple[bytes, bytes]], lookup: Lookup, timings: Timings, lanes: int, in_flight: int
) -> tuple[float, Delivered]:
    broker = MemoryBroker()
    broker.create_topic("events", partitions=PARTITIONS)
    for k, v in payloads:
        broker.produce("events", v, key=k)
    broker.end("events")
    app = af.App("bench-async-io", broker=broker)
    events: af.Topic[Any] = app.topic("events", partitions=PARTITIONS)
    limit = af.InFlight(in_flight) if lanes > 1 else None
    delivered: Delivered = []

    @app.agent(events, concurrency=lanes)
    async def enrich(stream: af.Stream[Any]) -> None:
        async for result in stream.map_async(lookup, capacity=in_flight, limit=limit):
            event = stream.current
            assert event is not None
            # the event's value is the result: the input comes back from the result's id
            delivered.append((event.key, result))
            timings.delivered((result - 1) // 2)

    t0 = time.perf_counter()
    await app.run()
    return time.perf_counter() - t0, delivered


async def run_baseline(
    payloads: list[tuple[bytes, bytes]], lookup: Lookup, timings: Timings, in_flight: int
) -> tuple[float, Delivered]:
    """The hand-written loop: a semaphore around each lookup task, results in arrival order."""
    delivered: Delivered = []
    loads = orjson.loads
    t0 = time.perf_counter()
    semaphore = asyncio.Semaphore(in_flight)
    queue: asyncio.Queue[tuple[bytes, asyncio.Task[int]] | None] = asyncio.Queue()

    def release(_: asyncio.Task[int]) -> None:
        semaphore.release()

    async def produce() -> None:
        for key, data in payloads:
            await semaphore.acquire()
            task = asyncio.create_task(lookup(loads(data)))
            task.add_done_callback(release)
            queue.put_nowait((key, task))
        queue.put_nowait(None)

    async def consume() -> None:
        while (item := await queue.get()) is not None:
            key, task = item
            result = await task
            delivered.append((key, result))
            timings.delivered((result - 1) // 2)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        tg.create_task(consume())
    return time.perf_counter() - t0, delivered


def check(case: str, side: str, payloads: list[tuple[bytes, bytes]], got: Delivered) -> None:
    """Every event's result once, the right one, in per-key order; else exit non-zero."""
    expected = {answer_for(i): key.decode() for i, (key, _) in enumerate(payloads)}
    got = [(k.decode() if isinstance(k, bytes) else k, r) for k, r in got]
    results = [r for _, r in got]
    problems = []
    if len(results) != len(expected) or set(results) != set(expected):
        missing = len(set(expected) - set(results))
        problems.append(f"{len(results)} results for {len(expected)} events ({missing} missing)")
    wrong = sum(1 for key, r in got if expected.get(r) != key)
    if wrong:
        problems.append(f"{wrong} results under another key")
    last: dict[Any, int] = {}
    out_of_order = 0
    for key, r in got:
        if last.get(key, -1) > r:
            out_of_order += 1
        last[key] = r
    if out_of_order:
        problems.append(f"{out_of_order} results before an earlier one of their key")
    if problems:
        raise SystemExit(f"{case} ({side}): " + "; ".join(problems))


def percentile(values: list[float], q: float) -> float:
    """Nearest rank of sorted ``values``."""
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_run(
    case: str, payloads: list[tuple[bytes, bytes]], latency: float, in_flight: int, url: str | None
) -> tuple[tuple[float, list[float]], tuple[float, list[float]]]:
    """One hand-loop run and one asyncflow run (checked): seconds and sorted latencies of each."""
    kind, lanes_name = case.split("/")
    lanes = 1 if lanes_name == "1_lane" else 4
    out = []
    for side in ("baseline", "asyncflow"):
        timings = Timings(len(payloads))
        if kind == "sleep":
            lookup = sleep_lookup(latency, timings)
            if side == "baseline":
                seconds, got = await run_baseline(payloads, lookup, timings, in_flight)
            else:
                seconds, got = await run_asyncflow(payloads, lookup, timings, lanes, in_flight)
        else:
            assert url is not None
            async with HttpLookup(url, in_flight, timings) as http:
                if side == "baseline":
                    seconds, got = await run_baseline(payloads, http, timings, in_flight)
                else:
                    seconds, got = await run_asyncflow(payloads, http, timings, lanes, in_flight)
        check(case, side, payloads, got)
        out.append((seconds, sorted(timings.latencies)))
    return out[0], out[1]


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    case = args.case
    payloads = make_payloads(args.events, args.keys)
    runs = [
        asyncio.run(one_run(case, payloads, args.latency, args.in_flight, args.url))
        for _ in range(args.repeat)
    ]
    base = sorted(b[0] for b, _ in runs)
    fw = sorted(f[0] for _, f in runs)
    best_fw = min(runs, key=lambda r: r[1][0])[1]
    lat = best_fw[1]
    ideal = args.in_flight / args.latency
    n = args.events
    return {
        "case": case,
        "events": n,
        "runs": args.repeat,
        "seconds": round(fw[0], 3),
        "events_per_s": round(n / fw[0]),
        "median_events_per_s": round(n / statistics.median(fw)),
        "baseline_events_per_s": round(n / base[0]),
        "baseline_median_events_per_s": round(n / statistics.median(base)),
        "ideal_events_per_s": round(ideal),
        "fraction_of_ideal": round(n / fw[0] / ideal, 3),
        "median_fraction_of_ideal": round(n / statistics.median(fw) / ideal, 3),
        "baseline_fraction_of_ideal": round(n / base[0] / ideal, 3),
        "ratio": round(base[0] / fw[0], 3),
        "median_ratio": round(statistics.median(base) / statistics.median(fw), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "p50_ms": round(percentile(lat, 0.5) * 1000, 1),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--latency", type=float, default=0.05, help="seconds per lookup")
    p.add_argument("--in-flight", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="runs of each side per case")
    p.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    p.add_argument("--json", action="store_true", help="one JSON object per case per line")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.latency)
        return
    if args.case:
        print(json.dumps(run_case(args)))
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {', '.join(unknown)}; choose from {', '.join(CASES)}")
    server = Server(args.latency) if any(c.startswith("http/") for c in cases) else None
    rows = []
    try:
        for case in cases:
            cmd = [sys.executable, __file__, "--case", case, "--events", str(args.events),
                   "--keys", str(args.keys), "--latency", str(args.latency),
                   "--in-flight", str(args.in_flight), "--repeat", str(args.repeat)]
            if server is not None:
                cmd += ["--url", server.url]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(done.returncode)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        return
    ideal = round(args.in_flight / args.latency)
    print(f"{args.events} events, {args.keys} keys, {args.latency * 1000:g} ms lookups, "
          f"{args.in_flight} in flight: ideal {ideal} events/s. "
          f"Each cell: best / median of {args.repeat} runs")
    print(f"{'case':<15}{'asyncflow/s':>14}{'of ideal':>14}{'hand loop/s':>14}{'of ideal':>14}"
          f"{'ratio':>14}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'peak MB':>9}")
    for r in rows:
        cells = [
            f"{r['events_per_s']} / {r['median_events_per_s']}",
            f"{r['fraction_of_ideal']:.2f} / {r['median_fraction_of_ideal']:.2f}",
            f"{r['baseline_events_per_s']} / {r['baseline_median_events_per_s']}",
            f"{r['baseline_fraction_of_ideal']:.2f} / "
            f"{r['baseline_median_events_per_s'] / r['ideal_events_per_s']:.2f}",
            f"{r['ratio']:.2f} / {r['median_ratio']:.2f}",
        ]
        print(f"{r['case']:<15}" + "".join(f"{c:>14}" for c in cells)
              + f"{r['p50_ms']:>8}{r['p99_ms']:>8}{r['max_ms']:>8}{r['peak_rss_mb']:>9}")

if __name__ == "__main__":
    main()
