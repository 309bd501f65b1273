"""Wall time behind one small interface, so tests can move time by hand.

Example:
    >>> clock = ManualClock(wall_ms=1_000)
    >>> clock.advance(2.5)
    >>> clock.wall_ms()
    3500
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Reads wall time in epoch milliseconds.

    Example:
        >>> from asyncflow.clock import ManualClock, SystemClock
        >>> clocks: list[Clock] = [SystemClock(), ManualClock(5)]
        >>> clocks[1].wall_ms()
        5
    """

    def wall_ms(self) -> int:
        """Now, in milliseconds since the epoch."""
        ...


class SystemClock:
    """The machine's wall clock.

    Example:
        >>> SystemClock().wall_ms() > 0
        True
    """

    __slots__ = ()

    def wall_ms(self) -> int:
        """The machine's time now, in epoch milliseconds."""
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (for tests).

    Example:
        >>> c = ManualClock(); c.advance(1); c.wall_ms()
        1000
    """

    __slots__ = ("_now",)

    def __init__(self, wall_ms: int = 0) -> None:
        self._now = wall_ms

    def wall_ms(self) -> int:
        """Where the clock was last moved to, in epoch milliseconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self._now += int(seconds * 1000)

    def set(self, wall_ms: int) -> None:
        """Jump to an absolute wall time (epoch ms); time never runs backwards."""
        self._now = max(self._now, wall_ms)
