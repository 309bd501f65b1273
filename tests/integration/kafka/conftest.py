"""Fixtures for tests against a real Kafka broker.

``kafka_bootstrap`` (session) starts one Tansu broker on a free loopback port,
or uses ``ASYNCFLOW_TEST_KAFKA=host:port`` when set. Other test directories
can reuse it by importing it into their own ``conftest.py``::

    from tests.integration.kafka.conftest import kafka_bootstrap, kafka_url  # noqa: F401
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from adapters.kafka import KafkaBroker
from tests.integration.kafka.broker import ENV_BROKER, TEST_OPTIONS, create_topic, start_tansu


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a Kafka broker for the whole test session."""
    given = os.environ.get(ENV_BROKER)
    if given:
        yield given
        return
    try:
        broker = start_tansu()
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"no Kafka broker: {exc} (or set {ENV_BROKER}=host:port)")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
        broker.log_path.unlink(missing_ok=True)


@pytest.fixture
def kafka_url(kafka_bootstrap: str) -> str:
    """``kafka://host:port`` of the session broker."""
    return f"kafka://{kafka_bootstrap}"


@pytest_asyncio.fixture
async def broker(kafka_url: str) -> AsyncIterator[KafkaBroker]:
    """A ``KafkaBroker`` with the test options (idempotence off, short session timeout)."""
    b = KafkaBroker(kafka_url, TEST_OPTIONS)
    try:
        yield b
    finally:
        await b.close()


@pytest_asyncio.fixture
async def topic4(kafka_bootstrap: str) -> str:
    """A fresh topic with 4 partitions."""
    return await create_topic(kafka_bootstrap, partitions=4)
