"""Counters a worker keeps about itself: events in, out, dead-lettered, late, paused.

One ``Metrics`` object belongs to each running app (no global state). The hot
path only adds to plain dicts, once per batch: labelled counters take a tuple
of label values (``incr_labeled``), latency histograms take a whole batch in
one ``observe`` call. ``asyncflow.observe`` reads all of it at scrape time.

Example:
    >>> m = Metrics()
    >>> m.incr("events_in", 3)
    >>> m.get("events_in")
    3
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Upper bounds (seconds) of the latency histograms' buckets (``+Inf`` is implied)."""


class Histogram:
    """Cumulative-bucket histogram of seconds, observed a batch at a time.

    Example:
        >>> h = Histogram((0.1, 1.0))
        >>> h.observe(0.05, count=3); h.observe(2.0)
        >>> h.buckets(), h.count, round(h.sum, 2)
        ([(0.1, 3), (1.0, 3), (inf, 4)], 4, 2.15)
    """

    __slots__ = ("bounds", "count", "sum", "_counts")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """Add ``count`` observations of ``seconds`` (one call per batch, not per event)."""
        self._counts[bisect_left(self.bounds, seconds)] += count
        self.count += count
        self.sum += seconds * count

    def buckets(self) -> list[tuple[float, int]]:
        """``(upper bound, cumulative count)`` pairs, the last bound ``inf``."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Metrics:
    """Named integer counters, gauges, labelled counters and latency histograms.

    Example:
        >>> m = Metrics(); m.gauge("lag", 7); m.snapshot()["lag"]
        7
        >>> m.incr_labeled("events_in", ("rides", "parse"), 10)
        >>> m.labeled("events_in")
        {('rides', 'parse'): 10}
        >>> m.histogram("commit_seconds").observe(0.02); m.histogram("commit_seconds").count
        1
    """

    __slots__ = ("_counters", "_gauges", "_labeled", "_histograms")

    def __init__(self) -> None:
        self._counters: Counter[str] = Counter()
        self._gauges: dict[str, float] = {}
        self._labeled: dict[str, Counter[tuple[str, ...]]] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], Histogram] = {}

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``."""
        self._counters[name] += n

    def incr_labeled(self, name: str, labels: tuple[str, ...], n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` for one combination of label values (bounded sets only)."""
        counter = self._labeled.get(name)
        if counter is None:
            counter = self._labeled[name] = Counter()
        counter[labels] += n

    def labeled(self, name: str) -> dict[tuple[str, ...], int]:
        """The labelled counter ``name``: label values -> count (empty when never added to)."""
        return dict(self._labeled.get(name, {}))

    def histogram(self, name: str, labels: tuple[str, ...] = ()) -> Histogram:
        """The histogram ``name`` for ``labels`` (made on first use)."""
        key = (name, labels)
        h = self._histograms.get(key)
        if h is None:
            h = self._histograms[key] = Histogram()
        return h

    def histograms(self, name: str) -> dict[tuple[str, ...], Histogram]:
        """Every histogram named ``name``, by label values."""
        return {labels: h for (n, labels), h in self._histograms.items() if n == name}

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
