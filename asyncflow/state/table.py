"""Tables: keyed state an app declares and its agents read and write per key.

``app.table(name, ...)`` declares a table; inside an agent, ``stream.state(table)``
is the table seen through the event being handled: ``get``, ``set``,
``delete`` and ``update`` act on that event's key. A key's state lives with
the source partition its events come from (one key, one partition, one lane,
so access is ordered); it is checkpointed with the source offsets into a
local store on disk and a changelog topic ``<app>-<table>-changelog``, and
follows its partition when another worker takes the partition over.

``ttl`` drops a key's value once it has not been written for that long
(wall-clock time of the app's clock): an expired value reads as absent and is
deleted at the next checkpoint that sees it.

Example: a running total per key that survives restarts.

    >>> import asyncio, asyncflow as af
    >>> from asyncflow.testing import TestRun
    >>> app = af.App("totals")
    >>> payments = app.topic("payments", key=lambda p: p["account"])
    >>> totals = app.table("totals", default=0)
    >>> @app.agent(payments)
    ... async def running_total(stream):
    ...     total = stream.state(totals)
    ...     async for p in stream:
    ...         total.set(total.get() + p["amount"])
    >>> async def main():
    ...     async with TestRun(app) as run:
    ...         await run.send_many("payments", [{"account": "a", "amount": 5},
    ...                                          {"account": "a", "amount": 7}])
    ...         await run.finish()
    ...         return run.table("totals")
    >>> asyncio.run(main())
    {'a': 12}
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Generic, TypeVar

from asyncflow.codecs import Codec, codec_for
from asyncflow.errors import ConfigError
from asyncflow.state.codec import JSON_VALUES

V = TypeVar("V")


def check_table_name(name: str) -> str:
    """A table name becomes part of a topic name: letters, digits, '-', '_' and '.'.

    Example:
        >>> check_table_name("a b")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: table name 'a b' must be non-empty letters, digits, '-', '_' or '.'
    """
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"table name {name!r} must be non-empty letters, digits, '-', '_' or '.'")
    return name


class Table(Generic[V]):
    """A declared table: its name, value codec, default value and time to live.

    Declare one with ``app.table(...)``; read and write it from an agent with
    ``stream.state(table)`` (see ``asyncflow.state.keyed.KeyedState``).

    Example:
        >>> from datetime import timedelta
        >>> t = Table("seen", default=False, ttl=timedelta(hours=1))
        >>> t.name, t.default, t.ttl_ms
        ('seen', False, 3600000)
    """

    def __init__(
        self,
        name: str,
        *,
        default: V | None = None,
        value_type: type[V] | None = None,
        codec: str | Codec[Any] | None = None,
        ttl: timedelta | None = None,
    ) -> None:
        self.name = check_table_name(name)
        self.default = default
        self.codec: Codec[Any] = (
            JSON_VALUES if value_type is None and codec is None else codec_for(codec, value_type)
        )
        if ttl is not None and ttl <= timedelta(0):
            raise ConfigError(f"table {name!r}: ttl must be a positive timedelta, got {ttl!r}")
        self.ttl_ms: int | None = None if ttl is None else int(ttl.total_seconds() * 1000)

    def __repr__(self) -> str:
        return f"Table({self.name!r})"
