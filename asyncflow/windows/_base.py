"""What every window engine shares: the records it emits and its configuration and state.

``WindowOperator`` (``asyncflow.windows.operator``) is the public entry point
and builds the engine for its assigner: the aligned ones live beside it, the
session one in ``asyncflow.windows.sessions``. ``sessions`` imports only this
module and ``operator`` imports both, so the imports have no cycle.

Example:
    >>> r = WindowResult("k", 0, 5_000, 3)
    >>> (r.key, r.end_ms, r.final)
    ('k', 5000, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from asyncflow.windows.aggregates import Aggregate, as_aggregate
from asyncflow.windows.assigners import MIN_TIME, WindowAssigner, _duration_ms, from_epoch_ms


@dataclass(slots=True)
class WindowResult:
    """One window's value for one key.

    ``final`` is ``True`` once the watermark has passed the window's end (it is
    ``False`` only for early results in ``emit="updates"`` mode).

    Example:
        >>> r = WindowResult("k", 0, 5_000, 3)
        >>> r.start.isoformat(), r.end.isoformat()
        ('1970-01-01T00:00:00+00:00', '1970-01-01T00:00:05+00:00')
    """

    key: Any
    start_ms: int
    end_ms: int
    value: Any
    final: bool = True

    @property
    def start(self) -> datetime:
        """The window's start (inclusive) as a UTC ``datetime``."""
        return from_epoch_ms(self.start_ms)

    @property
    def end(self) -> datetime:
        """The window's end (exclusive) as a UTC ``datetime``."""
        return from_epoch_ms(self.end_ms)


class LateEvent(NamedTuple):
    """An event that arrived after every window it belongs to was purged or late.

    Example:
        >>> LateEvent("k", 1_000, 7.5).time_ms
        1000
    """

    key: Any
    time_ms: int
    value: Any


def check_assigner(assigner: object) -> None:
    """Raise ``TypeError`` unless ``assigner`` is a window assigner.

    Example:
        >>> check_assigner(5)
        Traceback (most recent call last):
        ...
        TypeError: a window operator needs a window assigner (Tumbling, Hopping, Session, ...), got int
    """
    if not isinstance(assigner, WindowAssigner):
        raise TypeError(
            "a window operator needs a window assigner (Tumbling, Hopping, Session, ...),"
            f" got {type(assigner).__name__}"
        )


class _OperatorBase:
    """Configuration and state of every engine; ``WindowOperator`` adds the public methods.

    ``__init__`` checks and stores ``WindowOperator``'s arguments; the engines
    read the hot attributes straight from the slots.
    """

    __slots__ = (
        "_add",
        "_create",
        "dirty",
        "failed_at",
        "_frontier",
        "_frontier_wall",
        "_lateness",
        "_result",
        "_system_wait",
        "_updates",
        "_wait",
        "_wall",
        "_wm",
        "aggregate",
        "assigner",
        "emit",
        "late",
        "results",
    )

    def __init__(
        self,
        assigner: WindowAssigner,
        aggregate: Aggregate[Any, Any] | Mapping[str, Aggregate[Any, Any]],
        *,
        wait: timedelta = timedelta(0),
        lateness: timedelta = timedelta(0),
        emit: Literal["final", "updates"] = "final",
        system_wait: timedelta | None = None,
    ) -> None:
        check_assigner(assigner)
        if emit not in ("final", "updates"):
            raise ValueError(f'emit must be "final" or "updates", got {emit!r}')
        agg = as_aggregate(aggregate)
        if assigner.is_merging and not agg.mergeable:
            raise ValueError(
                f"session windows merge accumulators, but {agg!r} cannot merge "
                "(give fold(...) a merger=)"
            )
        self._wait = _duration_ms(wait, "wait", minimum=0)
        self._lateness = _duration_ms(lateness, "lateness", minimum=0)
        self._system_wait = (
            None if system_wait is None else _duration_ms(system_wait, "system_wait", minimum=0)
        )
        if not assigner.is_event_time and (self._wait or self._lateness or system_wait is not None):
            raise ValueError(
                "processing-time windows fire on the wall clock; wait, lateness and "
                "system_wait apply to event-time windows only"
            )
        self.assigner = assigner
        self.aggregate = agg
        self.emit = emit
        self.results: list[WindowResult] = []
        self.late: list[LateEvent] = []
        self.dirty: set[Any] = set()
        """Keys whose windows changed since the last ``export`` (state to checkpoint)."""
        self._wm = MIN_TIME
        self._frontier: int | None = None
        self._frontier_wall = MIN_TIME
        self._wall = MIN_TIME
        self._create = agg.create
        self._add = agg.add
        self._result = agg.result
        self._updates = emit == "updates"
