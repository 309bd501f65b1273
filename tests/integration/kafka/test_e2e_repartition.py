"""Repartitioning on the Kafka-protocol broker: two workers, an input keyed at random.

The input's records are spread over its partitions at random, so every key has
events on every partition; without a repartition each worker would compute each
window from part of its events. The app (``apps_for_tests``, ``repartition``
mode) re-keys the input by the value's key through ``<app>-by-key-repartition``
and computes 1 s tumbling windows there. With two workers sharing the input and
the internal topic, every window must come out once, holding exactly the events
a batch computation gives it, from the worker that owns the key's internal
partition.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from adapters.kafka_sink import kafka_partition
from tests.integration.kafka.apps_for_tests import (
    END_SEQ,
    Config,
    Tail,
    decode_outputs,
    key_of,
    read_all,
    sentinel_keys,
)
from tests.integration.kafka.broker import create_topic, unique_name, wait_for
from tests.integration.kafka.state_workers import (
    PARTITIONS,
    Pool,
    alive,
    kill_soak,
    soak_seed,
    wait_committed,
)
from tests.integration.kafka.test_e2e_state import (
    all_windows_out,
    check_windows,
    expected_windows,
    no_late_events,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]


async def produce_at_random(
    bootstrap: str, topic: str, values: list[bytes], rng: random.Random, spread: bool = False
) -> dict[int, int]:
    """Write ``values`` with random record keys to random partitions; the count per partition.

    ``spread``: value ``i`` to partition ``i``, so each partition gets one.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5)
    await producer.start()
    counts = dict.fromkeys(range(PARTITIONS), 0)
    try:
        pending = []
        for i, v in enumerate(values):
            p = i % PARTITIONS if spread else rng.randrange(PARTITIONS)
            counts[p] += 1
            key = f"r{rng.randrange(1 << 30)}".encode()
            pending.append(await producer.send(topic, v, key=key, partition=p))
        for fut in pending:
            await fut
    finally:
        await producer.stop()
    return counts


