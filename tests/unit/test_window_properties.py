"""Property-based tests: the operator against a plain batch computation of the same events.

Random keyed event streams arrive with random out-of-orderness; the watermark
(frontier minus ``wait``) moves after every event. The batch computation
applies the lateness rule directly: an event joins each of its windows whose
``end - 1 + lateness`` is above the watermark at its arrival, and is late when it
joins none. From that it derives every result the operator must emit, in order,
and the windows open after every step (which ``export`` must report).
Each event's value is its index, so Collect() shows exactly which events a window holds.

The last test stops an operator at a random point, rebuilds another one from
what it exported and checks that both go on to give the same results.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.windows import (
    Collect,
    Count,
    First,
    Hopping,
    Last,
    Max,
    Min,
    Session,
    Sum,
    Tumbling,
    WindowOperator,
)
from asyncflow.windows.assigners import MIN_TIME, WindowAssigner

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


State = dict[Window, dict[str, Any]]  # the open windows after a step, with their values


@dataclass
class Run:
    """What the operator emitted, grouped for comparison."""

    emitted: dict[Window, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    late: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # open windows after each event's step
    states: dict[int, State] = field(default_factory=dict)  # step -> the open windows then


Saved = dict[Any, list[list[Any]]]  # what a checkpoint holds: key -> its open windows


def checkpoint(op: WindowOperator, saved: Saved) -> None:
    """Apply ``op.export()``, through JSON as a checkpoint stores it, to ``saved``."""
    for key, windows in orjson.loads(orjson.dumps(op.export())):
        if windows is None:
            saved.pop(key, None)  # also a key opened and purged since the last one
        else:
            saved[key] = windows
    assert op.dirty == set()


def state_of(op: WindowOperator, saved: Saved) -> State:
    """The windows in ``saved`` as (key, start, end) -> value; ids sorted for sessions."""
    out: State = {}
    result = op.aggregate.result
    for key, windows in saved.items():
        for w in windows:
            if op.assigner.is_merging:
                start, end, acc = w
                value = result(acc)
                value["ids"] = sorted(value["ids"])
            else:
                end, acc = w
                start, value = end - op.assigner.size_ms, result(acc)
            out[(key, start, end)] = value
    return out


def run_operator(op: WindowOperator, events: list[Event], wait: int, every_step: bool) -> Run:
    """Feed ``events`` with a watermark step and a checkpoint after each one.

    The checkpointed windows (exports applied in turn) are recorded after each
    step with ``every_step``, else after the last one (their count after each).
    """
    run = Run()
    frontier: int | None = None
    saved: Saved = {}

    def collect() -> None:
        for r in op.results:
            run.emitted[(r.key, r.start_ms, r.end_ms)].append(r.value)
        run.late.extend(late.value for late in op.late)
        op.results.clear()
        op.late.clear()

    for i, (key, t) in enumerate(events):
        accepted = op.on_event(key, t, i)
        assert accepted == (not op.late)
        collect()
        frontier = t if frontier is None else max(frontier, t)
        op.on_watermark(frontier, wall_ms=0)
        ends = [r.end_ms for r in op.results]
        assert ends == sorted(ends), "one watermark step emits in window-end order"
        collect()
        checkpoint(op, saved)
        run.sizes.append(sum(len(windows) for windows in saved.values()))
        assert op.open_windows == run.sizes[-1], "what was exported is what is open"
        if every_step or i == len(events) - 1:
            run.states[i] = state_of(op, saved)
    op.flush_all()
    collect()
    assert op.open_windows == 0
    checkpoint(op, saved)
    assert saved == {}, "every key's last window exported a tombstone"
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
    open_: dict[Window, list[int]] = {}  # the windows not purged yet, with their events
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
                open_.setdefault(window, []).append(i)
                joined = True
        if not joined and (aligned_windows(t, size, step, offset) or t + lateness <= wm):
            expected.late.append(i)
        frontier = t if frontier is None else max(frontier, t)
        wm = max(wm, frontier - wait)
        open_ = {w: ids for w, ids in open_.items() if w[2] - 1 + lateness > wm}
        expected.sizes.append(len(open_))
        if i == len(events) - 1:
            expected.states[i] = {w: summary(ids) for w, ids in open_.items()}
    for window in order:
        ids_before, ids_after = before[window], after[window]
        values = []
        if updates:
            values += [summary(ids_before[: j + 1]) for j in range(len(ids_before))]
        if ids_before:
            values.append(summary(ids_before))  # the firing at the watermark
        values += [summary(ids_before + ids_after[: j + 1]) for j in range(len(ids_after))]
        expected.emitted[window] = values
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
    got = run_operator(op, events, wait, every_step=False)
    want = batch_aligned(events, size, size, offset % size, wait, lateness, updates)
    assert got.late == want.late
    assert dict(got.emitted) == dict(want.emitted)
    assert got.sizes == want.sizes  # after every step: the windows not purged yet
    assert got.states == want.states  # after the last: those windows with their events


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
    got = run_operator(op, events, wait, every_step=False)
    want = batch_aligned(events, size, step, 0, wait, lateness, updates)
    assert got.late == want.late
    assert dict(got.emitted) == dict(want.emitted)
    assert got.sizes == want.sizes  # after every step: the windows not purged yet
    assert got.states == want.states  # after the last: those windows with their events


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


@dataclass
class Sessions(Run):
    """The batch computation of sessions: also every session with its events, once closed."""

    closed: dict[Window, list[int]] = field(default_factory=dict)


def batch_sessions(events: list[Event], gap: int, wait: int, lateness: int) -> Sessions:
    """Sessions of the events still open; a session is purged once the watermark passes it."""
    open_: dict[str, list[tuple[int, int]]] = defaultdict(list)
    expected = Sessions()
    wm = MIN_TIME
    frontier: int | None = None

    def purge(until: int) -> None:
        for key, items in open_.items():
            keep = []
            for start, end, ids in sessionize(items, gap):
                if end - 1 + lateness <= until:
                    expected.closed[(key, start, end)] = sorted(ids)
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
        expected.states[i] = {
            (k, start, end): summary(sorted(ids))
            for k, items in open_.items()
            for start, end, ids in sessionize(items, gap)
        }
        expected.sizes.append(len(expected.states[i]))
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
    got = run_operator(op, events, wait, every_step=True)
    want = batch_sessions(events, gap, wait, lateness)
    assert got.late == want.late
    assert got.sizes == want.sizes
    assert got.states == want.states  # after every step: the open sessions, with their events
    for window, ids in want.closed.items():
        last = got.emitted[window][-1]
        # After a merge Collect() lists the earlier session's values first, not arrival order.
        assert {**last, "ids": sorted(last["ids"])} == summary(ids), "the last result covers all"
    if not updates and lateness == 0:
        assert set(got.emitted) == set(want.closed)
        assert all(len(values) == 1 for values in got.emitted.values())


# -- state: an operator rebuilt from what another exported -------------------------------


def fresh_aggregate() -> dict[str, Any]:
    """New instances each time: First/Last number arrivals, and a rebuilt operator has its own."""
    return {**AGGREGATE, "first": First(), "last": Last()}


def assigner_of(kind: str, size: int, step: int) -> WindowAssigner:
    ms = timedelta(milliseconds=1)
    if kind == "tumbling":
        return Tumbling(size * ms)
    if kind == "hopping":
        return Hopping(size * ms, step * ms)
    return Session(size * ms)


Emitted = Counter[tuple[str, int, int, bool, bytes]]


def drain(op: WindowOperator, emitted: Emitted, late: list[int]) -> None:
    for r in op.results:
        emitted[(r.key, r.start_ms, r.end_ms, r.final, orjson.dumps(r.value))] += 1
    late.extend(e.value for e in op.late)
    op.results.clear()
    op.late.clear()


@pytest.mark.parametrize("kind", ["tumbling", "hopping", "session"])
@settings(max_examples=200, deadline=None)
@given(
    events=event_streams(),
    split=st.integers(0, 60),
    checkpoints=st.sets(st.integers(0, 60), max_size=8),
    size=st.integers(1, 3_000),
    step=st.integers(1, 3_000),
    wait=st.integers(0, 2_500),
    lateness=st.sampled_from([0, 0, 1, 500, 2_000]),
    updates=st.booleans(),
)
def test_an_operator_rebuilt_from_export_gives_the_same_results_as_one_that_never_stopped(
    kind: str,
    events: list[Event],
    split: int,
    checkpoints: set[int],
    size: int,
    step: int,
    wait: int,
    lateness: int,
    updates: bool,
) -> None:
    assigner = assigner_of(kind, size, step)

    def operator() -> WindowOperator:
        return WindowOperator(
            assigner,
            fresh_aggregate(),
            wait=timedelta(milliseconds=wait),
            lateness=timedelta(milliseconds=lateness),
            emit="updates" if updates else "final",
        )

    split = min(split, len(events))
    a = operator()
    saved: Saved = {}  # the checkpoints so far: each key's open windows
    frontier: int | None = None
    for i, (key, t) in enumerate(events[:split]):
        if i in checkpoints:
            checkpoint(a, saved)
        a.on_event(key, t, i)
        frontier = t if frontier is None else max(frontier, t)
        a.on_watermark(frontier, wall_ms=0)
    checkpoint(a, saved)  # the last checkpoint before the stop
    a.results.clear()
    a.late.clear()

    b = operator()
    b.on_watermark(frontier, wall_ms=0)  # the restored frontier, then the restored windows
    for key, windows in saved.items():
        b.load(key, windows)
    assert b.results == [] and b.late == []
    assert b.open_windows == a.open_windows
    assert b.watermark == a.watermark

    got: dict[str, tuple[Emitted, list[int]]] = {}
    for name, op in (("never stopped", a), ("rebuilt", b)):
        emitted: Emitted = Counter()
        late: list[int] = []
        at = frontier
        for i, (key, t) in enumerate(events[split:], start=split):
            op.on_event(key, t, i)
            drain(op, emitted, late)
            at = t if at is None else max(at, t)
            op.on_watermark(at, wall_ms=0)
            drain(op, emitted, late)
        op.flush_all()
        drain(op, emitted, late)
        assert op.open_windows == 0
        got[name] = (emitted, late)
    assert got["rebuilt"] == got["never stopped"]
