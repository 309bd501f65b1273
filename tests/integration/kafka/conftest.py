"""Fixtures for tests against a real Kafka broker.

The session broker (``kafka_bootstrap``, ``kafka_url``) is defined in
``tests/integration/conftest.py`` and shared by every integration directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from adapters.kafka import KafkaBroker
from tests.integration.kafka.broker import TEST_OPTIONS, create_topic


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
