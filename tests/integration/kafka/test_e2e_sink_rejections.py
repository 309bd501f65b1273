"""End to end on a real broker: an output Kafka refuses is a dead letter, and the worker goes on.

The producer's ``max_request_size`` is set low, so an output over it is
refused for what it is (Tansu enforces no ``max.message.bytes``; the
producer's own limit is the same refusal a broker makes, one step earlier).
Its dead letter, as large, is refused by the dead-letter topic too and goes
again without its value. The commits cover every input all the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asyncflow as af
from tests.integration.kafka.apps_for_tests import count_records, read_all
from tests.integration.kafka.broker import (
    TEST_OPTIONS,
    committed,
    consume,
    create_topic,
    produce,
    unique_name,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def test_an_output_over_the_producers_limit_becomes_a_dead_letter_and_the_rest_arrive(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    src = await create_topic(kafka_bootstrap, 2, unique_name("rej-in"))
    out = await create_topic(kafka_bootstrap, 2, unique_name("rej-out"))
    app_id = unique_name("rej")
    app = af.App(app_id, broker=kafka_url,
                 broker_options=dict(TEST_OPTIONS, max_request_size="20000"), commit_interval=0.2)
    sizes, padded = app.topic(src, value_type=int, partitions=2), app.topic(out, partitions=2)

    @app.agent(sizes)
    async def pad(stream: af.Stream[int]) -> None:
        async for n in stream:
            await padded.send(str(n), "x" * n)

    lengths = [10, 100, 50_000, 1_000, 19_000, 30_000, 5]
    await produce(kafka_bootstrap, src, [(b"%d" % n, b"%d" % n) for n in lengths])
    task = asyncio.create_task(app.run())
    dead_topic = f"{app_id}-dead-letters"
    try:
        await count_records(kafka_bootstrap, out, 5, timeout=60)
        await count_records(kafka_bootstrap, dead_topic, 2, timeout=30)
    finally:
        app.stop()
        await asyncio.wait_for(task, 30)

    written = await read_all(kafka_bootstrap, out, 2)
    assert sorted(len(r.value) - 2 for r in written) == [5, 10, 100, 1_000, 19_000]
    dead = await consume(kafka_bootstrap, dead_topic, 2)  # values are None: no sentinel reader
    by_key: dict[Any, dict[str, str]] = {
        r.key: {k: v.decode() for k, v in r.headers} for r in dead
    }
    assert sorted(by_key) == [b"30000", b"50000"]
    for key, headers in by_key.items():
        assert headers["asyncflow.reason"].startswith("sink kafka refused the record: a record of")
        assert "max_request_size=20000" in headers["asyncflow.reason"]
        assert headers["asyncflow.topic"] == out
        assert headers["asyncflow.value_dropped"].startswith(f"{int(key) + 2} bytes")
    assert all(r.value is None for r in dead)
    got = await committed(kafka_bootstrap, app_id, src, 2)
    assert sum(o or 0 for o in got.values()) == len(lengths)  # every input is committed
    assert app.metrics.get("dead_letters") == 2
