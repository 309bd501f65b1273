"""Join benchmark: a stream–table join and an interval join beside hand-written dict joins.

Cases, each in a process of its own (its peak RSS its own), on the memory broker:

- ``table/app``: ``join_table`` (inner, as of event time): a stream of orders joined with a
  table of 10,000 customers fed from its own topic (one update per 9 orders: the first update of
  every customer, then changes), each order with its customer as of the order's time.
- ``interval/app``: ``interval_join``: views and clicks of 5,000 users, a click matching a view of
  its user when ``view.time - 100 ms <= click.time <= view.time + 500 ms``.

Event time advances 1 ms per event (unique times), with up to ``--disorder`` ms of disorder
within each topic (the joins' ``wait``); both inputs have 4 partitions, keyed by the join key;
one lane. The app's time runs from its start to its end (forwarders, internal topic, state,
checkpoints: everything), its outputs go to a list. The baseline is the hand-written loop a user
would write for the same answers over the same raw JSON, in arrival order: a dict of the latest
customer per id with each order held until the stream has passed its time by the disorder bound
(table), a dict of per-user lists of recent views and clicks, matched on arrival and expired by
time (interval). Both must give the same multiset of results, or the run stops with the
difference; ``ratio`` is the app's events/s over the hand loop's (best of ``--repeat``); on a
shared machine only the ratio compares.

Usage:
    .venv/bin/python benchmarks/joins.py                       # a table
    .venv/bin/python benchmarks/joins.py --events 400000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._cases import run_case_process  # noqa: E402
from benchmarks._rss import peak_rss_mb  # noqa: E402

CASES = ("table", "interval")
PARTITIONS = 4
CUSTOMERS, USERS = 10_000, 5_000
LOWER_MS, UPPER_MS = -100, 500
T0 = 1_700_000_000_000

Row = tuple[str, bytes, int]  # topic, JSON value, event time


def dumps(value: Any) -> bytes:
    """JSON bytes, right-sized (orjson's own result keeps a ~4 KB allocation behind it)."""
    return bytes(memoryview(orjson.dumps(value)))


def generate(case: str, n: int, disorder: int, seed: int = 16) -> list[Row]:
    """``n`` events of both topics in arrival order (times 1 ms apart, shuffled within bounds)."""
    rng = random.Random(seed)
    rows: list[tuple[int, float, Row]] = []
    for i in range(n):
        t = T0 + i
        if case == "table":
            if i % 9 == 0:
                c = i // 9 if i // 9 < CUSTOMERS else rng.randrange(CUSTOMERS)
                v = {"id": c, "tier": rng.choice(("bronze", "silver", "gold")), "t": t}
                row: Row = ("customers", dumps(v), t)
            else:
                v = {"order": i, "customer": rng.randrange(CUSTOMERS), "t": t}
                row = ("orders", dumps(v), t)
        else:
            side = "views" if rng.random() < 0.5 else "clicks"
            row = (side, dumps({"id": i, "user": rng.randrange(USERS), "t": t}), t)
        rows.append((t, t + rng.uniform(0, disorder), row))
    rows.sort(key=lambda r: r[1])
    return [r[2] for r in rows]


# -- hand-written loops ---------------------------------------------------------------------
def hand_table(rows: list[Row], disorder: int) -> list[bytes]:
    """Latest customer per id (by event time); an order waits until time has passed it."""
    loads = orjson.loads
    customers: dict[int, tuple[int, str]] = {}
    versions: dict[int, list[tuple[int, str]]] = {}
    waiting: list[tuple[int, int, int]] = []  # (time, order, customer)
    newest = {"orders": -1, "customers": -1}
    out: list[bytes] = []

    def tier_at(c: int, t: int) -> str | None:
        best: tuple[int, str] | None = None
        for vt, tier in versions.get(c, ()):
            if vt <= t and (best is None or vt >= best[0]):
                best = (vt, tier)
        return None if best is None else best[1]

    for topic, raw, t in rows:
        v = loads(raw)
        if topic == "customers":
            versions.setdefault(v["id"], []).append((t, v["tier"]))
            if len(versions[v["id"]]) > 4:  # keep a few: what the disorder bound can still reach
                versions[v["id"]] = sorted(versions[v["id"]])[-4:]
            customers[v["id"]] = (t, v["tier"])
        else:
            heapq.heappush(waiting, (t, v["order"], v["customer"]))
        newest[topic] = max(newest[topic], t)
        mark = min(newest.values()) - disorder
        while waiting and waiting[0][0] < mark:
            ot, order, c = heapq.heappop(waiting)
            tier = tier_at(c, ot)
            if tier is not None:
                out.append(dumps({"order": order, "tier": tier}))
    for ot, order, c in sorted(waiting):
        tier = tier_at(c, ot)
        if tier is not None:
            out.append(dumps({"order": order, "tier": tier}))
    return out


def hand_interval(rows: list[Row], disorder: int) -> list[bytes]:
    """Per user, lists of recent views and clicks; match on arrival, expire by time."""
    loads = orjson.loads
    views: dict[int, list[tuple[int, int]]] = {}
    clicks: dict[int, list[tuple[int, int]]] = {}
    out: list[bytes] = []
    newest = -1
    for topic, raw, t in rows:
        v = loads(raw)
        u = v["user"]
        if topic == "views":
            for ct, cid in clicks.get(u, ()):
                if t + LOWER_MS <= ct <= t + UPPER_MS:
                    out.append(dumps([v["id"], cid]))
            views.setdefault(u, []).append((t, v["id"]))
        else:
            for vt, vid in views.get(u, ()):
                if vt + LOWER_MS <= t <= vt + UPPER_MS:
                    out.append(dumps([vid, v["id"]]))
            clicks.setdefault(u, []).append((t, v["id"]))
        if t > newest:
            newest = t
            if newest % 1024 == 0:  # expire now and then: what no later event can match
                mark = newest - disorder
                for d, shift in ((views, UPPER_MS), (clicks, -LOWER_MS)):
                    for k in list(d):
                        d[k] = [x for x in d[k] if x[0] + shift >= mark]
                        if not d[k]:
                            del d[k]
    return out


HANDS = {"table": hand_table, "interval": hand_interval}


# -- the apps ---------------------------------------------------------------------------------
async def run_app(case: str, rows: list[Row], disorder: int) -> tuple[float, list[bytes]]:
    import asyncflow as af
    from asyncflow.joins import interval_join, join_table
    from asyncflow.memory import MemoryBroker

    broker = MemoryBroker()
    app = af.App(f"joins-{case}", broker=broker, idle_timeout=60.0)
    wait = timedelta(milliseconds=disorder)
    got: list[bytes] = []
    if case == "table":
        orders: af.Topic[Any] = app.topic("orders", key=lambda o: o["customer"], time="t",
                                          time_unit="ms", partitions=PARTITIONS)
        customers: af.Topic[Any] = app.topic("customers", key=lambda c: c["id"], time="t",
                                             time_unit="ms", partitions=PARTITIONS)
        tj = join_table(orders, customers, name="oc", wait=wait)

        @app.agent(tj.topic)
        async def enrich(stream: af.Stream[Any]) -> None:
            async for j in tj.joined(stream):
                got.append(dumps({"order": j.left["order"], "tier": j.right["tier"]}))
    else:
        views: af.Topic[Any] = app.topic("views", key=lambda v: v["user"], time="t",
                                         time_unit="ms", partitions=PARTITIONS)
        clicks: af.Topic[Any] = app.topic("clicks", key=lambda c: c["user"], time="t",
                                          time_unit="ms", partitions=PARTITIONS)
        ij = interval_join(views, clicks, name="vc", wait=wait,
                           lower=timedelta(milliseconds=LOWER_MS),
                           upper=timedelta(milliseconds=UPPER_MS))

        @app.agent(ij.topic)
        async def pairs(stream: af.Stream[Any]) -> None:
            async for j in ij.joined(stream):
                got.append(dumps([j.left["id"], j.right["id"]]))

    topics = {name for name, _, _ in rows}
    for name in topics:
        broker.create_topic(name, PARTITIONS)
    for name, raw, t in rows:
        key = orjson.loads(raw)["customer" if name == "orders" else
                                "id" if name == "customers" else "user"]
        broker.produce(name, raw, str(key).encode(), (), t)
    for name in topics:
        broker.end(name)
    started = time.perf_counter()
    await app.run()
    seconds = time.perf_counter() - started
    bad = {k: app.metrics.get(k) for k in ("late_events", "dead_letters")}
    if any(bad.values()):
        raise SystemExit(f"{case}: the app had {bad}; the comparison would mean nothing")
    return seconds, got


def measure(case: str, n: int, repeat: int, disorder: int) -> dict[str, Any]:
    rows = generate(case, n, disorder)
    seconds, got = asyncio.run(run_app(case, rows, disorder))
    peak = peak_rss_mb()
    best = float("inf")
    expected: list[bytes] = []
    for _ in range(repeat):
        started = time.perf_counter()
        expected = HANDS[case](rows, disorder)
        best = min(best, time.perf_counter() - started)
    have, want = Counter(got), Counter(expected)
    if have != want:
        raise SystemExit(
            f"{case}: the app's {len(got)} results differ from the hand loop's {len(expected)}: "
            f"{list((have - want).elements())[:3]} only from the app, "
            f"{list((want - have).elements())[:3]} only from the hand loop"
        )
    rate, base = n / seconds, n / best
    return {
        "case": f"{case}/app",
        "events": n,
        "seconds": round(seconds, 3),
        "events_per_s": round(rate),
        "baseline_seconds": round(best, 3),
        "baseline_events_per_s": round(base),
        "ratio": round(rate / base, 3),
        "peak_rss_mb": round(peak, 1),
        "results": len(expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="hand-loop runs; best time counts")
    parser.add_argument("--disorder", type=int, default=200, help="ms of disorder (the wait)")
    parser.add_argument("--json", action="store_true", help="one JSON object per case per line")
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    args = parser.parse_args()
    if args.case:
        row = measure(args.case, args.events, args.repeat, args.disorder)
        print(json.dumps(row), flush=True)
        return
    rows: list[dict[str, Any]] = []
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, "--events", str(args.events),
                   "--repeat", str(args.repeat), "--disorder", str(args.disorder)]
        rows += run_case_process(command, case, limit=120 + args.events * args.repeat / 1_000)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'case':<14}{'events':>9}{'seconds':>9}{'events/s':>11}{'hand/s':>11}{'ratio':>7}"
          f"{'peak MB':>9}{'results':>9}")
    for r in rows:
        print(f"{r['case']:<14}{r['events']:>9,}{r['seconds']:>9.3f}{r['events_per_s']:>11,}"
              f"{r['baseline_events_per_s']:>11,}{r['ratio']:>7.2f}{r['peak_rss_mb']:>9.0f}"
              f"{r['results']:>9,}")


if __name__ == "__main__":
    main()
