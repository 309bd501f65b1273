"""The stream–table join of one partition, without I/O: table versions, waiting events.

``TableJoinOperator`` keeps, per key, the table's values as *versions*
``(time, seq, value)`` in event-time order, and joins each stream event with
the version its key had at the event's time. Two ways to do that (``as_of``):

- ``"event_time"`` (a temporal join, Flink's event-time temporal table join):
  a stream event waits until the watermark has passed its time, so every
  table update up to that time (within the watermark's bound) has arrived,
  then joins the latest version with time ``<=`` its own (equal times: the
  update read later wins). The result does not depend on how the two inputs
  were interleaved within the bound, so a replay gives the same answers. A
  stream event older than the watermark is late (``on_event`` returns
  ``False``). A table update older than the watermark is applied all the
  same, for the stream events still to come, and counted in
  ``late_updates``. Versions that no stream event can see any more (one
  newer than them is at or below the watermark) are dropped, so a key keeps
  one version once time has passed its updates.
- ``"latest"``: a stream event joins at once with the newest version received
  (newest by event time: an update older than the key's current one does not
  replace it; updates without a time replace it always). Nothing waits and
  nothing is late.

``deleted(value)`` true marks an update as the key's deletion (a compacted
topic's way of saying a row is gone, when its records carry a flag).
``how="inner"`` drops a stream event whose key has no value (or a deleted
one) at that time; ``"left"`` yields it with ``right=None``.

Example:
    >>> op = TableJoinOperator(how="left")
    >>> op.on_event(1, "d1", 1_000, 0, {"name": "Ann"})
    True
    >>> op.on_event(0, "d1", 2_000, 1, "ride-a")
    True
    >>> op.on_event(1, "d1", 3_000, 2, {"name": "Ann B."})   # after the ride: not for it
    True
    >>> op.on_watermark(5_000)
    >>> [(j.left, j.right["name"]) for j in op.results]
    [('ride-a', 'Ann')]
"""

from __future__ import annotations

import heapq
from bisect import insort
from collections.abc import Callable, Hashable
from typing import Any, Literal

from asyncflow.joins.results import DELETED, Item, Joined

How = Literal["inner", "left"]
AsOf = Literal["event_time", "latest"]


def _order(item: list[Any]) -> tuple[int, int]:
    t = item[0]
    return (-(2**63) if t is None else t, item[1])


