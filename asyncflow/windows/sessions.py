"""The session-window engine behind ``WindowOperator(Session(gap), ...)``.

Sessions merge like Flink's ``MergingWindowSet``: an event at ``t`` opens the
window ``[t, t + gap)``, which merges with every open session of its key that
it overlaps or touches (their accumulators with the aggregate's ``merge``,
their holds with each other's). A merged window that is already past its max
timestamp fires at once. Watermarks, lateness, late firing and holds work as
for the other windows (see ``asyncflow.windows.operator``, whose
``WindowOperator`` is the entry point: it builds this engine for merging
assigners).

Example:
    >>> from datetime import timedelta
    >>> from asyncflow.windows import Session, Count, WindowOperator
    >>> op = WindowOperator(Session(timedelta(seconds=1)), Count())
    >>> for t in (0, 800, 5_000):  # 800 joins the session at 0; 5_000 starts another
    ...     _ = op.on_event("k", t, None)
    >>> op.open_windows
    2
    >>> op.on_watermark(1_799, wall_ms=0)
    >>> [(r.start_ms, r.end_ms, r.value) for r in op.results]
    [(0, 1800, 2)]
"""

from __future__ import annotations

from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

from asyncflow.windows._base import (
    HoldFn,
    LateEvent,
    PurgedWindow,
    WindowResult,
    _OperatorBase,
)
from asyncflow.windows.assigners import WindowAssigner


class _Session:
    __slots__ = ("acc", "alive", "end", "holds", "start")

    def __init__(self, start: int, end: int, acc: Any) -> None:
        self.start = start
        self.end = end
        self.acc = acc
        self.holds: list[object] | None = None
        self.alive = True


_Timer = tuple[int, int, Any, _Session]  # (end, tie-breaker, key, session)


class _SessionEngine(_OperatorBase):
    """Session windows: per key, a short list of open sessions; timers in heaps by end.

    The operator's session variant is this engine mixed into ``WindowOperator``
    (which brings ``on_watermark`` and ``flush_all``, both calling ``_advance``).
    """

    __slots__ = ("_fire", "_gap", "_merge", "_purge", "_seq", "_sessions")

    def __init__(self, assigner: WindowAssigner, *args: Any, **kwargs: Any) -> None:
        super().__init__(assigner, *args, **kwargs)
        self._gap = assigner.gap_ms
        self._merge = self.aggregate.merge
        self._sessions: dict[Any, list[_Session]] = {}
        self._fire: list[_Timer] = []
        self._purge: list[_Timer] = []
        self._seq = 0

    @property
    def open_windows(self) -> int:
        return sum(len(open_) for open_ in self._sessions.values())

    def _schedule(self, key: Any, session: _Session, wm: int) -> None:
        self._seq += 1
        timer = (session.end, self._seq, key, session)
        heappush(self._fire if session.end - 1 > wm else self._purge, timer)

    def on_event(self, key: Any, time_ms: int, value: Any, hold: HoldFn | None = None) -> bool:
        wm = self._wm
        lo, hi = time_ms, time_ms + self._gap
        open_ = self._sessions.get(key)
        hits = [s for s in open_ if s.start <= hi and s.end >= lo] if open_ else []
        if not hits:
            # Open sessions are never late, so only a window that merges with none can be.
            if hi - 1 + self._lateness <= wm:
                self.late.append(LateEvent(key, time_ms, value))
                return False
            session = _Session(lo, hi, self._create())
            if open_ is None:
                self._sessions[key] = [session]
            else:
                open_.append(session)
            self._schedule(key, session, wm)
        else:
            assert open_ is not None
            if len(hits) > 1:
                hits.sort(key=lambda s: s.start)
            session = hits[0]
            old_end = session.end
            for other in hits[1:]:
                session.acc = self._merge(session.acc, other.acc)
                if other.holds:
                    if session.holds is None:
                        session.holds = []
                    session.holds.extend(other.holds)
                session.end = max(session.end, other.end)
                other.alive = False
                open_.remove(other)
            session.start = min(session.start, lo)
            session.end = max(session.end, hi)
            if session.end != old_end:
                self._schedule(key, session, wm)
        session.acc = self._add(session.acc, value, time_ms)
        if hold is not None:
            handle = hold()
            if handle is not None:
                if session.holds is None:
                    session.holds = [handle]
                else:
                    session.holds.append(handle)
        end = session.end
        if self._updates or end - 1 <= wm:
            self.results.append(
                WindowResult(key, session.start, end, self._result(session.acc), end - 1 <= wm)
            )
        return True

    def _close(self, key: Any, session: _Session) -> None:
        session.alive = False
        open_ = self._sessions[key]
        open_.remove(session)
        if not open_:
            del self._sessions[key]

    def _advance(self, wm: int) -> None:
        fire, purge, lateness, result = self._fire, self._purge, self._lateness, self._result
        while fire and fire[0][0] - 1 <= wm:
            timer = heappop(fire)
            end, _, key, session = timer
            if not session.alive or session.end != end:
                continue  # superseded by a merge
            if end - 1 + lateness <= wm:
                holds = session.holds or []
                self.results.append(
                    WindowResult(key, session.start, end, result(session.acc), True, holds)
                )
                self._close(key, session)
            else:
                self.results.append(
                    WindowResult(key, session.start, end, result(session.acc), True, None)
                )
                heappush(purge, timer)
        while purge and purge[0][0] - 1 + lateness <= wm:
            end, _, key, session = heappop(purge)
            if not session.alive or session.end != end:
                continue
            self.released.append(PurgedWindow(key, session.start, end, session.holds or []))
            self._close(key, session)

    def drop_keys(self, predicate: Callable[[Any], bool]) -> list[object]:
        dropped: list[object] = []
        for key in [k for k in self._sessions if predicate(k)]:
            for session in self._sessions.pop(key):
                session.alive = False
                dropped.extend(session.holds or ())
        return dropped

    def drop_windows(self, predicate: Callable[[object], bool]) -> list[object]:
        dropped: list[object] = []
        for key, open_ in list(self._sessions.items()):
            for session in list(open_):
                if session.holds and all(predicate(h) for h in session.holds):
                    dropped.extend(session.holds)
                    self._close(key, session)
        return dropped
