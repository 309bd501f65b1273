"""Property-based tests: the operator against a plain batch computation of the same events.

Random keyed event streams arrive with random out-of-orderness; the watermark
(frontier minus ``wait``) moves after every event. The batch computation
applies the lateness rule directly: an event joins each of its windows whose
``end - 1 + lateness`` is above the watermark at its arrival, and is late when it
joins none. From that it derives every result the operator must emit, in order.
Each event's value is its index, so Collect() shows exactly which events a window holds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.windows import (
    Collect,
    Count,
    Hopping,
    Max,
    Min,
    Session,
    Sum,
    Tumbling,
    WindowOperator,
)
from asyncflow.windows.assigners import MIN_TIME

Event = tuple[str, int]  # (key, time_ms); the value is the event's index
Window = tuple[str, int, int]  # (key, start_ms, end_ms)

AGGREGATE = {"n": Count(), "sum": Sum(), "min": Min(), "max": Max(), "ids": Collect()}


def summary(ids: list[int]) -> dict[str, Any]:
    return {"n": len(ids), "sum": sum(ids), "min": min(ids), "max": max(ids), "ids": list(ids)}


@st.composite
def event_streams(draw: st.DrawFn) -> list[Event]:
    """Times that move forward in random steps, each pulled back by a random delay."""
    n = draw(st.integers(min_value=0, max_value=60))
    keys = draw(st.lists(st.sampled_from("abc"), min_size=n, max_size=n))
    steps = draw(st.lists(st.integers(0, 700), min_size=n, max_size=n))
    delays = draw(st.lists(st.integers(0, 3_000), min_size=n, max_size=n))
    base = draw(st.integers(-10_000, 10_000))
    out = []
    for key, step, delay in zip(keys, steps, delays, strict=True):
        base += step
        out.append((key, base - delay))
    return out


@dataclass
class Run:
    """What the operator emitted, grouped for comparison."""

    emitted: dict[Window, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    purged: dict[Window, list[int]] = field(default_factory=dict)  # window -> hold ids
    late: list[int] = field(default_factory=list)


def hold_returning(handle: int) -> Callable[[], object]:
    return lambda: handle


def run_operator(op: WindowOperator, events: list[Event], wait: int) -> Run:
    run = Run()
    frontier: int | None = None

    def collect() -> None:
        for r in op.results:
            window = (r.key, r.start_ms, r.end_ms)
            run.emitted[window].append(r.value)
            if r.holds is not None:
                assert window not in run.purged
                run.purged[window] = sorted(cast(list[int], r.holds))
        for p in op.released:
            window = (p.key, p.start_ms, p.end_ms)
            assert window not in run.purged
            run.purged[window] = sorted(cast(list[int], p.holds))
        run.late.extend(late.value for late in op.late)
        op.results.clear()
        op.released.clear()
        op.late.clear()

    for i, (key, t) in enumerate(events):
        accepted = op.on_event(key, t, i, hold=hold_returning(i))
        assert accepted == (not op.late)
        collect()
        frontier = t if frontier is None else max(frontier, t)
        op.on_watermark(frontier, wall_ms=0)
        ends = [r.end_ms for r in op.results]
        assert ends == sorted(ends), "one watermark step emits in window-end order"
        collect()
    op.flush_all()
    collect()
    assert op.open_windows == 0
    return run


def aligned_windows(t: int, size: int, step: int, offset: int) -> list[tuple[int, int]]:
    """Every [s, s + size) with s = offset + k * step that contains t, by brute force."""
    k_low = (t - size - offset) // step - 1
    k_high = (t - offset) // step + 1
    starts = [offset + k * step for k in range(k_low, k_high + 1)]
    return [(s, s + size) for s in starts if s <= t < s + size]


def batch_aligned(
    events: list[Event], size: int, step: int, offset: int, wait: int, lateness: int, updates: bool
) -> Run:
    """Per window: the events that join it before it fires, and those that join after."""
    before: dict[Window, list[int]] = defaultdict(list)
    after: dict[Window, list[int]] = defaultdict(list)
    order: list[Window] = []
    expected = Run()
    wm = MIN_TIME
    frontier: int | None = None
    for i, (key, t) in enumerate(events):
        joined = False
        for start, end in aligned_windows(t, size, step, offset):
            if end - 1 + lateness > wm:
                window = (key, start, end)
                if window not in before and window not in after:
                    order.append(window)
                (after if end - 1 <= wm else before)[window].append(i)
                joined = True
        if not joined and (aligned_windows(t, size, step, offset) or t + lateness <= wm):
            expected.late.append(i)
        frontier = t if frontier is None else max(frontier, t)
        wm = max(wm, frontier - wait)
    for window in order:
        ids_before, ids_after = before[window], after[window]
        values = []
        if updates:
            values += [summary(ids_before[: j + 1]) for j in range(len(ids_before))]
        if ids_before:
            values.append(summary(ids_before))  # the firing at the watermark
        values += [summary(ids_before + ids_after[: j + 1]) for j in range(len(ids_after))]
        expected.emitted[window] = values
        expected.purged[window] = sorted(ids_before + ids_after)
    return expected


@settings(max_examples=300, deadline=None)
@given(
    events=event_streams(),
    size=st.integers(1, 4_000),
    wait=st.integers(0, 2_500),
    lateness=st.sampled_from([0, 0, 1, 500, 2_000]),
    offset=st.integers(-5_000, 5_000),
    updates=st.booleans(),
)
def test_tumbling_matches_batch_computation(
    events: list[Event], size: int, wait: int, lateness: int, offset: int, updates: bool
) -> None:
    op = WindowOperator(
        Tumbling(timedelta(milliseconds=size), offset=timedelta(milliseconds=offset)),
        AGGREGATE,
        wait=timedelta(milliseconds=wait),
        lateness=timedelta(milliseconds=lateness),
        emit="updates" if updates else "final",
    )
    got = run_operator(op, events, wait)
    want = batch_aligned(events, size, size, offset % size, wait, lateness, updates)
    assert got.late == want.late
    assert dict(got.emitted) == dict(want.emitted)
    assert got.purged == want.purged


@settings(max_examples=300, deadline=None)
@given(
    events=event_streams(),
    size=st.integers(1, 4_000),
    step=st.integers(1, 4_000),
    wait=st.integers(0, 2_500),
    lateness=st.sampled_from([0, 0, 1, 500, 2_000]),
    updates=st.booleans(),
)
def test_hopping_matches_batch_computation(
    events: list[Event], size: int, step: int, wait: int, lateness: int, updates: bool
) -> None:
    op = WindowOperator(
        Hopping(timedelta(milliseconds=size), timedelta(milliseconds=step)),
        AGGREGATE,
        wait=timedelta(milliseconds=wait),
        lateness=timedelta(milliseconds=lateness),
        emit="updates" if updates else "final",
    )
    got = run_operator(op, events, wait)
    want = batch_aligned(events, size, step, 0, wait, lateness, updates)
    assert got.late == want.late
    assert dict(got.emitted) == dict(want.emitted)
    assert got.purged == want.purged


def sessionize(items: list[tuple[int, int]], gap: int) -> list[tuple[int, int, list[int]]]:
    """Group (time, id) pairs into sessions: consecutive times at most ``gap`` apart."""
    out: list[tuple[int, int, list[int]]] = []
    for t, i in sorted(items):
        if out and t <= out[-1][1]:
            start, end, ids = out[-1]
            out[-1] = (start, max(end, t + gap), [*ids, i])
        else:
            out.append((t, t + gap, [i]))
    return out


def batch_sessions(events: list[Event], gap: int, wait: int, lateness: int) -> Run:
    """Sessions of the events still open; a session is purged once the watermark passes it."""
    open_: dict[str, list[tuple[int, int]]] = defaultdict(list)
    expected = Run()
    wm = MIN_TIME
    frontier: int | None = None

    def purge(until: int) -> None:
        for key, items in open_.items():
            keep = []
            for start, end, ids in sessionize(items, gap):
                if end - 1 + lateness <= until:
                    expected.purged[(key, start, end)] = sorted(ids)
                else:
                    keep += [(t, i) for t, i in items if i in ids]
            open_[key] = keep

    for i, (key, t) in enumerate(events):
        candidate = [*open_[key], (t, i)]
        _, end, _ = next(s for s in sessionize(candidate, gap) if i in s[2])
        if end - 1 + lateness <= wm:
            expected.late.append(i)
        else:
            open_[key].append((t, i))
        frontier = t if frontier is None else max(frontier, t)
        wm = max(wm, frontier - wait)
        purge(wm)
    purge(2**63)
    return expected


@settings(max_examples=300, deadline=None)
@given(
    events=event_streams(),
    gap=st.integers(1, 2_000),
    wait=st.integers(0, 2_500),
    lateness=st.sampled_from([0, 0, 1, 500, 2_000]),
    updates=st.booleans(),
)
def test_sessions_match_batch_computation(
    events: list[Event], gap: int, wait: int, lateness: int, updates: bool
) -> None:
    op = WindowOperator(
        Session(timedelta(milliseconds=gap)),
        AGGREGATE,
        wait=timedelta(milliseconds=wait),
        lateness=timedelta(milliseconds=lateness),
        emit="updates" if updates else "final",
    )
    got = run_operator(op, events, wait)
    want = batch_sessions(events, gap, wait, lateness)
    assert got.late == want.late
    assert got.purged == want.purged  # every session, with exactly its events' holds
    for window, ids in want.purged.items():
        last = got.emitted[window][-1]
        # After a merge Collect() lists the earlier session's values first, not arrival order.
        assert {**last, "ids": sorted(last["ids"])} == summary(ids), "the last result covers all"
    if not updates and lateness == 0:
        assert set(got.emitted) == set(want.purged)
        assert all(len(values) == 1 for values in got.emitted.values())
