"""The join operators against a plain batch computation, under disorder and restarts.

Events arrive in a random order that stays within the watermark's bound
(``wait``): each one is at most ``wait`` older than the newest before it. The
operators must then find exactly the matches a batch computation over the
whole input finds, each once, also when they are rebuilt in the middle from
what their checkpoints exported (the restart a worker does from its store).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.codecs import Codec, JsonCodec
from asyncflow.joins.interval import IntervalJoinOperator
from asyncflow.joins.results import DELETED, Item, pack, unpack
from asyncflow.joins.temporal import TableJoinOperator

CODECS: tuple[Codec[Any], Codec[Any]] = (JsonCodec(), JsonCodec())
WAIT = 50

Event = tuple[int, str, int, int]  # side, key, time, id


@st.composite
def disordered(draw: Any, max_size: int = 60) -> list[Event]:
    """Events of two sides and a few keys, unique times, shuffled within the bound ``WAIT``."""
    n = draw(st.integers(0, max_size))
    times = draw(st.lists(st.integers(0, 2_000), min_size=n, max_size=n, unique=True))
    events = [
        (draw(st.integers(0, 1)), draw(st.sampled_from("abc")), t, i)
        for i, t in enumerate(sorted(times))
    ]
    # arrival: by time plus a jitter below the bound, so nothing is older than newest - WAIT
    jitter = [draw(st.integers(0, WAIT)) for _ in events]
    order = sorted(range(len(events)), key=lambda i: (events[i][2] + jitter[i], i))
    return [events[i] for i in order]


def checkpointed(store: dict[Hashable, bytes], op: Any) -> None:
    for key, items in op.export():
        if items is None:
            store.pop(key, None)
        else:
            store[key] = pack(items, CODECS)


def restored(store: dict[Hashable, bytes], op: Any, watermark: int | None) -> Any:
    for key, raw in store.items():
        op.load(key, unpack(raw, CODECS))
    op.set_watermark(watermark)
    return op


def run(
    events: list[Event], new: Any, restart_at: int | None, checkpoint_every: int = 7
) -> list[Any]:
    op = new()
    store: dict[Hashable, bytes] = {}
    # the last checkpoint: events it covers, the watermark, the results sent before it
    saved: tuple[int, int | None, int] = (0, None, 0)
    out: list[Any] = []
    newest: int | None = None
    i = 0
    restarted = False
    while i < len(events):
        side, key, t, ident = events[i]
        assert op.on_event(side, key, t, i, {"id": ident, "t": t}), "nothing is late here"
        newest = t if newest is None else max(newest, t)
        op.on_watermark(newest - WAIT)
        out.extend(op.results)
        op.results.clear()
        i += 1
        if i % checkpoint_every == 0:
            checkpointed(store, op)
            saved = (i, op.watermark, len(out))
        if restart_at is not None and not restarted and i == restart_at:
            restarted = True  # a crash: back to the last checkpoint, replay what it lacks
            i, wm, sent = saved
            del out[sent:]  # what was found after the checkpoint is found again
            op = restored(store, new(), wm)
            newest = max((e[2] for e in events[:i]), default=None)
    op.flush_all()
    out.extend(op.results)
    return out


def batch_interval(events: list[Event], lower: int, upper: int) -> list[tuple[int, int]]:
    lefts = [e for e in events if e[0] == 0]
    rights = [e for e in events if e[0] == 1]
    return sorted(
        (a[3], b[3])
        for a in lefts
        for b in rights
        if a[1] == b[1] and a[2] + lower <= b[2] <= a[2] + upper
    )


def batch_as_of(events: list[Event], how: str) -> list[tuple[int, int | None]]:
    updates = [e for e in events if e[0] == 1]
    out: list[tuple[int, int | None]] = []
    for s in (e for e in events if e[0] == 0):
        seen = [u for u in updates if u[1] == s[1] and u[2] <= s[2]]
        row = max(seen, key=lambda u: u[2])[3] if seen else None
        if row is not None or how == "left":
            out.append((s[3], row))
    return sorted(out)


@settings(max_examples=120, deadline=None)
@given(
    events=disordered(),
    lower=st.integers(-300, 300),
    width=st.integers(0, 400),
    restart=st.one_of(st.none(), st.integers(1, 60)),
)
def test_interval_join_finds_the_batch_pairs_once_under_disorder_and_a_restart(
    events: list[Event], lower: int, width: int, restart: int | None
) -> None:
    upper = lower + width
    got = run(events, lambda: IntervalJoinOperator(lower=lower, upper=upper), restart)
    assert sorted((j.left["id"], j.right["id"]) for j in got) == batch_interval(
        events, lower, upper
    )


@settings(max_examples=120, deadline=None)
@given(
    events=disordered(),
    how=st.sampled_from(["inner", "left"]),
    restart=st.one_of(st.none(), st.integers(1, 60)),
)
def test_table_join_as_of_event_time_equals_the_batch_as_of_join(
    events: list[Event], how: Any, restart: int | None
) -> None:
    got = run(events, lambda: TableJoinOperator(how=how), restart)
    pairs = sorted((j.left["id"], None if j.right is None else j.right["id"]) for j in got)
    assert pairs == batch_as_of(events, how)


def test_an_interval_join_matches_on_both_bounds_inclusive() -> None:
    op = IntervalJoinOperator(lower=-10, upper=10)
    op.on_event(0, "k", 100, 0, "a")
    for seq, t in enumerate([89, 90, 110, 111], start=1):
        op.on_event(1, "k", t, seq, t)
    assert [j.right for j in op.results] == [90, 110]


def test_an_interval_join_forgets_what_the_watermark_passed() -> None:
    op = IntervalJoinOperator(lower=0, upper=100)
    op.on_event(0, "k", 1_000, 0, "a")
    op.on_event(1, "k", 1_050, 1, "b")
    op.on_watermark(1_050)  # a may still meet a b up to 1_100; b an a at 1_050
    assert op.size == 2
    op.on_watermark(1_101)
    assert op.size == 0 and not op.sides[0] and not op.sides[1]
    assert op.on_event(1, "k", 1_099, 2, "late") is False


def test_a_late_stream_event_is_refused_by_the_table_join_and_a_late_update_still_applies() -> None:
    op = TableJoinOperator(how="left")
    op.on_event(1, "d", 0, 0, "v0")
    op.on_watermark(1_000)
    assert op.on_event(0, "d", 999, 1, "ride") is False
    op.on_event(1, "d", 500, 2, "v1")  # late, but newer than v0: what later rides see
    op.on_event(0, "d", 1_200, 3, "ride2")
    op.on_watermark(2_000)
    assert [(j.left, j.right) for j in op.results] == [("ride2", "v1")]
    assert op.late_updates == 1


def test_old_versions_are_dropped_once_a_newer_one_is_below_the_watermark() -> None:
    op = TableJoinOperator()
    for seq, t in enumerate([10, 20, 30, 40]):
        op.on_event(1, "d", t, seq, f"v{t}")
    op.on_watermark(35)
    assert [v[2] for v in op.versions["d"]] == ["v30", "v40"]


def test_a_deleted_row_drops_inner_matches_and_gives_none_to_left_ones() -> None:
    for how, expected in (("inner", []), ("left", [("r", None)])):
        op = TableJoinOperator(how=how, deleted=lambda v: v.get("gone", False))  # type: ignore[arg-type]
        op.on_event(1, "d", 0, 0, {"name": "Ann"})
        op.on_event(1, "d", 5, 1, {"gone": True})
        op.on_event(0, "d", 10, 2, "r")
        op.flush_all()
        assert [(j.left, j.right) for j in op.results] == expected
    assert op.versions["d"][-1][2] is DELETED


def test_latest_joins_at_once_and_ignores_an_update_older_than_the_current_value() -> None:
    op = TableJoinOperator(how="left", as_of="latest")
    op.on_event(1, "d", 100, 0, "new")
    op.on_event(1, "d", 50, 1, "old")  # read later, but older: superseded
    op.on_event(0, "d", 10, 2, "ride")  # no waiting, not late
    assert [(j.left, j.right) for j in op.results] == [("ride", "new")]


def test_pack_keeps_times_sequence_and_values() -> None:
    items: list[Item] = [(0, 5, 1, {"a": 1}), (1, None, 2, [1, 2]), (1, -7, 3, DELETED)]
    assert unpack(pack(items, CODECS), CODECS) == items


@pytest.mark.parametrize("lower,upper", [(10, 5)])
def test_an_interval_with_lower_above_upper_is_refused(lower: int, upper: int) -> None:
    with pytest.raises(ValueError, match="lower <= upper"):
        IntervalJoinOperator(lower=lower, upper=upper)
