"""A Kinesis stream's existence and its shards: ``check_stream`` and ``list_shards``.

Example:
    >>> "create-stream" in str(StreamNotFound("clicks", "http://127.0.0.1:5000", "us-east-1"))
    True
"""

from __future__ import annotations

import asyncio
from typing import Any

from botocore.exceptions import ClientError

from asyncflow.errors import AsyncflowError, ConfigError

from ._aws import Backoff, call_with_retry, endpoint_of, error_code
from .kinesis_shards import ShardInfo


class StreamNotFound(ConfigError):
    """The Kinesis stream does not exist (or is being deleted).

    Example:
        >>> "create-stream" in str(StreamNotFound("clicks", "http://x", "us-east-1"))
        True
    """

    def __init__(self, stream: str, endpoint: str, region: str) -> None:
        super().__init__(
            f"Kinesis stream {stream!r} does not exist at {endpoint} (region {region}); create it "
            f"with `aws kinesis create-stream --stream-name {stream} --shard-count N` or check "
            f"the stream name, the region and endpoint_url"
        )
        self.stream = stream


async def check_stream(client: Any, stream: str, backoff: Backoff, timeout: float = 120.0) -> None:
    """Raise ``StreamNotFound`` unless ``stream`` exists; wait while it is being created.

    Example:
        >>> async def demo(kinesis_client: Any) -> None:
        ...     await check_stream(kinesis_client, "clicks", Backoff())
    """
    endpoint = endpoint_of(client)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            summary = await call_with_retry(
                client.describe_stream_summary,
                backoff=backoff,
                service="kinesis",
                endpoint=endpoint,
                what=f"DescribeStreamSummary of {stream!r}",
                fail=ConfigError,
                StreamName=stream,
            )
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                raise StreamNotFound(stream, endpoint, str(client.meta.region_name)) from None
            raise
        status = summary["StreamDescriptionSummary"].get("StreamStatus", "ACTIVE")
        if status == "DELETING":
            raise StreamNotFound(stream, endpoint, str(client.meta.region_name))
        if status != "CREATING":
            return
        if loop.time() > deadline:
            raise ConfigError(f"Kinesis stream {stream!r} is still CREATING after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def list_shards(
    client: Any, stream: str, backoff: Backoff, *, page_size: int = 1000
) -> list[ShardInfo]:
    """Every shard of ``stream`` (open and closed), following ``NextToken`` pages.

    The API wants a page's ``NextToken`` *without* ``StreamName`` (it refuses
    both); moto 5.2.5 wants both (it refuses the token alone with
    ``InvalidToken``). The call sends the token alone and, if refused, retries
    the page with the stream name.

    Example:
        >>> async def demo(kinesis_client: Any) -> None:
        ...     for shard in await list_shards(kinesis_client, "clicks", Backoff()):
        ...         print(shard.shard_id, shard.parents, shard.closed)
    """
    endpoint = endpoint_of(client)
    shards: list[ShardInfo] = []
    token: str | None = None
    with_stream = False
    while True:
        kwargs: dict[str, Any] = {"MaxResults": page_size}
        if token is None or with_stream:
            kwargs["StreamName"] = stream
        if token is not None:
            kwargs["NextToken"] = token
        try:
            page = await call_with_retry(
                client.list_shards,
                backoff=backoff,
                service="kinesis",
                endpoint=endpoint,
                what=f"ListShards of {stream!r}",
                fail=AsyncflowError,
                **kwargs,
            )
        except ClientError as exc:
            retry = token is not None and not with_stream
            if not retry or error_code(exc) not in ("InvalidToken", "InvalidArgumentException"):
                raise
            with_stream = True
            continue
        shards.extend(ShardInfo.from_api(s) for s in page.get("Shards", []))
        token = page.get("NextToken")
        if not token:
            return shards
