"""Find the broker for a URL by its scheme: memory built in, others by entry point.

Connectors register a factory under the ``asyncflow.brokers`` entry-point
group (see pyproject.toml), so the core never imports an adapter.

Example:
    >>> open_broker("memory://", {}).url
    'memory://'
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from asyncflow.errors import ConfigError
from asyncflow.memory import memory_broker
from asyncflow.protocols import Broker, BrokerFactory


def _factory(scheme: str) -> BrokerFactory:
    if scheme == "memory":
        return memory_broker
    # importing importlib.metadata takes ~30 ms: only a worker on another broker pays it
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="asyncflow.brokers") if ep.name == scheme]
    if not found:
        known = sorted({"memory", *(ep.name for ep in entry_points(group="asyncflow.brokers"))})
        raise ConfigError(
            f"no broker for scheme {scheme!r}; known schemes: {', '.join(known)} "
            "(e.g. memory:// or kafka://host:9092)"
        )
    try:
        factory: BrokerFactory = found[0].load()
    except ImportError as exc:
        raise ConfigError(f"the {scheme!r} broker could not be loaded: {exc}") from exc
    return factory


def open_broker(url: str, options: Mapping[str, str]) -> Broker:
    """Build the broker for ``url`` (``memory://`` or ``kafka://host:port[,host:port]``).

    Example:
        >>> open_broker("nats://x", {})
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: no broker for scheme 'nats'; known schemes: kafka, memory (e.g. memory:// or kafka://host:9092)
    """
    scheme = urlsplit(url).scheme
    if not scheme or "://" not in url:
        raise ConfigError(
            f"broker URL {url!r} has no scheme: use memory:// or kafka://host:port[,host:port]"
        )
    return _factory(scheme)(url, options)