async def test_two_workers_on_randomly_keyed_input_emit_every_window_once_after_a_repartition(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    keys, seqs = 40, 300  # windows [0 s, 1 s), [1 s, 2 s), [2 s, 3 s) of every key
    rng = random.Random(11)
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-rk-in"))
    out = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-rk-out"))
    group = unique_name("e2e-repartition")
    cfg = Config(app_id=group, input=src, output=out, mode="repartition", commit_interval=0.5)
    internal = f"{group}-by-key-repartition"
    values = [
        orjson.dumps({"key": key_of(i, keys), "seq": i // keys}) for i in range(keys * seqs)
    ]
    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        a = pool.start("a")
        await a.wait_log(r"running on", 60)
        b = pool.start("b")

        def split() -> bool:  # each holds a share of the input and of the internal topic
            alive(a, b)
            last = [w.lines(r"asyncflow\.worker: assigned (.*)$") for w in (a, b)]
            if not all(last):
                return False
            lines = [found[-1].group(1) for found in last]
            shares = [ln.count("partition=") for ln in lines]
            return all(src in ln and internal in ln for ln in lines) and shares == [
                PARTITIONS, PARTITIONS
            ]

        await wait_for(split, timeout=60, message="the two workers sharing the partitions")
        counts = await produce_at_random(kafka_bootstrap, src, values, rng)
        assert min(counts.values()) > 0
        # at once, a sentinel into every input partition: it pushes that partition's marker
        # past every window, and each internal partition goes by its slowest input partition,
        # so no window closes before every input partition has been forwarded past it
        ends = [
            orjson.dumps({"key": k.decode(), "seq": END_SEQ}) for k in sentinel_keys(PARTITIONS)
        ]
        await produce_at_random(kafka_bootstrap, src, ends, rng, spread=True)
        await tail.wait(all_windows_out(keys, seqs), timeout=60, what="every window",
                        alive=[a, b])
        with_ends = {p: c + 1 for p, c in counts.items()}
        await wait_committed(kafka_bootstrap, group, src, with_ends, timeout=60, workers=[a, b])
        await pool.stop_all()
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    check_windows(results, keys, seqs, exactly_once=True)
    assert await no_late_events(kafka_bootstrap, group) == []
    # the internal topic is keyed by the value's key: each key on one of its partitions,
    # and each window came from the worker that owned that partition at the end
    repartitioned = [  # the records, without the forwarders' watermark markers
        r for r in await read_all(kafka_bootstrap, internal, PARTITIONS) if r.key is not None
    ]
    where = {(r.key, r.partition) for r in repartitioned}
    assert len(where) == keys + len(ends)
    assert all(p == kafka_partition(k, PARTITIONS) for k, p in where)
    assert Counter(r.key for r in repartitioned if not r.value.startswith(b'{"key":"end-')) == {
        key_of(k, keys).encode(): seqs for k in range(keys)
    }
    assert {r["pid"] for r in results} == {a.pid, b.pid}  # both workers computed windows


@pytest.mark.slow
async def test_killed_workers_of_a_repartitioned_input_lose_no_event_and_count_none_twice(
    kafka_bootstrap: str, kafka_url: str, tmp_path: Path
) -> None:
    # a forwarder killed after writing but before its commit forwards those records again;
    # the readers drop the copies (origin header, per-key replay guard), so every window
    # holds each of its events exactly once, whichever worker emitted it and how often
    keys, kills = 40, 6
    seed = soak_seed()
    print(f"seed {seed}")
    rng = random.Random(seed)
    src = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-rk-in"))
    out = await create_topic(kafka_bootstrap, PARTITIONS, unique_name("e2e-rk-out"))
    group = unique_name("e2e-repartition-kills")
    cfg = Config(app_id=group, input=src, output=out, mode="repartition", commit_interval=0.5)

    async def chunk(c: int) -> None:  # 2 seqs of every key, keyed at random
        values = [
            orjson.dumps({"key": key_of(i, keys), "seq": c * 2 + i // keys})
            for i in range(2 * keys)
        ]
        await produce_at_random(kafka_bootstrap, src, values, rng)

    async with (
        Pool(kafka_url, cfg, tmp_path) as pool,
        Tail(kafka_bootstrap, out, PARTITIONS) as tail,
    ):
        report = await kill_soak(pool, ["w0", "w1"], kills=kills, rng=rng, produce_chunk=chunk,
                                 pace=0.3)
        seqs = report.chunks * 2
        ends = [
            orjson.dumps({"key": k.decode(), "seq": END_SEQ}) for k in sentinel_keys(PARTITIONS)
        ]
        await produce_at_random(kafka_bootstrap, src, ends, rng, spread=True)
        await tail.wait(all_windows_out(keys, seqs), timeout=90, what="every window",
                        alive=pool.running())
        await pool.stop_all()
    results = decode_outputs(await read_all(kafka_bootstrap, out, PARTITIONS))
    expected = expected_windows(keys, seqs)
    held: dict[tuple[str, int], set[int]] = {}
    twice = 0
    for r in results:
        window = (r["key"], r["start"])
        assert window in expected, f"a window nobody asked for: {window}"
        assert set(r["seqs"]) <= set(expected[window]), f"{window} holds another window's events"
        twice += len(r["seqs"]) - len(set(r["seqs"]))
        assert r["seqs"] == expected[window] or set(r["seqs"]) < set(expected[window]), r
        held.setdefault(window, set()).update(r["seqs"])
    missing = {w: sorted(set(e) - held.get(w, set())) for w, e in expected.items()}
    missing = {w: m for w, m in missing.items() if m}
    assert not missing, f"{len(missing)} windows lost events, e.g. {list(missing.items())[:3]}"
    assert twice == 0, f"{twice} events counted twice in a window"
    check_windows(results, keys, seqs, exactly_once=False)  # every copy exactly its events
    print(f"{report.kills} kills over {report.chunks} chunks: {len(results)} window results for "
          f"{len(expected)} windows, {twice} events counted twice")
