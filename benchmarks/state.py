"""Keyed state: a running count per key, through the state layer and a full app, and its restores.

N events (``--events``, default 1,000,000) over K keys (``--keys``, default
100,000), drawn uniformly at random with a fixed seed; a key's partition (of
4) is ``crc32(key) % 4``, as the memory broker assigns it. Cases, each in a
process of its own so that its peak RSS is its own:

- ``state_api``: the state layer alone, as an agent uses it. One
  ``TablePartition`` per partition (``StateManager.assign`` over a RocksDB
  store in a temporary directory, changelogs on a ``MemoryBroker``); per
  event ``get`` then ``set`` on the event's partition (the calls
  ``KeyedState`` makes), and every ``--checkpoint-every`` events (100,000) a
  checkpoint: ``StateManager.snapshot`` and ``persist``. Timed in total,
  checkpoints included (``checkpoint_s`` says how much of it they took).
  Baseline: ``d[k] = d.get(k, 0) + 1`` on a plain dict over the same input.
- ``app``: an ``af.App`` on the memory broker, a 4-partition topic of JSON
  values ``{"user": key}`` produced (and ended) before the timer starts, an
  agent (4 lanes) doing the same count with ``stream.state(table)``; timed
  from start until it has drained, checkpointed and stopped. Baseline: the
  hand-written equivalent, ``orjson.loads`` of each raw value and the dict
  update.
- ``restore_local`` and ``restore_changelog``: the state ``state_api`` leaves
  behind (its changelog holds every checkpoint: the memory broker does not
  compact) restored by ``StateManager.assign`` on a fresh ``StateManager``
  pointed at the same broker: from the same directory (the local store is
  current, only the changelog's tail is read) and from a fresh directory (the
  whole changelog is read). ``events`` is the number of keys restored; these
  cases have no baseline. ``before_rss_mb`` is the RSS once the state to
  restore was built (``peak_rss_mb`` includes building it).

Both sides of a ratio run in the same process, alternately, best of
``--repeat``; only ratios compare on a shared machine. Every case checks its
counts against the baseline's. ``--profile CASE`` runs one case under
cProfile and prints where its time goes.

Usage:
    .venv/bin/python benchmarks/state.py
    .venv/bin/python benchmarks/state.py --events 200000 --keys 20000 --json
    .venv/bin/python benchmarks/state.py --profile state_api
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import random
import resource
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import asyncflow as af
from asyncflow.clock import SystemClock
from asyncflow.memory import MemoryBroker
from asyncflow.protocols import TopicPartition
from asyncflow.runtime import GC_YOUNG_THRESHOLD
from asyncflow.state.keyed import TablePartition
from asyncflow.state.manager import StateManager
from asyncflow.state.table import Table
from asyncflow.testing import TestRun
from benchmarks._cases import run_case_process

PARTITIONS = 4
TOPIC = "events"
APP_ID = "state-bench"
TABLE = "counts"
CASES = ("state_api", "app", "restore_local", "restore_changelog")

Input = list[tuple[int, str]]  # (partition, key) per event


def make_input(events: int, keys: int, seed: int = 11) -> Input:
    rng = random.Random(seed)
    names = [f"user-{i:06d}" for i in range(keys)]
    part = [zlib.crc32(name.encode()) % PARTITIONS for name in names]
    picks = [rng.randrange(keys) for _ in range(events)]
    return [(part[i], names[i]) for i in picks]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    import psutil  # type: ignore[import-untyped]

    return float(psutil.Process().memory_info().rss) / 2**20


def with_worker_gc(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the young-generation GC threshold the worker uses (as agents run)."""
    before = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *before[1:])
    try:
        return fn(*args)
    finally:
        gc.set_threshold(*before)


# -- state_api -------------------------------------------------------------------------
def baseline_dict(events: Input) -> tuple[float, dict[str, int]]:
    d: dict[str, int] = {}
    started = time.perf_counter()
    for _, k in events:
        d[k] = d.get(k, 0) + 1
    return time.perf_counter() - started, d


def new_manager(directory: str, broker: MemoryBroker) -> StateManager:
    return StateManager(
        APP_ID, directory=directory, store="rocksdb", broker=broker, clock=SystemClock(),
        changelog_partitions=PARTITIONS,
    )


PARTS = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]


def cuts_of(events: Input, every: int) -> list[dict[Any, int]]:
    """Per checkpoint, each partition's last offset covered (what the dispatcher's cut gives)."""
    counts = [0] * PARTITIONS
    cuts = []
    for i, (p, _) in enumerate(events):
        counts[p] += 1
        if (i + 1) % every == 0 or i + 1 == len(events):
            cuts.append({PARTS[q]: counts[q] - 1 for q in range(PARTITIONS) if counts[q]})
    return cuts


