"""/metrics of a worker on the real broker: the counters move while it runs and the lag falls to 0.

Also on the real broker: with traces on, each output record carries its input's
W3C ``traceparent`` in its Kafka headers.

The app (``apps_for_tests``, transform mode) reads a 4-partition topic; the test
produces in two rounds and scrapes ``/metrics`` after each, so the counters are
seen to move, and waits for every partition's ``asyncflow_consumer_lag`` to be 0
(the offsets committed up to the end the consumer has seen) with every event read.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncflow.observe.settings import WebSettings, configure_web
from asyncflow.observe.traces import configure_traces, traceparent_of
from tests.integration.kafka.apps_for_tests import Config, build, produce_events
from tests.integration.kafka.broker import consume, create_topic, produce, unique_name

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

ROUND = 3000


async def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def scrape_until(url: str, done: object, timeout: float = 60.0) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(url)
        if done(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, f"not seen within {timeout}s: {samples}"
        await asyncio.sleep(0.2)


def events_in(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> float:
    return sum(samples.get("asyncflow_events_in_total", {}).values())


def lag(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> dict[str, float]:
    return {dict(k)["partition"]: v for k, v in samples.get("asyncflow_consumer_lag", {}).items()}


async def test_metrics_during_a_run_show_counters_moving_and_the_lag_falling_to_zero(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    src = await create_topic(kafka_bootstrap, 4, unique_name("metrics-in"))
    out = await create_topic(kafka_bootstrap, 4, unique_name("metrics-out"))
    app = build(Config(app_id=unique_name("metrics"), input=src, output=out, broker=kafka_url,
                       commit_interval=0.2))
    configure_web(app, WebSettings(0))
    assert await produce_events(kafka_bootstrap, src, ROUND) == ROUND
    task = asyncio.create_task(app.run())
    try:
        async def port() -> int:
            while True:
                runtime = app._runtime
                server = runtime.observer.server if runtime and runtime.observer else None
                if server is not None:
                    return server.port
                assert not task.done(), task
                await asyncio.sleep(0.05)

        url = f"http://127.0.0.1:{await asyncio.wait_for(port(), 30)}/metrics"
        first = await scrape_until(url, lambda s: events_in(s) >= ROUND)
        assert await produce_events(kafka_bootstrap, src, ROUND, start=ROUND) == ROUND
        final = await scrape_until(
            url, lambda s: events_in(s) == 2 * ROUND and len(lag(s)) == 4
            and all(v == 0 for v in lag(s).values()))
    finally:
        app.stop()
        await asyncio.wait_for(task, 30)
    assert events_in(first) < events_in(final)
    assert sum(final["asyncflow_events_out_total"].values()) >= 2 * ROUND
    assert final["asyncflow_commits_total"][()] > first["asyncflow_commits_total"][()]
    assert final["asyncflow_processing_seconds_count"][()] > 0
    assert len(final["asyncflow_watermark_seconds"]) == 4


async def test_with_traces_on_each_output_record_carries_its_inputs_traceparent_header(
    kafka_bootstrap: str, kafka_url: str
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    src = await create_topic(kafka_bootstrap, 2, unique_name("traced-in"))
    out = await create_topic(kafka_bootstrap, 2, unique_name("traced-out"))
    app = build(Config(app_id=unique_name("traced"), input=src, output=out, broker=kafka_url,
                       partitions=2, concurrency=2, commit_interval=0.2))
    configure_traces(app, TracerProvider())
    items = [(f"k{i}".encode(), json.dumps({"key": f"k{i}", "seq": i}).encode())
             for i in range(20)]
    assert await produce(kafka_bootstrap, src, items,
                         headers=[("traceparent", parent.encode())]) == 20
    task = asyncio.create_task(app.run())
    try:
        outputs = await consume(kafka_bootstrap, out, 20, timeout=60)
    finally:
        app.stop()
        await asyncio.wait_for(task, 30)
    assert {traceparent_of(r.headers) for r in outputs} == {parent}
