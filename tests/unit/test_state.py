"""Durable state on the memory broker: tables and windows across restarts, takeovers, crashes.

Every result is checked against a plain batch computation over the same input.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

import asyncflow as af
from asyncflow.memory import MemoryBroker
from asyncflow.protocols import SinkRecord
from asyncflow.testing import CaptureSink, TestRun, reason_of, wait_for

SIZE_MS = 5_000


def payments(n: int = 2_000, accounts: int = 50, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"account": f"a{rng.randrange(accounts)}", "amount": rng.randrange(1, 100)} for _ in range(n)]


def totals_of(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for r in rows:
        out[r["account"]] += r["amount"]
    return dict(out)


def totals_app(gate: asyncio.Event | None = None, **settings: Any) -> af.App:
    app = af.App("totals", **settings)
    pays = app.topic("payments", key=lambda p: p["account"], partitions=4)
    totals = app.table("totals", default=0)
    running = app.topic("running")

    @app.agent(pays, concurrency=4)
    async def running_total(stream: af.Stream[dict[str, Any]]) -> None:
        total = stream.state(totals)
        async for p in stream:
            if gate is not None:
                await gate.wait()
            new = total.get() + p["amount"]
            total.set(new)
            await running.send(p["account"], new)

    return app


async def send_payments(run: TestRun, rows: list[dict[str, Any]]) -> None:
    await run.send_many("payments", rows, key=lambda p: p["account"])


def readings(n: int = 3_000, sensors: int = 20, seed: int = 7) -> list[dict[str, Any]]:
    """Sensor readings 100 ms apart, each up to 3 s out of order (within the 10 s wait)."""
    rng = random.Random(seed)
    rows = [
        {"sensor": f"s{rng.randrange(sensors)}", "t": i * 100 + rng.randrange(-3_000, 1), "v": i}
        for i in range(n)
    ]
    return rows


def windows_of(rows: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    out: Counter[tuple[str, int]] = Counter()
    for r in rows:
        out[(r["sensor"], r["t"] - r["t"] % SIZE_MS)] += 1
    return dict(out)


def windows_app(sink: CaptureSink, lanes: int = 3, **settings: Any) -> af.App:
    app = af.App("windows", **settings)
    topic = app.topic("readings", key=lambda r: r["sensor"], time=lambda r: r["t"] / 1000,
                      partitions=4)
    out = app.sink(sink)

    @app.agent(topic, concurrency=lanes)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        windows = stream.window(af.Tumbling(timedelta(milliseconds=SIZE_MS)),
                                wait=timedelta(seconds=10), aggregate=af.Count())
        async for w in windows:
            await out.send(w.key, (w.key, w.start_ms, w.value))

    return app


async def send_readings(run: TestRun, rows: list[dict[str, Any]]) -> None:
    await run.send_many("readings", rows, key=lambda r: r["sensor"])


def emitted(*sinks: CaptureSink) -> list[tuple[str, int, int]]:
    return [tuple(v) for s in sinks for v in s.values]  # type: ignore[misc]


async def test_a_running_total_survives_a_restart_exactly() -> None:
    broker = MemoryBroker()
    rows = payments()
    app = totals_app()
    async with TestRun(app, broker=broker) as run:
        await send_payments(run, rows[:1_200])
        await wait_for(lambda: app.metrics.get("events_in") >= 600)
        await run.stop()
    async with TestRun(totals_app(), broker=broker) as run:
        await send_payments(run, rows[1_200:])
        await run.finish()
        assert run.table("totals") == totals_of(rows)


async def test_a_restart_in_the_middle_of_windows_emits_every_window_once_with_its_full_count() -> None:
    broker = MemoryBroker()
    rows = readings()
    first, second = CaptureSink("out"), CaptureSink("out")
    app = windows_app(first)
    async with TestRun(app, broker=broker) as run:
        await send_readings(run, rows[:2_000])
        await wait_for(lambda: len(first.values) >= 15)
        await run.stop()
    app2 = windows_app(second)
    async with TestRun(app2, broker=broker) as run:
        await send_readings(run, rows[2_000:])
        await run.finish()
    got = emitted(first, second)
    assert len(got) == len(set(got)), "a window was emitted twice"
    assert {(k, s): n for k, s, n in got} == windows_of(rows)
    assert app.metrics.get("late_events") == app2.metrics.get("late_events") == 0


@pytest.mark.parametrize("lanes", [(3, 4), (4, 2), (3, 4, 4, 3)], ids=lambda ls: "->".join(map(str, ls)))
@pytest.mark.parametrize("local", [False, True], ids=["changelog", "local-store"])
async def test_windows_stay_whole_when_the_lane_count_changes_between_restarts(
    lanes: tuple[int, ...], local: bool, tmp_path: Path
) -> None:
    broker = MemoryBroker()
    rows = readings()
    settings = {"state_dir": str(tmp_path)} if local else {}
    chunks = [rows[i * len(rows) // len(lanes):(i + 1) * len(rows) // len(lanes)]
              for i in range(len(lanes))]
    sinks = [CaptureSink("out") for _ in lanes]
    for i, (n, chunk, sink) in enumerate(zip(lanes, chunks, sinks, strict=True)):
        async with TestRun(windows_app(sink, lanes=n, **settings), broker=broker) as run:
            await send_readings(run, chunk)
            if i == len(lanes) - 1:
                await run.finish()
            else:
                half = len(chunk) // 2
                await wait_for(lambda: run.app.metrics.get("events_in") >= half)  # noqa: B023
                await run.stop()
    got = emitted(*sinks)
    assert len(got) == len({(k, s) for k, s, _ in got}), "a window was emitted twice"
    assert {(k, s): n for k, s, n in got} == windows_of(rows)


async def test_a_takeover_between_two_workers_gives_complete_windows_and_no_late_events() -> None:
    broker = MemoryBroker()
    rows = readings(n=4_000)
    sink_b, sink_a = CaptureSink("out"), CaptureSink("out")
    worker_b = windows_app(sink_b)
    worker_a = windows_app(sink_a)
    async with TestRun(worker_b, broker=broker) as run_b:
        await send_readings(run_b, rows[:1_500])
        await wait_for(lambda: worker_b.metrics.get("events_in") >= 1_500)
        async with TestRun(worker_a, broker=broker) as run_a:  # joins: takes half the partitions
            await wait_for(lambda: worker_a.metrics.get("state.restored_shards") >= 2)
            await send_readings(run_a, rows[1_500:3_000])
            await run_b.stop()  # B leaves: A takes every partition over, windows and all
            await wait_for(lambda: worker_a.metrics.get("state.restored_shards") >= 4)
            await send_readings(run_a, rows[3_000:])
            await run_a.finish()
    got = emitted(sink_b, sink_a)
    by_window: dict[tuple[str, int], set[int]] = defaultdict(set)
    for k, s, n in got:
        by_window[(k, s)].add(n)
    assert all(len(ns) == 1 for ns in by_window.values()), "a window had two different counts"
    assert {w: ns.pop() for w, ns in by_window.items()} == windows_of(rows)
    assert worker_a.metrics.get("late_events") == worker_b.metrics.get("late_events") == 0


async def test_partitions_taken_over_before_their_first_event_follow_their_own_event_time() -> None:
    # A is far ahead in event time on its own partitions when B leaves; B's partitions have
    # had no event yet. Their backlog then starts at time 0: none of it is late for A.
    broker = MemoryBroker()
    rows = readings(n=2_000)
    sink_b, sink_a = CaptureSink("out"), CaptureSink("out")
    worker_b, worker_a = windows_app(sink_b), windows_app(sink_a)
    async with TestRun(worker_b, broker=broker) as run_b:
        await wait_for(lambda: worker_b.metrics.get("state.restored_shards") >= 4)
        async with TestRun(worker_a, broker=broker) as run_a:
            await wait_for(lambda: worker_a.metrics.get("state.restored_shards") >= 2)
            a_source = broker._group("windows").members[-1]  # the member that joined last
            mine = {tp.partition for tp in a_source.assigned}
            topic, codec = broker.topic("readings"), run_a._topic("readings").key_codec
            ahead = [r for r in rows if topic.partition_for(codec.encode(r["sensor"])) in mine]
            behind = [r for r in rows if r not in ahead]
            assert ahead and behind
            await send_readings(run_a, ahead)
            await wait_for(lambda: worker_a.metrics.get("events_in") >= len(ahead))
            await run_b.stop()  # A takes B's partitions over: nothing read from them yet
            await wait_for(lambda: worker_a.metrics.get("state.restored_shards") >= 4)
            await asyncio.sleep(5 * worker_a.watermark_interval)  # marks go out meanwhile
            await send_readings(run_a, behind)
            await run_a.finish()
    assert worker_a.metrics.get("late_events") == 0
    assert {(k, s): n for k, s, n in emitted(sink_a)} == windows_of(rows)
    assert sink_b.values == []


async def test_state_ahead_of_the_committed_offsets_applies_no_event_twice() -> None:
    # a crash after the changelog write and before the offset commit leaves state that
    # already reflects offsets the group did not commit: their replay must not count twice
    broker = MemoryBroker()
    rows = payments(n=500)
    async with TestRun(totals_app(), broker=broker) as run:
        await send_payments(run, rows)
        await run.finish()
    group = broker._groups["totals"]
    for tp in list(group.committed):
        group.committed[tp] = 1  # back to offset 0, as if the last commits never happened
    for t in broker.topics.values():
        t.ended = False
    app = totals_app()
    async with TestRun(app, broker=broker) as run:
        await run.finish()
        assert run.table("totals") == totals_of(rows)
    # the replay was read (and committed again), and state skipped it
    assert all(broker.committed("totals", "payments", p) == len(log)
               for p, log in enumerate(broker.topics["payments"].partitions))


async def test_a_restart_with_a_state_dir_restores_from_the_local_store(tmp_path: Path) -> None:
    broker = MemoryBroker()
    rows = payments(n=1_000)
    async with TestRun(totals_app(state_dir=str(tmp_path)), broker=broker) as run:
        await send_payments(run, rows[:500])
        await wait_for(lambda: run.app.metrics.get("events_in") >= 500)
        await run.stop()
    assert any(tmp_path.rglob("*")), "no local store was written"
    app = totals_app(state_dir=str(tmp_path))
    async with TestRun(app, broker=broker) as run:
        await send_payments(run, rows[500:])
        await run.finish()
        assert run.table("totals") == totals_of(rows)
    # each of the 4 partitions read only its own marker's tail: the sentinel and nothing else
    assert app.metrics.get("state.restore_records") <= 4 * 2


async def test_a_lost_local_store_is_rebuilt_from_the_changelog(tmp_path: Path) -> None:
    broker = MemoryBroker()
    rows = payments(n=1_000)
    async with TestRun(totals_app(state_dir=str(tmp_path / "one")), broker=broker) as run:
        await send_payments(run, rows[:500])
        await wait_for(lambda: run.app.metrics.get("events_in") >= 500)
        await run.stop()
    app = totals_app(state_dir=str(tmp_path / "two"))  # another machine
    async with TestRun(app, broker=broker) as run:
        await send_payments(run, rows[500:])
        await run.finish()
        assert run.table("totals") == totals_of(rows)
    assert app.metrics.get("state.restore_records") > 4 * 2


async def test_an_unfinished_checkpoint_in_the_changelog_is_ignored_and_overwritten() -> None:
    broker = MemoryBroker()
    rows = payments(n=300, accounts=5)
    async with TestRun(totals_app(), broker=broker) as run:
        await send_payments(run, rows)
        await run.finish()
    expected = totals_of(rows)
    # a worker that died between writing changes and its checkpoint marker left these behind
    from asyncflow.state.shard import PARTITION_HEADER

    topic = "totals-totals-changelog"
    for p, log in enumerate(broker.topics[topic].partitions):
        if not log:
            continue
        label = dict(log[-1].headers)[PARTITION_HEADER]
        key = next((r.key for r in log if r.key is not None and r.key[:1] == b'"'), None)
        if key is None:
            continue
        await broker.append(topic, p, [SinkRecord(key, b"123456789", headers=((PARTITION_HEADER, label),))])
    for t in broker.topics.values():
        t.ended = False
    async with TestRun(totals_app(), broker=broker) as run:
        await send_payments(run, [{"account": "new", "amount": 1}])
        await run.finish()
        assert run.table("totals") == {**expected, "new": 1}


async def test_values_expire_after_their_ttl() -> None:
    clock = af.ManualClock(wall_ms=1_700_000_000_000)
    app = af.App("dedup", watermark_interval=0.01)
    orders = app.topic("orders", key=lambda o: o["id"])
    seen = app.table("seen", default=False, ttl=timedelta(hours=1))
    fresh = app.topic("fresh")

    @app.agent(orders)
    async def dedup(stream: af.Stream[dict[str, Any]]) -> None:
        first = stream.stateful_map(seen, lambda was, o: (True, None if was else o))
        async for o in first:
            await fresh.send(o["id"], o)

    async with TestRun(app, clock=clock) as run:
        await run.send_many("orders", [{"id": 1, "n": 1}, {"id": 1, "n": 2}])
        await wait_for(lambda: app.metrics.get("events_in") == 2)
        clock.advance(2 * 3600)
        await run.send("orders", {"id": 1, "n": 3})
        await run.finish()
        assert run.outputs("fresh") == [{"id": 1, "n": 1}, {"id": 1, "n": 3}]


async def test_a_far_future_event_is_a_dead_letter_and_does_not_stall_its_partition() -> None:
    sink = CaptureSink("out")
    app = windows_app(sink)
    rows = readings(n=5_100, sensors=5)
    rows.insert(100, {"sensor": "s1", "t": 4_102_444_800_000, "v": -1})  # 2100-01-01
    async with TestRun(app) as run:
        await send_readings(run, rows)
        await run.finish()
        dead = run.dead_letters()
    assert app.metrics.get("future_events") == 1
    assert len(dead) == 1
    reason = reason_of(dead[0])
    assert "2100-01-01" in reason and "'<lambda>'" in reason and "1 day" in reason
    assert app.metrics.get("late_events") == 0
    assert {(k, s): n for k, s, n in emitted(sink)} == windows_of(rows[:100] + rows[101:])


class SlowChangelog(MemoryBroker):
    """A memory broker whose changelog reads are slow (a long restore)."""

    async def read_changelog(self, topic: str, partition: int, start: int, *, timeout: float,
                             max_records: int = 10_000) -> Any:
        await asyncio.sleep(0.02)
        return await super().read_changelog(topic, partition, start, timeout=timeout,
                                            max_records=min(max_records, 50))


async def test_a_rebalance_during_a_restore_neither_hangs_nor_skips_data() -> None:
    broker = SlowChangelog()
    rows = payments(n=3_000, accounts=400)
    async with TestRun(totals_app(), broker=broker) as run:
        await send_payments(run, rows[:2_000])
        await wait_for(lambda: run.app.metrics.get("events_in") >= 2_000)
        await run.stop()
    a, b = totals_app(), totals_app()
    async with TestRun(a, broker=broker) as run_a:  # restores ~4,000 changelog records slowly
        async with TestRun(b, broker=broker) as run_b:  # joins in the middle of it
            await send_payments(run_b, rows[2_000:])
            await wait_for(lambda: a.metrics.get("events_in") + b.metrics.get("events_in") >= 1_000,
                           timeout=60)
            await run_b.stop()
        await run_a.finish(timeout=60)
        assert run_a.table("totals") == totals_of(rows)


def test_the_changelog_of_a_table_is_named_after_the_app_and_the_table() -> None:
    from asyncflow.clock import SystemClock
    from asyncflow.state.manager import StateManager

    state = StateManager("shop", directory=None, store="memory", broker=None, clock=SystemClock())
    assert state.changelog_topic("carts") == "shop-carts-changelog"


def test_a_window_entry_is_plain_json() -> None:
    # state is never pickled: what a changelog holds is readable by anything
    from asyncflow.state.codec import JSON_VALUES

    assert orjson.loads(JSON_VALUES.encode([[5000, [3.5, 2]]])) == [[5000, [3.5, 2]]]


async def test_a_partition_given_back_to_its_worker_keeps_every_total_exact() -> None:
    broker = MemoryBroker()
    rows = payments(n=3_000, accounts=40)
    a = totals_app()
    async with TestRun(a, broker=broker) as run_a:
        await send_payments(run_a, rows[:1_000])
        await wait_for(lambda: a.metrics.get("events_in") >= 1_000)
        b = totals_app()
        async with TestRun(b, broker=broker) as run_b:  # takes half of A's partitions...
            await wait_for(lambda: b.metrics.get("state.restored_shards") >= 2)
            await send_payments(run_b, rows[1_000:2_000])
            await wait_for(lambda: a.metrics.get("events_in") + b.metrics.get("events_in") >= 2_000)
            await run_b.stop()  # ...and gives them back
        await wait_for(lambda: a.metrics.get("state.restored_shards") >= 6)
        await send_payments(run_a, rows[2_000:])
        await run_a.finish()
        assert run_a.table("totals") == totals_of(rows)


def test_keys_go_to_the_same_lane_in_every_process() -> None:
    import subprocess
    import sys

    code = "from asyncflow.keys import lane_of; print([lane_of(f'k{i}', 8) for i in range(50)])"
    runs = {
        subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2", "3")
    }
    assert len(runs) == 1


def prefix_totals(rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """Every (account, running total) a correct worker can send, in any order of partitions."""
    out: set[tuple[str, int]] = set()
    running: Counter[str] = Counter()
    for r in rows:  # an account's payments are in one partition, in the order they were sent
        running[r["account"]] += r["amount"]
        out.add((r["account"], running[r["account"]]))
    return out


async def test_a_partition_revoked_without_its_checkpoint_is_never_handled_on_empty_state() -> None:
    # A's lanes are stuck when B joins: the revoke's checkpoint gives up (drain_timeout) and
    # A lets two partitions go with their events still in its lanes. Those events are B's
    # now: A must not go on with them on state it no longer has (totals counted from zero),
    # and when the partitions come back, A must restore them, not keep what it made up.
    broker = MemoryBroker()
    rows = payments(n=2_000, accounts=40)
    gate = asyncio.Event()
    a = totals_app(gate, drain_timeout=0.1)
    async with TestRun(a, broker=broker) as run_a:
        await send_payments(run_a, rows[:1_500])
        await wait_for(lambda: a.metrics.get("events_in") >= 1_500)
        b = totals_app()
        async with TestRun(b, broker=broker) as run_b:  # takes two partitions from stuck A
            await wait_for(lambda: b.metrics.get("state.restored_shards") >= 2)
            gate.set()  # A's lanes go on
            await wait_for(
                lambda: a.metrics.get("checkpoints") >= 1 and b.metrics.get("checkpoints") >= 1
            )
            await wait_for(lambda: all(
                broker.committed("totals", "payments", p) == len(log)
                for p, log in enumerate(broker.topics["payments"].partitions)
            ), timeout=30)
            await run_b.stop()  # and gives them back to A
        assert a._runtime is not None
        owned = a._runtime.runners[0].owned
        await wait_for(lambda: len(owned) == 4)
        await send_payments(run_a, rows[1_500:])
        await run_a.finish()
        assert run_a.table("totals") == totals_of(rows)
    # what A's lanes were on when the partitions went was abandoned, and nothing after it
    assert 1 <= a.metrics.get("events_abandoned") <= 4
    valid = prefix_totals(rows)
    sent = [(r.key.decode().strip('"'), orjson.loads(r.value))
            for log in broker.topics["running"].partitions for r in log]
    wrong = [s for s in sent if s not in valid]
    assert not wrong, f"{len(wrong)} of {len(sent)} totals are no running total, e.g. {wrong[:5]}"


async def test_windows_of_a_partition_revoked_without_its_checkpoint_are_not_made_up_from_its_rest() -> None:
    # As above with windows: A let the windows of two partitions go with the rest of their
    # events still in its lanes. Counted into new windows after that, they would come out
    # as windows with part of their events; B, their new owner, emits the whole ones.
    broker = MemoryBroker()
    rows = readings(n=4_000)
    gate = asyncio.Event()
    sink_a, sink_b = CaptureSink("out"), CaptureSink("out")
    a = af.App("windows", drain_timeout=0.1)
    topic = a.topic("readings", key=lambda r: r["sensor"], time=lambda r: r["t"] / 1000,
                    partitions=4)
    out = a.sink(sink_a)

    @a.agent(topic, concurrency=3)
    async def count(stream: af.Stream[dict[str, Any]]) -> None:
        windows = stream.window(af.Tumbling(timedelta(milliseconds=SIZE_MS)),
                                wait=timedelta(seconds=10), aggregate=af.Count())
        async for w in windows:
            await gate.wait()
            await out.send(w.key, (w.key, w.start_ms, w.value))

    async with TestRun(a, broker=broker) as run_a:
        for end in range(500, 3_001, 500):  # slices queued behind the ones A is stuck in
            await send_readings(run_a, rows[end - 500:end])
            await wait_for(lambda: a.metrics.get("events_in") >= end)  # noqa: B023
        b = windows_app(sink_b)
        async with TestRun(b, broker=broker) as run_b:  # takes two partitions from stuck A
            await wait_for(lambda: b.metrics.get("state.restored_shards") >= 2)
            gate.set()
            await send_readings(run_b, rows[3_000:])
            await run_b.finish()
        await run_a.finish()
    by_window: dict[tuple[str, int], set[int]] = defaultdict(set)
    for k, s, n in emitted(sink_a, sink_b):
        by_window[(k, s)].add(n)
    expected = windows_of(rows)
    wrong = {w: ns for w, ns in by_window.items() if ns != {expected.get(w)}}
    assert not wrong, f"{len(wrong)} windows came out with other counts than {{count}}: {wrong}"
    assert set(by_window) == set(expected)


async def test_a_checkpoint_a_worker_writes_after_losing_its_partition_is_never_restored() -> None:
    # The old owner of p0 did not hear yet that it lost the partition: its checkpoint lands
    # in the changelog after the new owner took the partition over, and claims more than the
    # new owner's state. What anyone restores later is the new owner's state, and the old
    # owner's local store, which holds that checkpoint, is rebuilt instead of trusted.
    from asyncflow.state.restore import restore_shard
    from asyncflow.state.shard import ChangelogTarget, TableShard
    from asyncflow.state.store import MemoryStore

    broker = MemoryBroker()
    broker.create_topic("app-t-changelog")

    def shard(store: MemoryStore | None = None) -> TableShard:
        target = ChangelogTarget(broker, "app-t-changelog", 0, b"p0")
        return TableShard("t", "p0", store or MemoryStore(), target)

    old = shard()
    await restore_shard(old, committed=None)
    await old.persist(old.stage([(b'"a"', b"1")], offset=10, frontier=None, checkpoint_id="o-1"))
    new = shard()
    await restore_shard(new, committed=10)
    assert dict(new.store.items()) == {b'"a"': b"1"}
    await old.persist(old.stage([(b'"a"', b"5"), (b'"b"', b"7")], offset=30, frontier=None,
                                checkpoint_id="o-2"))  # too late: p0 is the new owner's
    await new.persist(new.stage([(b'"a"', b"2")], offset=20, frontier=None, checkpoint_id="n-1"))

    later = shard()
    await restore_shard(later, committed=20)
    assert dict(later.store.items()) == {b'"a"': b"2"} and later.applied == 20
    # their keys are written again, so that compaction cannot bring the late values back
    assert later.compensation == {b'"a"': b"2", b'"b"': None}
    again = shard(old.store)  # the old owner restarts with its local store
    await restore_shard(again, committed=20)
    assert dict(again.store.items()) == {b'"a"': b"2"} and again.applied == 20


async def test_the_local_store_of_a_partition_lost_without_a_rebalance_is_rebuilt_when_it_comes_back(
    tmp_path: Path,
) -> None:
    # Revoked in a rebalance, a partition's local store stays current: it is trusted when the
    # partition comes back. Lost (dropped from the group, a Kinesis lease taken), the worker
    # may have gone on with it after another took it over: its store is rebuilt instead.
    from asyncflow.clock import ManualClock
    from asyncflow.state.manager import StateManager
    from asyncflow.state.table import Table

    broker = MemoryBroker()
    state = StateManager("app", directory=str(tmp_path), store="sqlite", broker=broker,
                         clock=ManualClock())
    counts = Table("counts", default=0)
    state.declare_table(counts)

    def records_read() -> int:
        return state.metrics.get("state.restore_records")

    await state.assign(["p0"], {"p0": None})
    state.table_partition(counts, "p0").set("k", 3)
    await state.persist(state.snapshot({"p0": 10}, {}, "c-1"))
    state.release(["p0"])
    before = records_read()
    await state.assign(["p0"], {"p0": 10})
    assert records_read() - before == 1  # its own sentinel: the local store was current
    state.release(["p0"], lost=True)
    before = records_read()
    await state.assign(["p0"], {"p0": 10})
    changelog = broker.topics["app-counts-changelog"].partitions[0]
    assert records_read() - before == len(changelog)  # read from its start
    assert state.table_partition(counts, "p0").get("k", 0) == 3
    state.close()
