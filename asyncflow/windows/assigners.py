"""Window assigners: which time windows an event belongs to.

All arithmetic is in integer epoch milliseconds. A window is the half-open
interval ``[start, end)``; its *max timestamp* is ``end - 1`` (Flink's
``TimeWindow.maxTimestamp``). Aligned windows start at
``offset + k * step`` for integer ``k``, counted from the Unix epoch, so they
line up with Flink's for the same size, step and offset, negative times
included.

Example:
    >>> from datetime import timedelta
    >>> Tumbling(timedelta(seconds=5)).assign(12_345)
    [(10000, 15000)]
    >>> len(Hopping(timedelta(minutes=1), timedelta(seconds=10)).assign(12_345))
    6
    >>> Session(timedelta(seconds=2)).assign(500)
    [(500, 2500)]
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import ClassVar

from asyncflow.records import floor_ms

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_TIME = -(2**63)
"""Lower bound of time (Flink's ``Long.MIN_VALUE``): the watermark before any event."""
MAX_TIME = 2**63 - 1
"""Upper bound of time: the watermark of an input that has ended."""

_MS = timedelta(milliseconds=1)


def to_epoch_ms(when: datetime | float) -> int:
    """Epoch milliseconds of a tz-aware ``datetime`` or of a number of epoch seconds.

    A naive ``datetime`` is rejected: its instant depends on the machine's time zone.

    Example:
        >>> from datetime import datetime, timezone
        >>> to_epoch_ms(datetime(2024, 3, 1, 12, tzinfo=timezone.utc))
        1709294400000
        >>> to_epoch_ms(1.5)
        1500
    """
    if isinstance(when, datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(
                f"naive datetime {when.isoformat()} has no time zone, so its instant is "
                "ambiguous; attach one, e.g. dt.replace(tzinfo=timezone.utc)"
            )
        return (when - EPOCH) // _MS
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise TypeError(f"expected a tz-aware datetime or epoch seconds, got {when!r}")
    if isinstance(when, int):
        return when * 1000
    return floor_ms(when * 1000)


def from_epoch_ms(ms: int) -> datetime:
    """The UTC ``datetime`` of an epoch-millisecond time.

    Example:
        >>> from_epoch_ms(1500).isoformat()
        '1970-01-01T00:00:01.500000+00:00'
    """
    return EPOCH + timedelta(milliseconds=ms)


def _duration_ms(value: timedelta, name: str, *, minimum: int | None = 1) -> int:
    if not isinstance(value, timedelta):
        raise TypeError(f"{name} must be a datetime.timedelta, got {value!r}")
    ms = value // _MS
    if ms * _MS != value:
        raise ValueError(f"{name} must be a whole number of milliseconds, got {value!r}")
    if minimum is not None and ms < minimum:
        raise ValueError(
            f"{name} must be {'positive' if minimum else 'zero or more'}, got {value!r}"
        )
    return ms


class WindowAssigner:
    """Base of the assigners; the operator reads their millisecond fields.

    ``step_ms`` is the distance between window starts (``size_ms`` for tumbling
    windows); ``gap_ms`` is set for session windows only.

    Example:
        >>> from datetime import timedelta
        >>> a = Hopping(timedelta(seconds=10), timedelta(seconds=5))
        >>> (a.size_ms, a.step_ms, a.is_event_time, a.is_merging)
        (10000, 5000, True, False)
    """

    __slots__ = ("gap_ms", "offset_ms", "size_ms", "step_ms")

    is_event_time: ClassVar[bool] = True
    """Windows follow event time and the watermark (``False``: the wall clock)."""
    is_merging: ClassVar[bool] = False
    """Windows of one key merge when they touch (session windows)."""

    size_ms: int
    step_ms: int
    offset_ms: int
    gap_ms: int

    def assign(self, time_ms: int) -> list[tuple[int, int]]:
        """The ``(start_ms, end_ms)`` windows an event at ``time_ms`` belongs to."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class _Aligned(WindowAssigner):
    __slots__ = ()

    def __init__(self, size: timedelta, step: timedelta, offset: timedelta) -> None:
        self.size_ms = _duration_ms(size, "size")
        self.step_ms = _duration_ms(step, "step")
        # Like Flink, an offset shifts the alignment; only its value modulo the step matters.
        self.offset_ms = _duration_ms(offset, "offset", minimum=None) % self.step_ms
        self.gap_ms = 0

    def assign(self, time_ms: int) -> list[tuple[int, int]]:
        size, step = self.size_ms, self.step_ms
        # Flink's TimeWindow.getWindowStartWithOffset; Python's % is a floor modulo,
        # so this is right for negative times too.
        start = time_ms - (time_ms - self.offset_ms) % step
        out = []
        while start > time_ms - size:
            out.append((start, start + size))
            start -= step
        return out


class Tumbling(_Aligned):
    """Fixed-size, non-overlapping event-time windows (Flink ``TUMBLE``).

    An event at ``t`` falls in the window starting at ``t - ((t - offset) % size)``.

    Example:
        >>> from datetime import timedelta
        >>> Tumbling(timedelta(seconds=5)).assign(-1)
        [(-5000, 0)]
        >>> Tumbling(timedelta(hours=1), offset=timedelta(minutes=15)).assign(0)
        [(-2700000, 900000)]
    """

    __slots__ = ()

    def __init__(self, size: timedelta, offset: timedelta = timedelta(0)) -> None:
        super().__init__(size, size, offset)


class Hopping(_Aligned):
    """Fixed-size windows starting every ``step`` (Flink ``HOP`` / sliding windows).

    Each event falls in about ``size / step`` windows. When ``step`` is larger
    than ``size`` there are gaps between windows, and events in a gap belong to
    no window (they are ignored, as in Flink).

    Example:
        >>> from datetime import timedelta
        >>> Hopping(timedelta(seconds=10), timedelta(seconds=5)).assign(7_000)
        [(5000, 15000), (0, 10000)]
    """

    __slots__ = ()

    def __init__(self, size: timedelta, step: timedelta, offset: timedelta = timedelta(0)) -> None:
        super().__init__(size, step, offset)


class Session(WindowAssigner):
    """Per-key activity sessions that close after ``gap`` without events (Flink ``SESSION``).

    Each event starts the window ``[t, t + gap)``; windows of the same key that
    overlap or touch merge into one, so two events are in the same session when
    their times differ by at most ``gap`` (Flink's ``TimeWindow.intersects``).

    Example:
        >>> from datetime import timedelta
        >>> Session(timedelta(seconds=30)).assign(1_000)
        [(1000, 31000)]
    """

    __slots__ = ()

    is_merging: ClassVar[bool] = True

    def __init__(self, gap: timedelta) -> None:
        self.gap_ms = _duration_ms(gap, "gap")
        self.size_ms = self.step_ms = self.gap_ms
        self.offset_ms = 0

    def assign(self, time_ms: int) -> list[tuple[int, int]]:
        return [(time_ms, time_ms + self.gap_ms)]


class ProcessingTumbling(Tumbling):
    """Tumbling windows over the wall clock at which events arrive, not their event time.

    A window ``[start, end)`` collects the events that arrive while the wall
    clock is in it and fires once the wall clock reaches ``end``.

    Example:
        >>> from datetime import timedelta
        >>> ProcessingTumbling(timedelta(seconds=1)).is_event_time
        False
    """

    __slots__ = ()

    is_event_time: ClassVar[bool] = False


class ProcessingHopping(Hopping):
    """Hopping windows over the wall clock at which events arrive.

    Example:
        >>> from datetime import timedelta
        >>> len(ProcessingHopping(timedelta(seconds=4), timedelta(seconds=1)).assign(0))
        4
    """

    __slots__ = ()

    is_event_time: ClassVar[bool] = False
