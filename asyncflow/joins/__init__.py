"""Joins: a stream with a table (enrichment), and two streams by event-time interval.

- ``join_table(stream, table, name=..., how="inner"|"left", as_of=...)``: each
  stream event with the table's value for its key (as of the event's time, or
  the latest); the table is kept from a topic of updates in durable state.
- ``interval_join(left, right, name=..., lower=..., upper=...)``: pairs of one
  key with ``a.time + lower <= b.time <= a.time + upper``; both sides buffered
  in state and expired by the watermark; late events to the late output.

Both forward their inputs into one internal topic keyed by the join key
(``asyncflow.joins.sides``), which an agent reads; in its body
``join.joined(stream)`` yields ``Joined(key, left, right, time)`` results.
State is checkpointed with the offsets and restored with its partition (see
``asyncflow.state``); outputs are at-least-once like every output.

Example:
    >>> import asyncio, asyncflow as af
    >>> from datetime import timedelta
    >>> from asyncflow.testing import TestRun
    >>> app = af.App("shop")
    >>> views = app.topic("views", key=lambda v: v["user"], time="t")
    >>> buys = app.topic("buys", key=lambda b: b["user"], time="t")
    >>> converted = interval_join(views, buys, name="conversions",
    ...                           lower=timedelta(0), upper=timedelta(seconds=60))
    >>> out = app.topic("conversions")
    >>> @app.agent(converted.topic)
    ... async def convert(stream):
    ...     async for j in converted.joined(stream):
    ...         await out.send(j.key, [j.left["item"], j.right["item"]])
    >>> async def main():
    ...     async with TestRun(app) as run:
    ...         await run.send_many("views", [{"user": "u", "item": "hat", "t": 0}])
    ...         await run.send_many("buys", [{"user": "u", "item": "hat", "t": 30},
    ...                                      {"user": "u", "item": "cap", "t": 90}])
    ...         await run.finish()
    ...         return run.outputs("conversions")
    >>> asyncio.run(main())
    [['hat', 'hat']]
"""

from asyncflow.joins.declare import IntervalJoin, Join, TableJoin, interval_join, join_table
from asyncflow.joins.interval import IntervalJoinOperator
from asyncflow.joins.joined import JoinedStream
from asyncflow.joins.results import Joined
from asyncflow.joins.temporal import TableJoinOperator

__all__ = [
    "IntervalJoin",
    "IntervalJoinOperator",
    "Join",
    "Joined",
    "JoinedStream",
    "TableJoin",
    "TableJoinOperator",
    "interval_join",
    "join_table",
]
