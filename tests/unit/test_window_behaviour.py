"""Documented window behaviour (Flink's, unless said otherwise), one case per test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from asyncflow.windows import (
    Count,
    First,
    Hopping,
    Last,
    ProcessingHopping,
    ProcessingTumbling,
    Session,
    Sum,
    Tumbling,
    WindowOperator,
    fold,
    to_epoch_ms,
)

S = timedelta(seconds=1)


def windows(op: WindowOperator) -> list[tuple[Any, int, int, Any]]:
    out = [(r.key, r.start_ms, r.end_ms, r.value) for r in op.results]
    op.results.clear()
    return out


def test_tumbling_window_fires_when_watermark_reaches_its_end() -> None:
    op = WindowOperator(Tumbling(5 * S), Count())
    op.on_event("k", 1_000, None)
    op.on_event("k", 4_999, None)
    op.on_watermark(4_998, wall_ms=0)
    assert windows(op) == []
    op.on_watermark(4_999, wall_ms=0)  # the window's max timestamp: end - 1
    assert windows(op) == [("k", 0, 5_000, 2)]
    assert op.open_windows == 0


def test_watermark_is_frontier_minus_wait_like_flink_sql() -> None:
    op = WindowOperator(Tumbling(5 * S), Count(), wait=2 * S)
    op.on_event("k", 1_000, None)
    op.on_watermark(6_998, wall_ms=0)
    assert op.watermark == 4_998 and windows(op) == []
    op.on_watermark(6_999, wall_ms=0)  # WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
    assert windows(op) == [("k", 0, 5_000, 1)]


def test_event_exactly_wait_behind_at_a_window_max_timestamp_is_late() -> None:
    # With the SQL convention the watermark is frontier - wait (no extra -1 ms as in
    # DataStream's BoundedOutOfOrderness), so this event's window has fired and closed.
    op = WindowOperator(Tumbling(5 * S), Count(), wait=2 * S)
    op.on_watermark(6_999, wall_ms=0)
    assert op.on_event("k", 4_999, None) is False
    assert op.on_event("k", 5_000, None) is True


def test_with_allowed_lateness_a_late_event_refires_an_updated_result() -> None:
    op = WindowOperator(Tumbling(5 * S), Sum(), lateness=10 * S)
    op.on_event("k", 1_000, 1)
    op.on_watermark(5_000, wall_ms=0)
    [first] = op.results
    assert (first.value, first.final) == (1, True) and op.open_windows == 1  # fired, still open
    op.results.clear()
    assert op.on_event("k", 2_000, 10) is True  # late, but within the allowed lateness
    [update] = op.results
    assert (update.start_ms, update.end_ms, update.value, update.final) == (0, 5_000, 11, True)


def test_an_event_beyond_allowed_lateness_goes_to_late_output() -> None:
    op = WindowOperator(Tumbling(5 * S), Sum(), lateness=10 * S)
    op.on_event("k", 1_000, 1)
    op.on_watermark(5_000, wall_ms=0)  # fires; stays open for 10 s of lateness
    op.on_watermark(14_998, wall_ms=0)
    assert op.open_windows == 1
    op.on_watermark(14_999, wall_ms=0)  # 4_999 + 10_000: the window is purged
    assert op.open_windows == 0
    assert op.on_event("k", 2_000, 5) is False
    assert [(e.key, e.time_ms, e.value) for e in op.late] == [("k", 2_000, 5)]
    assert op.results == [op.results[0]] and op.open_windows == 0


def test_an_event_whose_window_is_late_on_arrival_is_late_even_if_never_opened() -> None:
    op = WindowOperator(Tumbling(5 * S), Count())
    op.on_watermark(20_000, wall_ms=0)
    assert op.on_event("new-key", 3_000, None) is False
    assert op.open_windows == 0


def test_session_windows_merge_when_a_bridging_event_arrives() -> None:
    op = WindowOperator(Session(3 * S), Sum(), wait=10 * S)
    op.on_event("u", 0, 1)
    op.on_event("u", 5_000, 10)
    assert op.open_windows == 2
    op.on_event("u", 2_500, 100)  # within 3 s of both sessions: they become one
    assert op.open_windows == 1
    op.flush_all()
    assert windows(op) == [("u", 0, 8_000, 111)]


def test_sessions_whose_windows_touch_merge_like_flink() -> None:
    # [0, 2000) and [2000, 4000) intersect in Flink's TimeWindow.intersects.
    op = WindowOperator(Session(2 * S), Count())
    op.on_event("u", 0, None)
    op.on_event("u", 2_000, None)
    op.on_event("u", 4_001, None)
    op.flush_all()
    assert windows(op) == [("u", 0, 4_000, 2), ("u", 4_001, 6_001, 1)]


def test_session_fires_when_watermark_passes_its_end_and_keys_are_separate() -> None:
    op = WindowOperator(Session(2 * S), Count())
    op.on_event("a", 0, None)
    op.on_event("b", 1_000, None)
    op.on_watermark(1_999, wall_ms=0)
    assert windows(op) == [("a", 0, 2_000, 1)]
    op.on_watermark(2_999, wall_ms=0)
    assert windows(op) == [("b", 1_000, 3_000, 1)]


def test_hopping_one_minute_every_ten_seconds_assigns_each_event_to_six_windows() -> None:
    op = WindowOperator(Hopping(60 * S, 10 * S), Count())
    op.on_event("k", 65_000, None)
    assert op.open_windows == 6
    op.flush_all()
    got = windows(op)
    assert [(s, e) for _, s, e, _ in got] == [
        (s, s + 60_000) for s in range(10_000, 70_000, 10_000)
    ]
    assert all(value == 1 for *_, value in got)


def test_a_hopping_event_joins_only_its_windows_that_are_not_late() -> None:
    op = WindowOperator(Hopping(30 * S, 10 * S), Count())
    op.on_watermark(25_000, wall_ms=0)  # [0, 10s) and [10s, 20s) are closed, [20s, 30s) is not
    assert op.on_event("k", 15_000, None) is True  # in [-10s,20s), [0,30s), [10s,40s)
    op.flush_all()
    assert [(s, e) for _, s, e, _ in windows(op)] == [(0, 30_000), (10_000, 40_000)]


def test_window_start_matches_flinks_formula_for_offsets_and_negative_times() -> None:
    assert Tumbling(5 * S).assign(-1) == [(-5_000, 0)]
    assert Tumbling(5 * S, offset=2 * S).assign(1_000) == [(-3_000, 2_000)]
    assert Tumbling(5 * S, offset=-3 * S).assign(1_000) == [(-3_000, 2_000)]
    assert Tumbling(timedelta(hours=1), offset=timedelta(minutes=15)).assign(0) == [
        (-2_700_000, 900_000)
    ]


def test_results_of_one_watermark_step_come_out_in_window_end_order() -> None:
    op = WindowOperator(Hopping(4 * S, 1 * S), Count(), wait=100 * S)
    for key, t in [("b", 9_000), ("a", 1_000), ("c", 5_500), ("a", 3_000)]:
        op.on_event(key, t, None)
    op.on_watermark(200_000, wall_ms=0)
    ends = [r.end_ms for r in op.results]
    assert ends == sorted(ends) and len(ends) == 14  # a's two events share two windows


def test_a_quiet_source_still_emits_with_the_system_time_wait() -> None:
    op = WindowOperator(Tumbling(5 * S), Count(), wait=1 * S, system_wait=10 * S)
    quiet = WindowOperator(Tumbling(5 * S), Count(), wait=1 * S)
    for o in (op, quiet):
        o.on_event("k", 3_000, None)
        o.on_watermark(3_000, wall_ms=100_000)  # the last event the source sends
    # The frontier stays at 3_000 while the wall clock moves on.
    for wall in range(100_000, 130_001, 1_000):
        op.on_watermark(3_000, wall_ms=wall)
        quiet.on_watermark(3_000, wall_ms=wall)
        if op.results:
            break
    # 10 s of quiet, then the watermark (2_000) runs with the clock until 4_999.
    assert wall == 100_000 + 10_000 + 2_999 + 1
    assert windows(op) == [("k", 0, 5_000, 1)]
    assert quiet.results == [] and quiet.watermark == 2_000


def test_the_system_time_wait_changes_nothing_while_events_keep_coming() -> None:
    op = WindowOperator(Tumbling(5 * S), Count(), wait=3 * S, system_wait=1 * S)
    for i, t in enumerate(range(0, 20_000, 500)):
        op.on_event("k", t, None)
        op.on_watermark(t, wall_ms=i * 500)  # the frontier moves every 0.5 s of wall time
        assert op.watermark == t - 3_000


def test_processing_time_windows_fire_on_the_wall_clock() -> None:
    op = WindowOperator(ProcessingTumbling(1 * S), Count())
    op.on_watermark(None, wall_ms=10_200)
    op.on_event("k", 10_200, None)
    op.on_event("k", 10_999, None)
    op.on_watermark(None, wall_ms=10_999)
    assert windows(op) == []
    op.on_watermark(None, wall_ms=11_000)
    assert windows(op) == [("k", 10_000, 11_000, 2)]


def test_processing_time_never_assigns_to_a_window_the_clock_has_left() -> None:
    op = WindowOperator(ProcessingHopping(2 * S, 1 * S), Count())
    op.on_watermark(None, wall_ms=5_000)
    op.on_event("k", 4_000, None)  # stale arrival time: counted at 5_000
    op.flush_all()
    assert [(s, e) for _, s, e, _ in windows(op)] == [(4_000, 6_000), (5_000, 7_000)]


def test_processing_time_windows_reject_event_time_settings() -> None:
    with pytest.raises(ValueError, match="event-time windows only"):
        WindowOperator(ProcessingTumbling(1 * S), Count(), lateness=1 * S)


def test_updates_mode_emits_after_every_event_plus_the_final_result() -> None:
    op = WindowOperator(Tumbling(5 * S), Sum(), emit="updates")
    op.on_event("k", 1_000, 1)
    op.on_event("k", 2_000, 2)
    op.on_watermark(5_000, wall_ms=0)
    assert [(r.value, r.final) for r in op.results] == [(1, False), (3, False), (3, True)]


def test_a_fired_window_stays_open_for_its_lateness_and_is_purged_once() -> None:
    op = WindowOperator(Tumbling(5 * S), Count(), lateness=5 * S)
    op.on_event("k", 1_000, None)
    op.on_watermark(4_999, wall_ms=0)
    assert windows(op) == [("k", 0, 5_000, 1)] and op.open_windows == 1
    op.on_event("k", 2_000, None)  # a late firing
    assert windows(op) == [("k", 0, 5_000, 2)]
    op.on_watermark(9_998, wall_ms=0)
    assert op.open_windows == 1
    op.on_watermark(9_999, wall_ms=0)  # purged without another result
    assert windows(op) == [] and op.open_windows == 0
    op.flush_all()
    assert windows(op) == []


def test_flush_all_fires_and_purges_every_open_window() -> None:
    op = WindowOperator(Session(1 * S), Count(), lateness=60 * S)
    op.on_event("a", 0, None)
    op.on_watermark(5_000, wall_ms=0)  # a fired, stays open for lateness
    op.on_event("b", 4_500, None)
    op.results.clear()
    op.export()
    op.flush_all()
    assert [r.key for r in op.results] == ["b"]  # a fired already: purged without a result
    assert sorted(op.export()) == [("a", None), ("b", None)]
    assert op.open_windows == 0
    assert op.on_event("a", 10**12, None) is False  # the input has ended


# -- state: export and load ---------------------------------------------------------


def test_export_lists_each_changed_key_once_with_its_open_windows() -> None:
    op = WindowOperator(Hopping(10 * S, 5 * S), Sum())
    op.on_event("a", 7_000, 1)  # in [0, 10 s) and [5 s, 15 s)
    op.on_event("a", 8_000, 2)
    op.on_event("b", 12_000, 10)  # in [5 s, 15 s) and [10 s, 20 s)
    exported = op.export()
    assert sorted(key for key, _ in exported) == ["a", "b"]  # each key once
    assert {key: sorted(ws) for key, ws in exported if ws is not None} == {
        "a": [[10_000, 3], [15_000, 3]],
        "b": [[15_000, 10], [20_000, 10]],
    }
    assert op.dirty == set() and op.export() == []  # nothing changed since
    op.on_event("b", 13_000, 5)
    assert [(key, sorted(ws or [])) for key, ws in op.export()] == [
        ("b", [[15_000, 15], [20_000, 15]])
    ]


def test_export_of_sessions_gives_start_end_and_accumulator() -> None:
    op = WindowOperator(Session(2 * S), Sum())
    op.on_event("u", 0, 1)
    op.on_event("u", 10_000, 2)
    op.on_event("v", 500, 4)
    assert sorted((key, sorted(ws or [])) for key, ws in op.export()) == [
        ("u", [[0, 2_000, 1], [10_000, 12_000, 2]]),
        ("v", [[500, 2_500, 4]]),
    ]
    op.on_event("u", 1_500, 8)  # extends the first session of u
    assert [(key, sorted(ws or [])) for key, ws in op.export()] == [
        ("u", [[0, 3_500, 9], [10_000, 12_000, 2]])
    ]


def test_a_purged_window_exports_a_tombstone() -> None:
    for assigner in (Tumbling(5 * S), Session(5 * S)):
        op = WindowOperator(assigner, Count(), lateness=5 * S)
        op.on_event("a", 1_000, None)
        op.on_event("b", 8_000, None)
        op.export()
        op.on_watermark(7_000, wall_ms=0)  # a's window fired but stays open: no change
        assert op.export() == []
        op.on_watermark(12_000, wall_ms=0)  # a's window is purged, b's still open
        assert op.export() == [("a", None)], assigner
        op.flush_all()
        assert op.export() == [("b", None)], assigner
        assert op.export() == []


def test_a_key_with_one_window_purged_and_one_open_exports_the_open_one() -> None:
    op = WindowOperator(Tumbling(5 * S), Count())
    op.on_event("k", 1_000, None)
    op.on_event("k", 6_000, None)
    op.export()
    op.on_watermark(5_000, wall_ms=0)
    assert op.export() == [("k", [[10_000, 1]])]


def test_load_puts_windows_back_to_go_on_where_they_were() -> None:
    for assigner in (Tumbling(5 * S), Session(5 * S)):
        old = WindowOperator(assigner, Sum())
        old.on_event("k", 1_000, 1)
        old.on_event("k", 2_000, 2)
        new = WindowOperator(assigner, Sum())
        for key, ws in orjson.loads(orjson.dumps(old.export())):
            new.load(key, ws)
        assert new.open_windows == old.open_windows == 1
        for op in (old, new):
            op.on_event("k", 3_000, 4)
            op.flush_all()
        assert windows(new) == windows(old), assigner
        assert new.results == [] and new.open_windows == 0


def test_load_after_the_restored_watermark_does_not_fire_a_window_again() -> None:
    for assigner in (Tumbling(5 * S), Session(4 * S)):
        old = WindowOperator(assigner, Sum(), lateness=10 * S)
        old.on_event("k", 1_000, 1)  # [0, 5 s) or the session [1 s, 5 s)
        old.on_event("k", 6_000, 10)  # [5 s, 10 s) or [6 s, 10 s)
        old.on_watermark(5_000, wall_ms=0)  # the first window fires; stays open for lateness
        assert [r.value for r in old.results] == [1]
        state = orjson.loads(orjson.dumps(old.export()))
        new = WindowOperator(assigner, Sum(), lateness=10 * S)
        new.on_watermark(5_000, wall_ms=0)  # the restored frontier first
        for key, ws in state:
            new.load(key, ws)
        assert new.open_windows == 2 and new.results == []
        new.on_watermark(9_998, wall_ms=0)
        assert windows(new) == []  # the fired window does not fire again
        new.on_watermark(9_999, wall_ms=0)  # the one that had not fired does
        assert [r.value for r in new.results] == [10]
        new.results.clear()
        assert new.on_event("k", 1_500, 100) is True  # late, within lateness: fires again
        assert [(r.value, r.final) for r in new.results] == [(101, True)], assigner
        new.results.clear()
        new.on_watermark(16_000, wall_ms=0)  # the first window is purged, without a result
        assert windows(new) == [] and new.open_windows == 1
        new.flush_all()
        assert windows(new) == [] and new.open_windows == 0


def test_a_restored_first_or_last_breaks_ties_by_arrival_across_the_restore() -> None:
    old = WindowOperator(Tumbling(5 * S), {"first": First(), "last": Last()})
    old.on_event("k", 1_000, "before")
    new = WindowOperator(Tumbling(5 * S), {"first": First(), "last": Last()})
    for key, ws in orjson.loads(orjson.dumps(old.export())):
        new.load(key, ws)
    new.on_event("k", 1_000, "after")  # the same event time: arrival order decides
    new.flush_all()
    assert windows(new) == [("k", 0, 5_000, {"first": "before", "last": "after"})]


def test_a_restored_first_or_last_session_merges_with_a_new_one() -> None:
    old = WindowOperator(Session(2 * S), {"first": First(), "last": Last()})
    old.on_event("k", 1_000, "a")  # [1 s, 3 s)
    new = WindowOperator(Session(2 * S), {"first": First(), "last": Last()})
    for key, ws in orjson.loads(orjson.dumps(old.export())):
        new.load(key, ws)
    new.on_event("k", 5_000, "c")  # [5 s, 7 s)
    new.on_event("k", 3_000, "b")  # bridges the restored session and the new one
    new.flush_all()
    assert windows(new) == [("k", 1_000, 7_000, {"first": "a", "last": "c"})]


def test_a_fold_without_merger_cannot_be_used_with_sessions() -> None:
    with pytest.raises(ValueError, match="merger"):
        WindowOperator(Session(1 * S), fold(list, lambda acc, v: [*acc, v]))


def test_bad_settings_are_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match='"final" or "updates"'):
        WindowOperator(Tumbling(1 * S), Count(), emit="eager")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Tumbling(timedelta(0))
    with pytest.raises(ValueError, match="whole number of milliseconds"):
        Tumbling(timedelta(microseconds=1500))
    with pytest.raises(TypeError, match="timedelta"):
        Tumbling(5)  # type: ignore[arg-type]


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="naive datetime .* time zone"):
        to_epoch_ms(datetime(2024, 3, 1, 12, 0))


def test_to_epoch_ms_accepts_aware_datetimes_and_epoch_seconds() -> None:
    assert to_epoch_ms(datetime(2024, 3, 1, 12, tzinfo=UTC)) == 1_709_294_400_000
    assert to_epoch_ms(1_709_294_400) == 1_709_294_400_000
    assert to_epoch_ms(1_709_294_400.123) == 1_709_294_400_123
    with pytest.raises(TypeError):
        to_epoch_ms("2024-03-01")  # type: ignore[arg-type]


def test_results_carry_utc_datetimes() -> None:
    op = WindowOperator(Tumbling(5 * S), Count())
    op.on_event("k", to_epoch_ms(datetime(2024, 3, 1, 12, 0, 3, tzinfo=UTC)), None)
    op.flush_all()
    [r] = op.results
    assert r.start == datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert r.end == datetime(2024, 3, 1, 12, 0, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "assigner",
    [Tumbling(timedelta(seconds=5)), Hopping(timedelta(seconds=10), timedelta(seconds=5)),
     Session(timedelta(seconds=2))],
    ids=["tumbling", "hopping", "session"],
)
def test_an_event_whose_aggregate_raises_leaves_no_window_behind(assigner: Any) -> None:
    def add(acc: int, v: Any) -> int:
        if v == "bad":
            raise ValueError("bad value")
        return acc + 1

    op = WindowOperator(assigner, fold(int, add, merger=lambda a, b: a + b))
    with pytest.raises(ValueError):
        op.on_event("x", 1_000, "bad")
    op.on_event("y", 1_000, "good")
    op.flush_all()
    assert {r.key for r in op.results} == {"y"}
    assert dict(op.export()).get("x") is None
