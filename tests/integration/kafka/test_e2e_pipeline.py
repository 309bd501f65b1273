"""End to end on a real broker, one worker in this process: exactly once without a crash, dead letters.

The app (``apps_for_tests``, transform mode) reads ``{"key", "seq"}`` events from a
4-partition topic and writes one output per event carrying the input partition
and offset. Outputs are read back up to a sentinel per partition and committed
offsets are compared with counted records (Tansu's end offsets are inexact).
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any

import orjson
import pytest

from adapters.kafka_sink import kafka_partition
from tests.integration.kafka.apps_for_tests import (
    Config,
    build,
    count_records,
    decode_outputs,
    key_of,
    partition_counts,
    produce_events,
    read_all,
)
from tests.integration.kafka.broker import committed, create_topic, unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

PARTITIONS = 4


async def topics(bootstrap: str) -> tuple[str, str]:
    src = await create_topic(bootstrap, PARTITIONS, unique_name("e2e-in"))
    out = await create_topic(bootstrap, PARTITIONS, unique_name("e2e-out"))
    return src, out


async def stop(app: Any, task: asyncio.Task[None]) -> None:
    app.stop()
    await asyncio.wait_for(task, 30)


@pytest.mark.slow
async def test_each_event_arrives_exactly_once_in_per_key_order_and_commits_cover_every_input(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    n, keys = 100_000, 1000
    src, out = await topics(kafka_bootstrap)
    assert await produce_events(kafka_bootstrap, src, n, keys=keys) == n
    cfg = Config(app_id=unique_name("e2e-once"), input=src, output=out, broker=kafka_url)
    app = build(cfg)
    task = asyncio.create_task(app.run())
    try:
        await count_records(kafka_bootstrap, out, n, timeout=90)
    finally:
        await stop(app, task)

    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    seen = Counter((o["key"], o["seq"]) for o in outputs)
    assert len(outputs) == n, f"{len(outputs) - n:+d} outputs beyond one per input"
    assert len(seen) == n and max(seen.values()) == 1
    assert set(seen) == {(key_of(i, keys), i // keys) for i in range(n)}
    assert len({(o["p"], o["o"]) for o in outputs}) == n  # one output per input position

    by_key: dict[str, list[int]] = defaultdict(list)
    out_partition: dict[str, set[int]] = defaultdict(set)
    for o in outputs:  # partition by partition, in offset order
        by_key[o["key"]].append(o["seq"])
        out_partition[o["key"]].add(o["out_p"])
        assert o["p"] == kafka_partition(o["key"].encode(), PARTITIONS)
    for key, seqs in by_key.items():
        assert seqs == list(range(len(seqs))), f"{key} out of order: {seqs[:20]}"
        assert len(out_partition[key]) == 1

    expected = partition_counts(n, keys, PARTITIONS)
    assert await committed(kafka_bootstrap, cfg.app_id, src, PARTITIONS) == expected
    assert app.metrics.get("events_in") == n
    assert app.metrics.get("dead_letters") == 0


async def test_malformed_records_go_to_the_dead_letter_topic_with_the_reason_and_the_rest_arrive(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    keys = 50
    src, out = await topics(kafka_bootstrap)
    bad: list[tuple[bytes, bytes, str]] = [
        (b"k0001", b"{not json", "malformed JSON"),
        (b"k0002", b"", "malformed JSON"),
        (b"k0003", orjson.dumps({"key": 7, "seq": 1}), "field 'key'"),
        (b"k0004", orjson.dumps({"key": "k0004", "seq": "three"}), "field 'seq'"),
        (b"k0005", orjson.dumps({"key": "k0005"}), "seq"),
        (b"k0006", orjson.dumps({"key": "k0006", "seq": -1}), "negative seq -1"),
    ]
    await produce_events(kafka_bootstrap, src, 1000, keys=keys, raw=[(k, v) for k, v, _ in bad])
    await produce_events(kafka_bootstrap, src, 1000, keys=keys, start=1000)
    cfg = Config(app_id=unique_name("e2e-dl"), input=src, output=out, broker=kafka_url)
    app = build(cfg)
    dead_topic = f"{cfg.app_id}-dead-letters"
    task = asyncio.create_task(app.run())
    try:
        await count_records(kafka_bootstrap, out, 2000, timeout=60)
        await count_records(kafka_bootstrap, dead_topic, len(bad), timeout=30)
    finally:
        await stop(app, task)

    outputs = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    assert sorted((o["key"], o["seq"]) for o in outputs) == sorted(
        (key_of(i, keys), i // keys) for i in range(2000)
    )
    dead = await read_all(kafka_bootstrap, dead_topic, 1)
    assert len(dead) == len(bad)
    by_key = {r.key: r for r in dead}
    for key, value, reason in bad:
        record = by_key[key]
        headers = {k: v.decode() for k, v in record.headers}
        assert reason in headers["asyncflow.reason"], headers
        assert headers["asyncflow.topic"] == src
        assert headers["asyncflow.partition"] == str(kafka_partition(key, PARTITIONS))
        if reason != "negative seq -1":  # decode failures keep the raw bytes
            assert record.value == value
    assert app.metrics.get("dead_letters") == len(bad)

    # dead letters count as done: the commits cover the malformed records too
    expected = partition_counts(2000, keys, PARTITIONS)
    for key, _, _ in bad:
        expected[kafka_partition(key, PARTITIONS)] += 1
    assert await committed(kafka_bootstrap, cfg.app_id, src, PARTITIONS) == expected


async def test_a_stopped_worker_commits_its_open_windows_as_state_and_a_restart_completes_them(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    keys = 10
    src, out = await topics(kafka_bootstrap)
    # per key, seqs 0-149 at 10 ms each: window [0 s, 1 s) is complete, [1 s, 2 s) half full
    await produce_events(kafka_bootstrap, src, 150 * keys, keys=keys)
    cfg = Config(
        app_id=unique_name("e2e-win"), input=src, output=out, broker=kafka_url, mode="window"
    )
    app = build(cfg)
    task = asyncio.create_task(app.run())
    try:
        await count_records(kafka_bootstrap, out, keys, timeout=30)  # window [0 s, 1 s)
    finally:
        await stop(app, task)
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    assert sorted(r["start"] for r in results) == [0] * keys, "a half-full window was emitted"
    # everything read is committed: the open window's events are in its checkpointed state
    assert await committed(kafka_bootstrap, cfg.app_id, src, PARTITIONS) == partition_counts(
        150 * keys, keys, PARTITIONS
    )

    # a restart resumes the open window with what it had: [1 s, 2 s) once, all 100 events
    await produce_events(kafka_bootstrap, src, 100 * keys, keys=keys, start=150 * keys)
    app = build(cfg)
    task = asyncio.create_task(app.run())
    try:
        await count_records(kafka_bootstrap, out, 2 * keys, timeout=30)
    finally:
        await stop(app, task)
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    assert Counter((r["key"], r["start"]) for r in results) == Counter(
        {(key_of(k, keys), s): 1 for k in range(keys) for s in (0, 1000)}
    )
    for r in results:
        first_seq = r["start"] // 10
        assert r["seqs"] == list(range(first_seq, first_seq + 100)), (r["key"], r["start"])
