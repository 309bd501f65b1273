"""Ready-made aggregates, fields, factories and composition."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncflow.windows import (
    Collect,
    Count,
    First,
    Last,
    Max,
    Mean,
    Min,
    Sum,
    fold,
    reduce,
)
from asyncflow.windows.aggregates import Aggregate, as_aggregate


@dataclass
class Reading:
    id: str
    value: float


def run(agg: Aggregate[Any, Any], items: list[tuple[int, Any]]) -> Any:
    acc = agg.create()
    for t, v in items:
        acc = agg.add(acc, v, t)
    return agg.result(acc)


def test_field_reads_dict_keys_and_object_attributes_alike() -> None:
    items = [(0, {"value": 1.0}), (1, Reading("a", 3.0)), (2, {"value": 5.0})]
    assert run(Mean("value"), items) == 3.0  # dict, object, dict again
    assert run(Collect("id"), [(0, Reading("x", 0)), (1, {"id": "y"})]) == ["x", "y"]
    assert run(Sum(lambda r: r["value"] if isinstance(r, dict) else r.value), items) == 9.0


def test_a_missing_field_raises() -> None:
    with pytest.raises(KeyError):
        run(Sum("nope"), [(0, {"value": 1})])
    with pytest.raises(AttributeError):
        run(Sum("nope"), [(0, Reading("a", 1.0))])


def test_none_values_are_skipped_like_sql_but_counted_by_count() -> None:
    items: list[tuple[int, Any]] = [(0, 2), (1, None), (2, 4)]
    assert run(Count(), items) == 3
    assert run(Sum(), items) == 6
    assert run(Mean(), items) == 3
    assert (run(Min(), items), run(Max(), items)) == (2, 4)
    assert run(Mean(), [(0, None)]) is None and run(Min(), [(0, None)]) is None


def test_first_and_last_go_by_event_time_with_ties_in_arrival_order() -> None:
    items = [(5, "b"), (2, "a1"), (9, "z1"), (2, "a2"), (9, "z2"), (7, "m")]
    assert run(First(), items) == "a1"
    assert run(Last(), items) == "z2"


def test_first_and_last_keep_arrival_order_ties_across_a_merge() -> None:
    for agg, want in ((First(), "early"), (Last(), "late")):
        a = agg.add(agg.create(), "early", 10)
        b = agg.add(agg.create(), "late", 10)
        assert agg.result(agg.merge(a, b)) == want
        assert agg.result(agg.merge(b, a)) == want


def test_collect_lists_values_in_arrival_order_and_results_are_snapshots() -> None:
    agg = Collect("id")
    acc = agg.add(agg.create(), Reading("x", 0), 9)
    first = agg.result(acc)
    acc = agg.add(acc, Reading("y", 0), 1)
    assert (first, agg.result(acc)) == (["x"], ["x", "y"])


def test_fold_and_reduce() -> None:
    assert run(fold(lambda: 0, lambda acc, v: acc * 10 + v), [(0, 1), (1, 2), (2, 3)]) == 123
    assert run(reduce(max), [(0, 3), (1, 7), (2, 5)]) == 7
    r = reduce(lambda a, b: a + b)
    assert r.result(r.merge(r.add(r.create(), "x", 0), r.create())) == "x"
    assert r.result(r.create()) is None
    assert not fold(list, lambda a, v: a).mergeable


def test_a_dict_of_aggregates_is_one_aggregate_with_a_dict_result() -> None:
    agg = as_aggregate({"avg": Mean("value"), "n": Count(), "hi": Max("value")})
    items = [(0, {"value": 1.0}), (1, {"value": 5.0})]
    assert run(agg, items) == {"avg": 3.0, "n": 2, "hi": 5.0}
    merged = agg.merge(agg.add(agg.create(), {"value": 9.0}, 0), agg.create())
    assert agg.result(merged) == {"avg": 9.0, "n": 1, "hi": 9.0}


def test_bad_aggregate_specs_are_rejected() -> None:
    with pytest.raises(TypeError, match="aggregate must be"):
        as_aggregate("mean")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="field must be"):
        Sum(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        as_aggregate({})


values = st.lists(st.integers(-1000, 1000), min_size=1, max_size=30)


@given(values, values)
def test_merging_two_accumulators_equals_aggregating_all_values(a: list[int], b: list[int]) -> None:
    aggs: list[Aggregate[Any, Any]] = [Count(), Sum(), Mean(), Min(), Max(), Collect()]
    for agg in aggs:
        acc_a = agg.create()
        for v in a:
            acc_a = agg.add(acc_a, v, 0)
        acc_b = agg.create()
        for v in b:
            acc_b = agg.add(acc_b, v, 0)
        whole = run(agg, [(0, v) for v in a + b])
        merged = agg.result(agg.merge(acc_a, acc_b))
        if isinstance(whole, float):
            assert math.isclose(merged, whole)
        else:
            assert merged == whole
