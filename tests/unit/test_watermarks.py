"""The event-time frontier across source partitions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from asyncflow.watermarks import PartitionWatermarks


def test_frontier_is_none_until_a_partition_has_an_event_time() -> None:
    wm = PartitionWatermarks(idle_timeout=None)
    assert wm.current(wall_ms=0) is None
    wm.assign("p0")
    wm.observe("p0", None, wall_ms=0)  # activity without event times
    assert wm.current(wall_ms=0) is None
    wm.observe("p0", 1_000, wall_ms=1)
    assert wm.current(wall_ms=1) == 1_000


def test_frontier_is_the_minimum_over_partitions() -> None:
    wm = PartitionWatermarks(idle_timeout=None)
    for p in ("p0", "p1", "p2"):
        wm.assign(p)
    wm.observe("p0", 5_000, wall_ms=0)
    wm.observe("p1", 3_000, wall_ms=0)
    wm.observe("p2", 9_000, wall_ms=0)
    assert wm.current(wall_ms=0) == 3_000
    wm.observe("p1", 2_000, wall_ms=0)  # an older batch does not lower a partition's max
    assert wm.current(wall_ms=0) == 3_000


def test_idle_partitions_do_not_stall_the_watermark() -> None:
    wm = PartitionWatermarks(idle_timeout=5.0)
    wm.assign("busy")
    wm.assign("quiet")
    wm.observe("busy", 1_000, wall_ms=0)
    wm.observe("quiet", 1_000, wall_ms=0)
    for wall in range(1_000, 5_001, 1_000):
        wm.observe("busy", 1_000 + wall, wall_ms=wall)
        assert wm.current(wall_ms=wall) == 1_000  # quiet for at most 5 s: still counted
    wm.observe("busy", 7_000, wall_ms=6_000)
    assert wm.current(wall_ms=6_000) == 7_000  # quiet for 6 s: idle, left out


def test_without_an_idle_timeout_a_quiet_partition_holds_the_watermark() -> None:
    wm = PartitionWatermarks(idle_timeout=None)
    wm.assign("busy")
    wm.assign("quiet")
    wm.observe("quiet", 1_000, wall_ms=0)
    wm.observe("busy", 99_000, wall_ms=3_600_000)
    assert wm.current(wall_ms=3_600_000) == 1_000


def test_an_idle_partition_takes_part_again_with_its_next_event() -> None:
    wm = PartitionWatermarks(idle_timeout=1.0)
    wm.assign("a")
    wm.assign("b")
    wm.observe("a", 10_000, wall_ms=0)
    wm.observe("b", 10_000, wall_ms=0)
    wm.observe("a", 50_000, wall_ms=2_000)
    assert wm.current(wall_ms=2_000) == 50_000
    wm.observe("b", 60_000, wall_ms=2_100)
    wm.observe("a", 70_000, wall_ms=2_100)
    assert wm.current(wall_ms=2_100) == 60_000


def test_the_frontier_never_goes_backwards() -> None:
    wm = PartitionWatermarks(idle_timeout=1.0)
    wm.assign("a")
    wm.assign("b")
    wm.observe("a", 10_000, wall_ms=0)
    wm.observe("b", 90_000, wall_ms=0)
    wm.observe("b", 95_000, wall_ms=5_000)
    assert wm.current(wall_ms=5_000) == 95_000  # a is idle
    wm.observe("a", 11_000, wall_ms=5_100)  # a wakes up far behind
    assert wm.current(wall_ms=5_100) == 95_000


def test_a_partition_assigned_but_not_read_holds_the_frontier_until_idle() -> None:
    wm = PartitionWatermarks(idle_timeout=2.0)
    wm.assign("read")
    wm.assign("backlog")
    wm.observe("read", 5_000, wall_ms=10_000)
    assert wm.current(wall_ms=10_000) is None  # backlog may still hold older events
    wm.observe("read", 6_000, wall_ms=12_000)
    assert wm.current(wall_ms=12_000) is None
    assert wm.current(wall_ms=12_001) == 6_000  # idle since it was first looked at


def test_when_every_partition_is_idle_the_frontier_is_what_was_read() -> None:
    wm = PartitionWatermarks(idle_timeout=1.0)
    wm.assign("empty")
    wm.assign("read")
    wm.observe("read", 5_000, wall_ms=0)
    assert wm.current(wall_ms=0) is None
    assert wm.current(wall_ms=1_001) == 5_000  # both idle: nothing older can be pending


def test_a_revoked_partition_no_longer_holds_the_frontier() -> None:
    wm = PartitionWatermarks(idle_timeout=None)
    wm.assign("kept")
    wm.assign("gone")
    wm.observe("kept", 8_000, wall_ms=0)
    wm.observe("gone", 1_000, wall_ms=0)
    assert wm.current(wall_ms=0) == 1_000
    wm.revoke("gone")
    assert wm.current(wall_ms=0) == 8_000
    wm.observe("gone", 500, wall_ms=1)  # a batch read before the revocation: ignored
    assert wm.partitions == ["kept"]
    assert wm.current(wall_ms=1) == 8_000


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 10_000), st.integers(0, 500)),
        max_size=80,
    ),
    st.sampled_from([None, 0.1, 1.0]),
)
def test_the_frontier_is_monotonic_and_never_ahead_of_an_active_partition(
    batches: list[tuple[str, int, int]], idle_timeout: float | None
) -> None:
    wm = PartitionWatermarks(idle_timeout=idle_timeout)
    for p in "abc":
        wm.assign(p)
    wall = 0
    last: int | None = None
    seen: dict[str, int] = {}
    for p, t, dt in batches:
        wall += dt
        wm.observe(p, t, wall_ms=wall)
        seen[p] = max(seen.get(p, t), t)
        now = wm.current(wall_ms=wall)
        if last is not None:
            assert now is not None and now >= last
        if idle_timeout is None and now is not None and (last is None or now > last):
            assert len(seen) == 3 and now == min(seen.values())
        last = now
