"""The changelog tests of ``test_kafka_changelog`` that run on a broker, through librdkafka.

The same functions (imported, not copied) with the ``broker`` fixture of the librdkafka
client; the ones that stand in for aiokafka's clients stay there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from adapters.kafka import KafkaBroker
from tests.integration.kafka.broker import TEST_OPTIONS
from tests.integration.kafka.test_kafka_changelog import (
    test_a_record_is_readable_as_soon_as_append_returned,
    test_append_of_nothing_is_a_caller_error,
    test_append_of_values_that_are_not_bytes_raises_sink_error,
    test_append_returns_the_offset_of_its_last_record_and_offsets_increase,
    test_append_to_a_partition_the_changelog_lacks_raises_sink_error_naming_it,
    test_concurrent_appends_to_one_partition_each_land_contiguously,
    test_concurrent_reads_of_several_partitions_each_get_their_own_records,
    test_ensure_changelogs_creates_missing_topics_compacted_with_their_partition_count,
    test_ensure_changelogs_is_idempotent_and_leaves_existing_topics_alone,
    test_ensure_changelogs_refuses_a_policy_that_would_delete_state,
    test_ensure_changelogs_warns_when_an_existing_topic_has_fewer_partitions_than_asked,
    test_max_records_bounds_one_read,
    test_reading_a_partition_with_nothing_new_returns_nothing_after_the_timeout,
    test_reading_from_a_middle_offset_starts_there,
    test_reading_from_zero_returns_exactly_what_was_appended_in_order,
    test_the_kafka_broker_is_a_changelog_broker_and_its_source_knows_committed_positions,
    test_two_partitions_are_independent,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]

__all__ = [
    "test_a_record_is_readable_as_soon_as_append_returned",
    "test_append_of_nothing_is_a_caller_error",
    "test_append_of_values_that_are_not_bytes_raises_sink_error",
    "test_append_returns_the_offset_of_its_last_record_and_offsets_increase",
    "test_append_to_a_partition_the_changelog_lacks_raises_sink_error_naming_it",
    "test_concurrent_appends_to_one_partition_each_land_contiguously",
    "test_concurrent_reads_of_several_partitions_each_get_their_own_records",
    "test_ensure_changelogs_creates_missing_topics_compacted_with_their_partition_count",
    "test_ensure_changelogs_is_idempotent_and_leaves_existing_topics_alone",
    "test_ensure_changelogs_refuses_a_policy_that_would_delete_state",
    "test_ensure_changelogs_warns_when_an_existing_topic_has_fewer_partitions_than_asked",
    "test_max_records_bounds_one_read",
    "test_reading_a_partition_with_nothing_new_returns_nothing_after_the_timeout",
    "test_reading_from_a_middle_offset_starts_there",
    "test_reading_from_zero_returns_exactly_what_was_appended_in_order",
    "test_the_kafka_broker_is_a_changelog_broker_and_its_source_knows_committed_positions",
    "test_two_partitions_are_independent",
]


@pytest_asyncio.fixture
async def broker(kafka_url: str) -> AsyncIterator[KafkaBroker]:
    """The session broker through librdkafka."""
    b = KafkaBroker(kafka_url, {**TEST_OPTIONS, "client": "rdkafka"})
    try:
        yield b
    finally:
        await b.close()
