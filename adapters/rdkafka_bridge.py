"""librdkafka's threads and asyncio's loop: how calls and callbacks cross between them.

librdkafka does its network and protocol work in its own C threads. What
Python must call on the client (a consumer's ``consume``, a producer's
``poll`` that serves delivery reports) runs here in one dedicated thread per
client, never on the event loop; what that thread learns goes to the loop
with ``loop.call_soon_threadsafe``, one call per batch, not per record.
Blocking requests (commits, metadata, transactions) run in a worker thread
(``asyncio.to_thread``) and are awaited. A callback that must wait for the
core (a rebalance: the core checkpoints revoked partitions, restores
assigned ones) hands a coroutine to the loop and blocks the client's
thread until it is done, which is what librdkafka expects of a rebalance
callback.

Example:
    >>> import asyncio, threading
    >>> async def demo():
    ...     loop = asyncio.get_running_loop()
    ...     async def core():
    ...         return "checkpointed"
    ...     out = []
    ...     t = threading.Thread(target=lambda: out.append(wait_for_loop(loop, core())))
    ...     t.start()
    ...     await asyncio.to_thread(t.join)
    ...     return out
    >>> asyncio.run(demo())
    ['checkpointed']
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from confluent_kafka import KafkaError

from adapters.kafka_config import KafkaSettings
from adapters.kafka_health import BrokerHealth
from asyncflow.errors import BrokerUnavailable

log = logging.getLogger("asyncflow.kafka")

T = TypeVar("T")

CONNECTION_CODES = frozenset({
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE,
    KafkaError._TIMED_OUT, KafkaError.NETWORK_EXCEPTION,
})
"""librdkafka error codes that mean the cluster cannot be reached (an outage, not a bug)."""


def wait_for_loop(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    serve: Callable[[], None] | None = None,
) -> T:
    """Run ``coro`` on ``loop`` from a client's thread and block that thread until it is done.

    ``serve`` is called every 10 ms meanwhile (the thread runs the calls the
    coroutine queues for it). If the loop is closed meanwhile, the coroutine
    is closed and ``RuntimeError`` raised.
    """
    try:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:
        coro.close()
        raise
    if serve is None:
        return future.result()
    while True:
        serve()
        try:
            return future.result(timeout=0.01)
        except concurrent.futures.TimeoutError:
            continue


def error_callback(
    loop: asyncio.AbstractEventLoop, health: BrokerHealth, what: str
) -> Callable[[KafkaError], None]:
    """librdkafka's ``error_cb`` for one client: connection errors go to ``health`` on the loop.

    Other errors are logged (once per distinct error, at warning level).
    """
    def on_error(err: KafkaError) -> None:
        text = f"{what}: {err.name()}: {err.str()}"
        if err.code() in CONNECTION_CODES:
            _soon(loop, health.failed, text)
        elif err.fatal():
            log.error("the Kafka client failed for good (%s)", text)
        else:
            log.warning("Kafka client error (%s)", text)

    return on_error


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


soon = _soon


async def refuse_fast(settings: KafkaSettings, url: str) -> None:
    """``BrokerUnavailable`` at once if every bootstrap server refuses a TCP connection.

    librdkafka would retry until its timeout; aiokafka says so at once, and so
    does this. A server that accepts (or does not answer) is left to the client.
    """
    timeout = settings.connect_timeout_ms / 1000
    for server in settings.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (ConnectionRefusedError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                return
            continue
        except TimeoutError:
            return
        writer.close()
        return
    servers = ", ".join(settings.bootstrap_servers)
    raise BrokerUnavailable(url, f"no bootstrap server accepted a connection ({servers})")
