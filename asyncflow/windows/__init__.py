"""Event-time windows: assigners, aggregates, the window operator and the windowed stream.

Example:
    >>> from datetime import timedelta
    >>> from asyncflow.windows import Tumbling, Mean, WindowOperator
    >>> op = WindowOperator(Tumbling(timedelta(seconds=5)), Mean("v"))
    >>> _ = op.on_event("s1", 1_000, {"v": 20.0}); _ = op.on_event("s1", 2_000, {"v": 22.0})
    >>> op.flush_all(); op.results[0].value
    21.0
"""

from asyncflow.windows.aggregates import (
    Aggregate,
    Collect,
    Count,
    First,
    Last,
    Max,
    Mean,
    Min,
    Sum,
    as_aggregate,
    fold,
    reduce,
)
from asyncflow.windows.assigners import (
    Hopping,
    ProcessingHopping,
    ProcessingTumbling,
    Session,
    Tumbling,
    WindowAssigner,
    to_epoch_ms,
)
from asyncflow.windows.operator import LateEvent, WindowOperator, WindowResult
from asyncflow.windows.windowed import WindowedStream

__all__ = [
    "Aggregate",
    "Collect",
    "Count",
    "First",
    "Hopping",
    "Last",
    "LateEvent",
    "Max",
    "Mean",
    "Min",
    "ProcessingHopping",
    "ProcessingTumbling",
    "Session",
    "Sum",
    "Tumbling",
    "WindowAssigner",
    "WindowOperator",
    "WindowResult",
    "WindowedStream",
    "as_aggregate",
    "fold",
    "reduce",
    "to_epoch_ms",
]