async def state_api(
    events: Input, every: int, directory: str, broker: MemoryBroker,
    profiler: cProfile.Profile | None = None,
) -> tuple[float, float, StateManager]:
    """The running count through TablePartition.get/set, checkpointed; (total s, checkpoint s)."""
    state = new_manager(directory, broker)
    table: Table[int] = Table(TABLE, default=0)
    state.declare_table(table)
    await state.assign(PARTS, dict.fromkeys(PARTS))
    parts: list[TablePartition] = [state.table_partition(table, p) for p in PARTS]
    cuts = cuts_of(events, every)
    in_checkpoints = 0.0
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    for n, start in enumerate(range(0, len(events), every)):
        for p, k in events[start : start + every]:
            tp = parts[p]
            tp.set(k, tp.get(k, 0) + 1)
        began = time.perf_counter()
        staged = state.snapshot(cuts[n], {}, state.next_checkpoint_id())
        await state.persist(staged)
        in_checkpoints += time.perf_counter() - began
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
    return seconds, in_checkpoints, state


def contents(state: StateManager) -> dict[Any, Any]:
    table = state.tables[TABLE]
    out: dict[Any, Any] = {}
    for p in PARTS:
        out.update(state.table_partition(table, p).items())
    return out


def run_state_api(events: Input, every: int, repeat: int) -> dict[str, Any]:
    best = best_base = best_ckpt = float("inf")
    expected: dict[str, int] = {}
    for attempt in range(repeat):
        s, expected = with_worker_gc(baseline_dict, events)
        best_base = min(best_base, s)
        with tempfile.TemporaryDirectory(prefix="asyncflow-state-bench-") as d:
            run = state_api(events, every, d, MemoryBroker())
            s, ckpt, state = with_worker_gc(asyncio.run, run)
            if attempt == 0 and contents(state) != expected:
                raise SystemExit("state_api: the table's counts differ from the dict's")
            state.close()
            del run, state  # the next attempt starts without this one's changelog in memory
            gc.collect()
        if s < best:
            best, best_ckpt = s, ckpt
    n = len(events)
    return {
        "case": "state_api", "events": n, "seconds": round(best, 3),
        "events_per_s": round(n / best), "baseline_events_per_s": round(n / best_base),
        "ratio": round(best_base / best, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
        "keys": len(expected), "checkpoints": len(cuts_of(events, every)),
        "checkpoint_s": round(best_ckpt, 3),
        "ratio_without_checkpoints": round(best_base / (best - best_ckpt), 3),
    }


# -- app ---------------------------------------------------------------------------------
def produce(broker: MemoryBroker, events: Input) -> list[bytes]:
    broker.create_topic(TOPIC, PARTITIONS)
    for _, k in events:
        kb = k.encode()
        broker.produce(TOPIC, b'{"user":"' + kb + b'"}', kb)
    broker.end(TOPIC)
    return [r.value for r in broker.records(TOPIC) if r.value is not None]


def counting_app(directory: str) -> af.App:
    app = af.App(APP_ID, state_dir=directory, state_store="rocksdb")
    topic: af.Topic[dict[str, Any]] = app.topic(
        TOPIC, key=lambda v: v["user"], partitions=PARTITIONS
    )
    counts: Table[int] = app.table(TABLE, default=0)

    @app.agent(topic, concurrency=PARTITIONS)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        n = stream.state(counts)
        async for _ in stream:
            n.set(n.get() + 1)

    return app


async def run_app_once(
    events: Input, directory: str, profiler: cProfile.Profile | None = None
) -> tuple[float, dict[Any, Any]]:
    broker = MemoryBroker()
    produce(broker, events)
    app = counting_app(directory)
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    async with TestRun(app, broker=broker) as run:
        await run.finish(timeout=600)
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
    return seconds, run.table(TABLE)


def baseline_app(raw: list[bytes]) -> tuple[float, dict[str, int]]:
    loads = orjson.loads
    d: dict[str, int] = {}
    started = time.perf_counter()
    for data in raw:
        k = loads(data)["user"]
        d[k] = d.get(k, 0) + 1
    return time.perf_counter() - started, d


def run_app(events: Input, repeat: int) -> dict[str, Any]:
    broker = MemoryBroker()
    raw = produce(broker, events)  # the baseline's input: the same raw values
    del broker
    best = best_base = float("inf")
    for attempt in range(repeat):
        s, expected = with_worker_gc(baseline_app, raw)
        best_base = min(best_base, s)
        with tempfile.TemporaryDirectory(prefix="asyncflow-state-bench-") as d:
            s, table = asyncio.run(run_app_once(events, d))
        if attempt == 0 and table != expected:
            raise SystemExit("app: the table's counts differ from the dict's")
        best = min(best, s)
    n = len(events)
    return {
        "case": "app", "events": n, "seconds": round(best, 3),
        "events_per_s": round(n / best), "baseline_events_per_s": round(n / best_base),
        "ratio": round(best_base / best, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# -- restores ------------------------------------------------------------------------------
async def restore(directory: str, broker: MemoryBroker, committed: dict[Any, int]) -> tuple[
    float, StateManager
]:
    state = new_manager(directory, broker)
    state.declare_table(Table(TABLE, default=0))
    started = time.perf_counter()
    await state.assign(PARTS, committed)
    return time.perf_counter() - started, state


def run_restore(case: str, events: Input, every: int, repeat: int) -> dict[str, Any]:
    _, expected = baseline_dict(events)
    broker = MemoryBroker()
    with tempfile.TemporaryDirectory(prefix="asyncflow-state-bench-") as d:
        _, _, built = asyncio.run(state_api(events, every, f"{d}/built", broker))
        built.close()
        committed = cuts_of(events, every)[-1]
        changelog = sum(len(log) for log in broker.topic(f"{APP_ID}-{TABLE}-changelog").partitions)
        before = rss_mb()
        best = float("inf")
        read = 0.0
        for attempt in range(repeat):
            # restore_local reopens the directory the state was built in; restore_changelog
            # starts from an empty directory each time
            where = f"{d}/built" if case == "restore_local" else f"{d}/fresh-{attempt}"
            s, state = asyncio.run(restore(where, broker, committed))
            best = min(best, s)
            read = state.metrics.get("state.restore_records")
            if attempt == 0 and contents(state) != expected:
                raise SystemExit(f"{case}: the restored counts differ from the dict's")
            state.close()
            del state
            gc.collect()
    n = len(expected)
    return {
        "case": case, "events": n, "seconds": round(best, 4), "events_per_s": round(n / best),
        "baseline_events_per_s": None, "ratio": None, "peak_rss_mb": round(peak_rss_mb(), 1),
        "before_rss_mb": round(before, 1), "changelog_records": changelog,
        "records_read": int(read),
    }


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    events = make_input(args.events, args.keys)
    if case == "state_api":
        return run_state_api(events, args.checkpoint_every, args.repeat)
    if case == "app":
        return run_app(events, args.repeat)
    return run_restore(case, events, args.checkpoint_every, args.repeat)


def profile(case: str, args: argparse.Namespace, top: int = 25) -> None:
    """One run of the framework side of ``case`` under cProfile (its timed part), the top of it."""
    events = make_input(args.events, args.keys)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="asyncflow-state-bench-") as d:
        if case == "state_api":
            run = state_api(events, args.checkpoint_every, d, MemoryBroker(), profiler)
            with_worker_gc(asyncio.run, run)
        elif case == "app":
            asyncio.run(run_app_once(events, d, profiler))  # the worker sets its own GC
        else:
            broker = MemoryBroker()
            _, _, built = asyncio.run(state_api(events, args.checkpoint_every, f"{d}/b", broker))
            built.close()
            where = f"{d}/b" if case == "restore_local" else f"{d}/fresh"
            committed = cuts_of(events, args.checkpoint_every)[-1]
            profiler.enable()
            asyncio.run(restore(where, broker, committed))
        profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--checkpoint-every", type=int, default=100_000, help="state_api: events")
    p.add_argument("--repeat", type=int, default=2, help="alternate runs; best time counts")
    p.add_argument("--json", action="store_true", help="one JSON object per case per line")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    p.add_argument("--profile", choices=CASES, help="run one case under cProfile and print the top")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.profile:
        profile(args.profile, args)
        return
    if args.case:
        print(json.dumps(run_case(args.case, args)), flush=True)
        return
    rows = []
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--case", case, "--events", str(args.events),
                   "--keys", str(args.keys), "--checkpoint-every", str(args.checkpoint_every),
                   "--repeat", str(args.repeat)]
        rows.append(run_case_process(command, case, limit=300 + args.events * args.repeat / 2_000)[-1])
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'case':<19}{'events':>10}{'seconds':>9}{'events/s':>11}{'baseline/s':>12}"
          f"{'ratio':>7}{'peak MB':>9}")
    for r in rows:
        print(f"{r['case']:<19}{r['events']:>10}{r['seconds']:>9.3f}{r['events_per_s']:>11,}"
              f"{fmt(r['baseline_events_per_s'], ',') :>12}{fmt(r['ratio'], '.3f'):>7}"
              f"{r['peak_rss_mb']:>9.0f}")
    for r in rows:
        if r["case"] == "state_api":
            print(f"state_api: {r['checkpoints']} checkpoints took {r['checkpoint_s']:.3f} s of "
                  f"{r['seconds']:.3f} s; without them the ratio is {r['ratio_without_checkpoints']}")
        elif r["case"].startswith("restore"):
            print(f"{r['case']}: {r['records_read']:,} of {r['changelog_records']:,} changelog "
                  f"records read; RSS {r['before_rss_mb']:.0f} MB before the restore")


if __name__ == "__main__":
    main()
