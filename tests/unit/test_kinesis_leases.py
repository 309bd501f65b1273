"""Kinesis lease decisions with plain values: expiry, taking, balancing, lineage, settings."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.kinesis_leases import (
    ExpiryWatch,
    Lease,
    LeaseSettings,
    eligible_shards,
    fair_share,
    leases_to_take,
)
from adapters.kinesis_shards import SHARD_END, ShardInfo, ShardPlan, read_to_end
from adapters.kinesis_source import _advances
from asyncflow.errors import ConfigError


def table(owners: Sequence[str | None]) -> list[Lease]:
    return [Lease(f"s{i}", owner, 1) for i, owner in enumerate(owners)]


def take(
    rows: list[Lease], worker: str, expired: Collection[str] = (), steal: int = 1
) -> list[str]:
    return leases_to_take(
        rows,
        worker,
        expired=set(expired) | {r.shard_id for r in rows if r.owner is None},
        eligible=[r.shard_id for r in rows],
        max_leases_to_steal=steal,
    )


def test_a_lone_worker_takes_every_unowned_lease() -> None:
    assert take(table([None] * 4), "w1") == ["s0", "s1", "s2", "s3"]


def test_a_worker_takes_unowned_leases_only_up_to_its_fair_share() -> None:
    rows = table(["w1", None, None, None])
    assert take(rows, "w2") == ["s1", "s2"]  # 4 leases, 2 live workers: 2 each


def test_expired_leases_are_taken_before_any_steal() -> None:
    rows = table(["w1", "w1", "dead", "dead"])
    assert take(rows, "w2", expired={"s2", "s3"}) == ["s2", "s3"]


def test_a_worker_below_its_share_steals_from_the_most_loaded_worker_a_few_at_a_time() -> None:
    rows = table(["w1"] * 6 + ["w2"] * 2)
    assert take(rows, "w3", steal=1) == ["s0"]
    assert take(rows, "w3", steal=2) == ["s0", "s1"]
    assert take(rows, "w3", steal=0) == []


def test_balanced_workers_steal_nothing() -> None:
    rows = table(["w1", "w1", "w2", "w3"])  # 4 leases over 3 workers: 2, 1, 1
    assert take(rows, "w2") == take(rows, "w3") == take(rows, "w1") == []


def test_leases_of_shards_not_eligible_are_never_taken() -> None:
    rows = table([None, None])
    got = leases_to_take(rows, "w", expired={"s0", "s1"}, eligible=["s1"], max_leases_to_steal=1)
    assert got == ["s1"]


def test_fair_share_rounds_up() -> None:
    assert [fair_share(n, 3) for n in range(7)] == [0, 1, 1, 1, 2, 2, 2]


@settings(max_examples=200, deadline=None)
@given(
    leases=st.integers(min_value=0, max_value=24),
    workers=st.integers(min_value=1, max_value=6),
    steal=st.integers(min_value=1, max_value=3),
    order=st.randoms(use_true_random=False),
)
def test_workers_taking_in_any_order_end_balanced_with_one_owner_per_lease(
    leases: int, workers: int, steal: int, order: object
) -> None:
    # Conditional writes make each take atomic: the simulation applies them one by one.
    owners: list[str | None] = [None] * leases
    names = [f"w{i}" for i in range(workers)]
    for _ in range(4 * (leases + workers)):
        changed = False
        for worker in sorted(names, key=lambda _: order.random()):  # type: ignore[attr-defined]
            rows = table(owners)
            wanted = take(rows, worker, steal=steal)
            counts = {w: owners.count(w) for w in names}
            assert len(wanted) == len(set(wanted))
            assert all(owners[int(s[1:])] != worker for s in wanted)  # never its own
            if wanted:  # never beyond the share it computed from the live workers it sees
                live = len({o for o in owners if o is not None} | {worker})
                assert counts[worker] + len(wanted) <= fair_share(leases, live)
            for shard_id in wanted:
                owners[int(shard_id[1:])] = worker
                changed = True
        if not changed:
            break
    assert None not in owners  # every lease has an owner
    final = [owners.count(w) for w in names]
    assert max(final) <= fair_share(leases, workers)  # nobody above the fair share
    # stable: nobody wants anything more
    assert all(take(table(owners), w, steal=steal) == [] for w in names)


def test_a_lease_expires_only_after_its_counter_stood_still_for_the_duration() -> None:
    watch = ExpiryWatch(lease_duration=2.0)
    watch.observe([Lease("s0", "w1", 1)], now=0.0)
    assert not watch.is_expired(Lease("s0", "w1", 1), now=1.9)
    assert watch.is_expired(Lease("s0", "w1", 1), now=2.0)


def test_a_renewed_lease_starts_a_new_wait() -> None:
    watch = ExpiryWatch(lease_duration=2.0)
    watch.observe([Lease("s0", "w1", 1)], now=0.0)
    watch.observe([Lease("s0", "w1", 2)], now=1.5)
    assert not watch.is_expired(Lease("s0", "w1", 2), now=3.0)
    assert watch.is_expired(Lease("s0", "w1", 2), now=3.5)


def test_a_lease_first_seen_now_is_not_expired_however_old_it_is() -> None:
    watch = ExpiryWatch(lease_duration=2.0)
    watch.observe([Lease("s0", "w1", 7)], now=100.0)
    assert not watch.is_expired(Lease("s0", "w1", 7), now=101.0)
    assert not watch.is_expired(Lease("s1", "w1", 1), now=1000.0)  # never observed


def test_an_unowned_lease_is_always_free() -> None:
    assert ExpiryWatch(1.0).is_expired(Lease("s0", None, 3), now=0.0)


@settings(deadline=None)  # a loaded CI machine must not fail a pure check on time
@given(
    renewals=st.lists(st.floats(min_value=0.0, max_value=0.99), min_size=1, max_size=30),
)
def test_a_lease_renewed_more_often_than_its_duration_never_expires(renewals: list[float]) -> None:
    watch = ExpiryWatch(lease_duration=1.0)
    now, counter = 0.0, 0
    watch.observe([Lease("s0", "w1", counter)], now)
    for gap in renewals:
        now += gap
        assert not watch.is_expired(Lease("s0", "w1", counter), now)
        counter += 1
        watch.observe([Lease("s0", "w1", counter)], now)


def test_a_child_is_eligible_only_once_every_parent_is_finished() -> None:
    rows = {
        "a": Lease("a", None, 0),
        "b": Lease("b", None, 0),
        "ab": Lease("ab", None, 0, parents=("a", "b")),
    }
    assert eligible_shards(rows, ["a", "b", "ab"], finished=["a"]) == {"b"}
    assert eligible_shards(rows, ["a", "b", "ab"], finished=["a", "b"]) == {"ab"}
    assert eligible_shards(rows, ["ab"], finished=[]) == {"a", "b", "ab"}  # trimmed parents


def test_the_plan_releases_children_at_shard_end_not_at_the_end_of_reading() -> None:
    plan = ShardPlan("TRIM_HORIZON")
    plan.update([ShardInfo("p", (), "1", "9"), ShardInfo("c", ("p",), "10", None)])
    plan.mark_reading("p")
    plan.mark_delivered("p")
    assert plan.ready() == []
    plan.set_checkpoints({"p": SHARD_END})  # another worker finished it
    assert plan.ready() == ["c"]


def test_a_lost_shard_can_be_taken_again() -> None:
    plan = ShardPlan("TRIM_HORIZON")
    plan.update([ShardInfo("s", (), "1", None)])
    plan.mark_reading("s")
    assert plan.ready() == []
    plan.mark_released("s")
    assert plan.ready() == ["s"]


def test_an_open_shard_never_ends_while_it_has_a_next_iterator() -> None:
    info = ShardInfo("s", (), "1", None)
    for resp in ({"NextShardIterator": "i", "Records": []}, {"NextShardIterator": "i"}):
        assert not read_to_end(info, None, resp)
        assert not read_to_end(info, "10" * 28, resp)


def test_an_empty_answer_does_not_end_a_closed_shard_before_its_ending_sequence() -> None:
    ending = "49" + "5" * 54
    info = ShardInfo("s", (), "49" + "0" * 54, ending)
    empty = {"NextShardIterator": "i", "Records": [], "MillisBehindLatest": 0}
    assert not read_to_end(info, None, empty)
    assert not read_to_end(info, str(int(ending) - 1), empty)
    assert read_to_end(info, ending, empty)
    assert read_to_end(info, None, {"Records": [], "ChildShards": [{"ShardId": "c"}]})
    assert read_to_end(info, None, {"Records": []})  # no NextShardIterator: the end


def test_an_empty_closed_moto_shard_ends_at_once() -> None:
    assert read_to_end(ShardInfo("s", (), "0", "0"), None, {"NextShardIterator": "i"})


@settings(deadline=None)
@given(st.lists(st.one_of(st.integers(0, 10**6).map(str), st.just(SHARD_END)), max_size=30))
def test_checkpoints_written_only_when_they_advance_never_move_backwards(
    proposed: list[str],
) -> None:
    current: str | None = None
    written: list[str] = []
    for c in proposed:
        if _advances(current, c):
            written.append(c)
            current = c
    rank = [float("inf") if c == SHARD_END else int(c) for c in written]
    assert rank == sorted(rank) and len(set(rank)) == len(rank)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"lease_duration": 0.0}, "lease_duration"),
        ({"lease_duration": 1e9}, "lease_duration"),
        ({"renewal_interval": 10.0}, "lease_renewal_interval"),
        ({"renewal_interval": 0.0}, "lease_renewal_interval"),
        ({"max_leases_to_steal": -1}, "max_leases_to_steal"),
        ({"worker_id": ""}, "worker_id"),
        ({"worker_id": "x" * 300}, "worker_id"),
    ],
)
def test_lease_settings_out_of_range_give_one_line_naming_the_setting(
    kwargs: dict[str, object], setting: str
) -> None:
    options: dict[str, object] = {"lease_duration": 10.0, "worker_id": "w", **kwargs}
    with pytest.raises(ConfigError) as info:
        LeaseSettings(**options)  # type: ignore[arg-type]
    assert str(info.value).startswith(setting)
    assert "\n" not in str(info.value)


@settings(deadline=None)
@given(
    scans=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.booleans(), st.booleans()),
        min_size=1,
        max_size=40,
    ),
)
def test_a_lease_is_expired_exactly_when_its_owner_and_counter_stood_still_for_the_duration(
    scans: list[tuple[float, bool, bool]],
) -> None:
    # each scan: time since the last one, whether the counter moved, whether the owner changed
    watch = ExpiryWatch(lease_duration=2.0)
    now, counter, owner = 0.0, 0, "w1"
    since = 0.0  # when this worker first saw the lease as it is now
    watch.observe([Lease("s0", owner, counter)], now)
    for gap, moved, switched in scans:
        now += gap
        if moved or switched:
            counter += 1
            owner = "w2" if switched and owner == "w1" else ("w1" if switched else owner)
            since = now
        lease = Lease("s0", owner, counter)
        watch.observe([lease], now)
        assert watch.is_expired(lease, now) == (now - since >= 2.0)
        # a row that changed since the last scan is not expired: its wait starts now
        assert not watch.is_expired(Lease("s0", owner, counter + 1), now)
