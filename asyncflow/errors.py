"""Errors that say what went wrong and what to do about it.

Every error the worker reports to a user derives from ``AsyncflowError``; the
CLI prints its message on one line and exits non-zero, without a traceback.

Example:
    >>> str(BrokerUnavailable("kafka://127.0.0.1:1", "connection refused"))
    'cannot reach broker kafka://127.0.0.1:1: connection refused (is it running? check --broker / ASYNCFLOW_BROKER)'
"""

from __future__ import annotations


class AsyncflowError(Exception):
    """Base of every error asyncflow reports to users."""


class ConfigError(AsyncflowError):
    """A setting, URL or argument is wrong; the message names it and the accepted forms."""


class BrokerUnavailable(AsyncflowError):
    """The broker or service could not be reached."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"cannot reach broker {url}: {reason} (is it running? check --broker / ASYNCFLOW_BROKER)"
        )
        self.url = url
        self.reason = reason


class TopicMissing(AsyncflowError):
    """A topic does not exist and creating it is not allowed."""

    def __init__(self, topic: str, url: str) -> None:
        super().__init__(
            f"topic {topic!r} does not exist on {url}; create it "
            f"(`asyncflow topics create {topic} --partitions N`) or declare it with create=True"
        )
        self.topic = topic


class SinkError(AsyncflowError):
    """A sink could not write a batch after its retries; the worker stops without acking it."""


class DecodeError(AsyncflowError):
    """A record is not valid for its topic's type: malformed bytes or a field of the wrong type."""


class AgentError(AsyncflowError):
    """An agent raised and its error policy is to stop the worker."""
