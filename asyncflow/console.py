"""A sink that prints: for examples, demos and a quick look at what a pipeline sends.

``ConsoleSink`` prints one line per record it is given, ``format(key, value)``
(by default the key, a tab and the value). Register it like any sink with
``app.sink(...)``; a record counts as written once its line is printed, so the
offsets behind it can be committed.

Example:
    >>> import asyncio, asyncflow as af
    >>> app = af.App("hello")
    >>> names = app.topic("names")
    >>> console = app.sink(af.ConsoleSink(lambda key, value: f"hello, {value}!"))
    >>> @app.agent(names)
    ... async def greet(stream):
    ...     async for name in stream:
    ...         await console.send(None, name)
    >>> @app.task
    ... async def load():
    ...     for name in ["Ada", "Grace"]:
    ...         await names.send(None, name)
    ...     await names.end()
    >>> asyncio.run(app.run(stop_when_idle=True))
    hello, Ada!
    hello, Grace!
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from asyncflow.protocols import SinkRecord

__all__ = ["ConsoleSink"]


class ConsoleSink:
    """A sink that prints one line per record, ``format(key, value)``.

    ``format`` turns a record's key and value into its line (default:
    ``f"{key}\\t{value}"``). ``out`` is the text stream written to (default:
    ``sys.stdout`` at the time of writing). With ``every=N`` only every N-th
    record is printed (the 1st, the N+1-th, ...) and, when the worker stops,
    one line says how many records the sink was given. ``footer()``, if
    given, is printed last when the worker stops. ``name`` names the sink
    (two sinks of one app need different names). A record is durable once
    printed. Satisfies ``asyncflow.protocols.Sink``.

    Example:
        >>> import asyncio, asyncflow as af
        >>> sink = af.ConsoleSink(lambda k, v: f"{k}: {v}")
        >>> asyncio.run(sink.write([af.SinkRecord("a", 1), af.SinkRecord("b", 2)]))
        a: 1
        b: 2
        >>> sink = af.ConsoleSink(lambda k, v: f"{k}={v}", every=2, name="sampled")
        >>> asyncio.run(sink.write([af.SinkRecord(k, v) for k, v in zip("abc", [1, 2, 3])]))
        a=1
        c=3
        >>> asyncio.run(sink.stop())
        sampled: 3 records (printed every 2th)
    """

    max_batch = 500
    linger = 0.0

    def __init__(
        self,
        format: Callable[[Any, Any], str] | None = None,
        *,
        name: str = "console",
        out: TextIO | None = None,
        every: int = 1,
        footer: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.format = format or (lambda key, value: f"{key}\t{value}")
        self.out = out
        self.every = max(1, every)
        self.footer = footer
        self.records = 0

    async def start(self) -> None:
        """Nothing to open."""

    async def write(self, records: Sequence[SinkRecord]) -> None:
        """Print the records, one line each (every ``every``-th with ``every > 1``)."""
        every, seen = self.every, self.records
        lines = [
            self.format(r.key, r.value) + "\n"
            for i, r in enumerate(records, seen)
            if i % every == 0
        ]
        self.records = seen + len(records)
        if lines:
            out = self.out or sys.stdout
            out.write("".join(lines))
            out.flush()

    async def stop(self) -> None:
        """Print the count of records (with ``every > 1``), then the footer."""
        out = self.out or sys.stdout
        if self.every > 1 and self.records:
            print(f"{self.name}: {self.records} records (printed every {self.every}th)", file=out)
        if self.footer is not None:
            print(self.footer(), file=out)
