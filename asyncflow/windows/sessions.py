"""The session-window engine behind ``WindowOperator(Session(gap), ...)``.

Sessions merge like Flink's ``MergingWindowSet``: an event at ``t`` opens the
window ``[t, t + gap)``, which merges with every open session of its key that
it overlaps or touches (their accumulators with the aggregate's ``merge``,
). A merged window that is already past its max timestamp fires at once.
Watermarks, lateness, late firing and state export work as for the other
windows (see ``asyncflow.windows.operator``, whose
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

from heapq import heappop, heappush
from typing import Any

from asyncflow.windows._base import (
    LateEvent,
    WindowResult,
    _OperatorBase,
)
from asyncflow.windows.assigners import WindowAssigner


class _Session:
    __slots__ = ("acc", "alive", "end", "start")

    def __init__(self, start: int, end: int, acc: Any) -> None:
        self.start = start
        self.end = end
        self.acc = acc
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

    def on_event(self, key: Any, time_ms: int, value: Any) -> bool:
        wm = self._wm
        lo, hi = time_ms, time_ms + self._gap
        open_ = self._sessions.get(key)
        hits = [s for s in open_ if s.start <= hi and s.end >= lo] if open_ else []
        if not hits:
            # Open sessions are never late, so only a window that merges with none can be.
            if hi - 1 + self._lateness <= wm:
                self.late.append(LateEvent(key, time_ms, value))
                return False
            # the event is added first: nothing is stored if the aggregate raises
            session = _Session(lo, hi, self._add(self._create(), value, time_ms))
            if open_ is None:
                self._sessions[key] = [session]
            else:
                open_.append(session)
            self._schedule(key, session, wm)
            self.dirty.add(key)
            added = True
        else:
            assert open_ is not None
            added = False
            self.dirty.add(key)  # merged below even if the aggregate then raises
            if len(hits) > 1:
                hits.sort(key=lambda s: s.start)
            session = hits[0]
            old_end = session.end
            for other in hits[1:]:
                session.acc = self._merge(session.acc, other.acc)
                session.end = max(session.end, other.end)
                other.alive = False
                open_.remove(other)
            session.start = min(session.start, lo)
            session.end = max(session.end, hi)
            if session.end != old_end:
                self._schedule(key, session, wm)
        if not added:
            session.acc = self._add(session.acc, value, time_ms)
        end = session.end
        if self._updates or end - 1 <= wm:
            self.results.append(
                WindowResult(key, session.start, end, self._result(session.acc), end - 1 <= wm)
            )
        return True

    def _close(self, key: Any, session: _Session) -> None:
        self.dirty.add(key)
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
            self.results.append(WindowResult(key, session.start, end, result(session.acc), True))
            if end - 1 + lateness <= wm:
                self._close(key, session)
            else:
                heappush(purge, timer)
        while purge and purge[0][0] - 1 + lateness <= wm:
            end, _, key, session = heappop(purge)
            if not session.alive or session.end != end:
                continue
            self._close(key, session)

    def export(self) -> list[tuple[Any, list[list[Any]] | None]]:
        out: list[tuple[Any, list[list[Any]] | None]] = []
        sessions = self._sessions
        for key in self.dirty:
            open_ = sessions.get(key)
            out.append((key, [[x.start, x.end, x.acc] for x in open_] if open_ else None))
        self.dirty.clear()
        return out

    def load(self, key: Any, windows: list[list[Any]]) -> None:
        loaded = self.aggregate.loaded
        open_ = self._sessions.setdefault(key, [])
        for start, end, acc in windows:
            session = _Session(int(start), int(end), loaded(acc))
            open_.append(session)
            self._schedule(key, session, self._wm)
