"""The ack tracker: what is committable, with plain lists and no broker."""

from asyncflow.acks import AckGroup, AckTracker, PartitionAcks


def test_nothing_is_committable_before_the_first_record_is_done() -> None:
    acks = PartitionAcks("p")
    batch = acks.open([0, 1, 2], refs=1)
    batch.release(1)
    assert acks.done_position() is None


def test_committable_position_is_the_end_of_the_done_prefix() -> None:
    acks = PartitionAcks("p")
    b1 = acks.open([0, 1], refs=1)
    b2 = acks.open([2, 3], refs=1)
    for i in range(2):
        b2.release(i)
    b1.release(0)
    assert acks.done_position() == 0
    b1.release(1)
    assert acks.done_position() == 3


def test_offsets_with_gaps_commit_the_last_done_offset() -> None:
    acks = PartitionAcks("p")
    b = acks.open([10, 15, 40], refs=1)
    b.release(0)
    b.release(1)
    assert acks.done_position() == 15


def test_every_consuming_agent_must_finish_a_record() -> None:
    acks = PartitionAcks("p")
    b = acks.open([0], refs=2)
    b.release(0)
    assert acks.done_position() is None
    b.release(0)
    assert acks.done_position() == 0


def test_a_sink_reference_keeps_the_record_uncommitted_until_flushed() -> None:
    acks = PartitionAcks("p")
    b = acks.open([0], refs=1)
    b.retain(0)  # buffered by a sink
    b.release(0)  # the agent moved on
    assert acks.done_position() is None
    b.release(0)  # flushed
    assert acks.done_position() == 0


def test_window_holds_block_commit_but_not_draining() -> None:
    acks = PartitionAcks("p")
    b = acks.open([0, 1], refs=1)
    b.hold(0)
    b.release(0)
    b.release(1)
    assert acks.active == 0
    assert acks.done_position() is None
    group = AckGroup([(b, 0)])
    group.retain()
    group.release()
    assert acks.done_position() is None
    group.release()
    assert acks.done_position() == 1


def test_abandoned_records_drain_but_are_never_committed() -> None:
    acks = PartitionAcks("p")
    b = acks.open([0, 1], refs=1)
    b.release(0)
    b.abandon(1)
    assert acks.active == 0
    assert acks.done_position() == 0


def test_tracker_reports_only_positions_that_moved() -> None:
    t = AckTracker()
    b = t.partition("a").open([0, 1], refs=1)
    b.release(0)
    first = t.positions_to_commit()
    assert first == {"a": 0}
    t.mark_committed(first)
    assert t.positions_to_commit() == {}
    b.release(1)
    assert t.positions_to_commit() == {"a": 1}


async def test_drained_waits_for_processing_references() -> None:
    acks = PartitionAcks("p")
    b = acks.open([0], refs=1)
    assert not await acks.drained(0.01)
    b.release(0)
    assert await acks.drained(0.01)
