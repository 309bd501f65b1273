"""Fixtures for the AWS adapter tests (the session's ``moto_server`` is in ../conftest.py)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiobotocore.session import AioSession

from tests.integration.aws.moto import CREDENTIALS, REGION


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials and region; nothing may look for real AWS settings or the IMDS."""
    for name in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_ENDPOINT_URL_KINESIS",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique resource names, so tests sharing one server never collide."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture
async def aws(moto_endpoint: str) -> AsyncIterator[Callable[[str], Any]]:
    """``aws("kinesis")`` / ``aws("dynamodb")``: plain aiobotocore clients to set up and inspect."""
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, Any] = {}

        def get(service: str) -> Any:
            return clients[service]

        for service in ("kinesis", "dynamodb"):
            clients[service] = await stack.enter_async_context(
                AioSession().create_client(
                    service, region_name=REGION, endpoint_url=moto_endpoint, **CREDENTIALS
                )
            )
        yield get