class TableJoinOperator:
    """One partition's stream–table join (see the module docstring).

    ``on_event(side, key, time, seq, value)`` takes a stream event (side 0)
    or a table update (side 1); results collect in ``results``.

    Example:
        >>> op = TableJoinOperator(how="inner", as_of="latest")
        >>> _ = op.on_event(0, "d9", 10, 0, "ride")     # no driver yet: dropped
        >>> _ = op.on_event(1, "d9", 5, 1, "Bo"); _ = op.on_event(0, "d9", 20, 2, "ride2")
        >>> [(j.left, j.right) for j in op.results]
        [('ride2', 'Bo')]
    """

    __slots__ = (
        "_deleted",
        "_heap",
        "_stale",
        "as_of",
        "dirty",
        "how",
        "late_updates",
        "needs_time",
        "pending",
        "results",
        "versions",
        "watermark",
    )

    def __init__(
        self,
        *,
        how: How = "inner",
        as_of: AsOf = "event_time",
        deleted: Callable[[Any], bool] | None = None,
    ) -> None:
        if how not in ("inner", "left"):
            raise ValueError(f"how={how!r}: a table join is 'inner' or 'left'")
        if as_of not in ("event_time", "latest"):
            raise ValueError(f"as_of={as_of!r}: use 'event_time' or 'latest'")
        self._deleted = deleted
        self.how = how
        self.as_of = as_of
        self.needs_time = as_of == "event_time"
        """Whether events without an event time cannot be joined (dead letters)."""
        self.versions: dict[Hashable, list[list[Any]]] = {}
        """Per key, the table's versions ``[time, seq, value]`` in (time, seq) order."""
        self.pending: dict[Hashable, int] = {}
        """Per key, how many stream events wait for the watermark (they are in ``_heap``)."""
        self._heap: list[tuple[int, int, Hashable, Any]] = []  # (time, seq, key, value)
        # (time from which a key's oldest version is hidden, seq, key): what to prune when
        self._stale: list[tuple[int, int, Hashable]] = []
        self.watermark: int | None = None
        self.results: list[Joined[Any, Any]] = []
        self.dirty: set[Hashable] = set()
        self.late_updates = 0

    # -- input ----------------------------------------------------------------------
    def on_event(self, side: int, key: Hashable, time: int | None, seq: int, value: Any) -> bool:
        """Take one event; ``False`` when it is a late stream event (not joined)."""
        if side == 1:
            deleted = self._deleted
            self._update(key, time, seq, DELETED if deleted and deleted(value) else value)
            return True
        if self.as_of == "latest":
            vs = self.versions.get(key)
            self._emit(key, time, value, vs[-1][2] if vs else DELETED)
            return True
        assert time is not None, "an event-time join takes events with a time"
        wm = self.watermark
        if wm is not None and time < wm:
            return False
        pending = self.pending
        pending[key] = pending.get(key, 0) + 1
        heapq.heappush(self._heap, (time, seq, key, value))
        self.dirty.add(key)
        return True

    def _update(self, key: Hashable, time: int | None, seq: int, value: Any) -> None:
        vs = self.versions.get(key)
        self.dirty.add(key)
        if self.as_of == "latest":
            if vs and time is not None and vs[-1][0] is not None and time < vs[-1][0]:
                return  # older than the key's current value: superseded already
            self.versions[key] = [[time, seq, value]]
            return
        if vs is None:
            vs = self.versions[key] = []
        insort(vs, [time, seq, value], key=_order)
        self._due(key, vs)
        wm = self.watermark
        if wm is not None and time is not None and time < wm:
            self.late_updates += 1
            self._prune(key, vs, wm)

    # -- time -----------------------------------------------------------------------
    def on_watermark(self, watermark: int | None) -> None:
        """Event time has reached ``watermark``: join the events before it, drop old versions."""
        if watermark is None or (self.watermark is not None and watermark <= self.watermark):
            return
        self.watermark = watermark
        heap = self._heap
        while heap and heap[0][0] < watermark:
            self._pop_next()
        stale = self._stale
        while stale and stale[0][0] <= watermark:
            key = heapq.heappop(stale)[2]
            vs = self.versions.get(key)
            if vs is not None:
                self._prune(key, vs, watermark)

    def flush_all(self) -> None:
        """The input ended: join every waiting event (all updates are in)."""
        while self._heap:
            self._pop_next()

    def set_watermark(self, watermark: int | None) -> None:
        """Start at a restored watermark (nothing is joined: that happened before)."""
        self.watermark = watermark

    def _pop_next(self) -> None:
        time, _, key, value = heapq.heappop(self._heap)
        pending = self.pending
        left = pending[key] - 1
        if left:
            pending[key] = left
        else:
            del pending[key]
        self.dirty.add(key)
        self._emit(key, time, value, self._as_of(key, time))

    def _as_of(self, key: Hashable, time: int) -> Any:
        vs = self.versions.get(key)
        if not vs:
            return DELETED
        for i in range(len(vs) - 1, -1, -1):
            t = vs[i][0]
            if t is None or t <= time:
                return vs[i][2]
        return DELETED

    def _emit(self, key: Hashable, time: int | None, value: Any, row: Any) -> None:
        if row is DELETED:
            if self.how == "inner":
                return
            row = None
        self.results.append(Joined(key, value, row, time))

    def _prune(self, key: Hashable, vs: list[list[Any]], watermark: int) -> None:
        """Drop the versions a newer one at or below the watermark hides from now on."""
        keep = 0
        for i, v in enumerate(vs):
            if v[0] is None or v[0] <= watermark:
                keep = i
            else:
                break
        if keep:
            del vs[:keep]
            self.dirty.add(key)
        if len(vs) == 1 and vs[0][2] is DELETED and key not in self.pending:
            del self.versions[key]  # a lone deletion reads as no value: nothing to keep
            self.dirty.add(key)
        else:
            self._due(key, vs)

    def _due(self, key: Hashable, vs: list[list[Any]]) -> None:
        """Note when the key's versions can next be pruned (its second version's time)."""
        if len(vs) > 1:
            t = vs[1][0]
            heapq.heappush(self._stale, (-(2**63) if t is None else t, vs[1][1], key))
        elif vs and vs[0][2] is DELETED:
            t = vs[0][0]
            heapq.heappush(self._stale, (-(2**63) if t is None else t, vs[0][1], key))

    # -- state ----------------------------------------------------------------------
    def export(self) -> list[tuple[Hashable, list[Item] | None]]:
        """The keys changed since the last export and their items (``None``: nothing left)."""
        out: list[tuple[Hashable, list[Item] | None]] = []
        dirty, pending = self.dirty, self.pending
        waiting: dict[Hashable, list[Item]] = {}
        if any(key in pending for key in dirty):  # the heap is short: what ``wait`` holds
            for t, seq, key, value in self._heap:
                if key in dirty:
                    waiting.setdefault(key, []).append((0, t, seq, value))
        for key in dirty:
            items = sorted(waiting.get(key, ()), key=lambda i: (i[1], i[2]))
            items.extend((1, t, s, v) for t, s, v in self.versions.get(key, ()))
            out.append((key, items or None))
        self.dirty = set()
        return out

    def load(self, key: Hashable, items: list[Item]) -> None:
        """Restore a key's items (what ``export`` gave)."""
        for side, t, seq, value in items:
            if side == 0:
                assert t is not None
                self.pending[key] = self.pending.get(key, 0) + 1
                heapq.heappush(self._heap, (t, seq, key, value))
            else:
                self.versions.setdefault(key, []).append([t, seq, value])
        vs = self.versions.get(key)
        if vs:
            self._due(key, vs)

    @property
    def size(self) -> int:
        """Items held (versions and waiting events), for metrics."""
        return sum(map(len, self.versions.values())) + len(self._heap)
