"""Counters a worker keeps about itself: events in, out, dead-lettered, late, paused.

One ``Metrics`` object belongs to each running app (no global state).

Example:
    >>> m = Metrics()
    >>> m.incr("events_in", 3)
    >>> m.get("events_in")
    3
"""

from __future__ import annotations

from collections import Counter


class Metrics:
    """Named integer counters and gauges.

    Example:
        >>> m = Metrics(); m.gauge("lag", 7); m.snapshot()["lag"]
        7
    """

    __slots__ = ("_counters", "_gauges")

    def __init__(self) -> None:
        self._counters: Counter[str] = Counter()
        self._gauges: dict[str, float] = {}

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``."""
        self._counters[name] += n

    def gauge(self, name: str, value: float) -> None:
        """Set the gauge ``name``."""
        self._gauges[name] = value

    def get(self, name: str) -> float:
        """A counter's or gauge's current value (0 when never set)."""
        if name in self._gauges:
            return self._gauges[name]
        return self._counters.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        """All counters and gauges, for logs and tests."""
        out: dict[str, float] = dict(self._counters)
        out.update(self._gauges)
        return out
