"""How near a per-item ``async for`` can come to a hand-written loop: the floor under the framework.

``memory_pipeline.py`` asks the framework's per-item loop for 0.6x of a
hand-written loop. This script measures what any per-item ``async for`` in
Python costs, with no framework at all, so that the framework's figure can be
read against it. Over ``memory_pipeline.py``'s readings (dict values, or
typed with ``--typed``), three ways of running its decode -> map -> filter ->
sink, each timed over the whole input:

- ``hand``: ``memory_pipeline.run_baseline``, the hand-written loop the
  framework is measured against (batches of 1,000 through an
  ``asyncio.Queue``, the filter written inline);
- ``bare_generator``: the same queue and batches, but the consumer is an
  ``async for`` over an async generator that decodes a batch at a time and
  yields each value after the same ``map`` and ``filter`` calls; the loop
  body appends a ``SinkRecord`` and awaits a done future, as a ``send`` does.
  Nothing else: no lanes, no offsets, no error policy;
- ``framework``: ``memory_pipeline.run_framework``'s per-item case (4 lanes,
  ``stream.map(...).filter(...)``, ``await out.send(...)``, offsets committed).

The three run in one process, one after the other, ``--rounds`` times; the
sums of their times give the ratios (each ``hand`` time over the case's), so
that all three see the same moments of a shared machine's load.

Usage:
    .venv/bin/python benchmarks/per_item_floor.py
    .venv/bin/python benchmarks/per_item_floor.py --typed --events 100000 --rounds 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_pipeline as mp
from _rss import peak_rss_mb

from asyncflow.protocols import SinkRecord

CASES = ("hand", "bare_generator", "framework")


async def run_bare_generator(
    payloads: list[tuple[bytes, bytes]], typed: bool
) -> tuple[float, int]:
    """``run_baseline``'s queue and batches, with an async generator per item before the sink."""
    decode: Callable[[bytes], Any] = (
        msgspec.json.Decoder(mp.ReadingStruct).decode if typed else orjson.loads
    )
    to_celsius, keep = mp.to_celsius, mp.keep
    sink = mp.CountingSink()
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)  # what a send returns while the sink has room

    async def values(queue: mp.Batches) -> AsyncIterator[Any]:
        while (batch := await queue.get()) is not None:
            for value in list(map(decode, batch)):
                value = to_celsius(value)
                if keep(value):
                    yield value

    async def consume(queue: mp.Batches) -> None:
        out: list[SinkRecord] = []
        async for value in values(queue):
            out.append(SinkRecord(None, value))
            await done
            if len(out) >= mp.CountingSink.max_batch:
                await sink.write(out)
                out = []
        await sink.write(out)

    return await mp.run_queued(payloads, consume), sink.count


def measure(events: int, rounds: int, typed: bool) -> list[dict[str, Any]]:
    """Sum each case's time over ``rounds`` rounds of all three; ratios against ``hand``.

    Example:
        >>> rows = measure(2_000, 1, typed=False)
        >>> [r["case"] for r in rows], rows[0]["ratio"]
        (['hand', 'bare_generator', 'framework'], 1.0)
    """
    payloads = mp.make_payloads(events)
    runs: dict[str, Callable[[], Any]] = {
        "hand": lambda: mp.run_baseline(payloads, typed),
        "bare_generator": lambda: run_bare_generator(payloads, typed),
        "framework": lambda: mp.run_framework(payloads, typed, False),
    }
    seconds = dict.fromkeys(CASES, 0.0)
    counts: dict[str, int] = {}
    for _ in range(rounds):
        for case in CASES:
            took, counts[case] = asyncio.run(runs[case]())
            seconds[case] += took
            gc.collect()  # a finished app's objects refer to each other: free them now
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the cases delivered different counts: {counts}")
    return [
        {
            "case": case,
            "typed": typed,
            "events": events,
            "rounds": rounds,
            "seconds": round(seconds[case] / rounds, 3),
            "events_per_s": round(events * rounds / seconds[case]),
            "baseline_events_per_s": round(events * rounds / seconds["hand"]),
            "ratio": round(seconds["hand"] / seconds[case], 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        for case in CASES
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--rounds", type=int, default=10, help="rounds of the three cases (10)")
    p.add_argument("--typed", action="store_true", help="typed records instead of dicts")
    p.add_argument("--json", action="store_true", help="one JSON object per case per line")
    args = p.parse_args()
    if args.events < 1 or args.rounds < 1:
        p.error("--events and --rounds must be at least 1")
    rows = measure(args.events, args.rounds, args.typed)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'case':<16}{'values':>8}{'events':>9}{'rounds':>8}{'events/s':>11}{'ratio':>7}"
          f"{'peak MB':>9}")
    for r in rows:
        print(f"{r['case']:<16}{'typed' if r['typed'] else 'dict':>8}{r['events']:>9}"
              f"{r['rounds']:>8}{r['events_per_s']:>11}{r['ratio']:>7}{r['peak_rss_mb']:>9}")


if __name__ == "__main__":
    main()
