"""Fetched Kafka records handed over as aiokafka decoded them, not copied once more.

aiokafka decodes a fetched batch into one C record per message (offset, key,
value, timestamp, headers: all a ``RawRecord`` needs), then copies each into
a ``ConsumerRecord`` dataclass of eleven fields (topic and partition again,
the key's and the value's sizes, the headers as a new tuple) before
``getmany`` returns it. The source knows the topic and partition of every
batch already, so that copy is pure cost: measured at 14-17% of a Kafka
worker's time, 27% of a hand-written aiokafka loop's.

``hand_over_decoded_records`` makes one consumer skip the copy. It hooks the
one step aiokafka takes per record (``PartitionRecords._consumer_record``) on
that consumer's own fetch buffers only, nothing global: how batches are
read, validated, filtered for aborted transactions and control batches, and
how positions advance stays aiokafka's. Where the consumer does not look as
expected (another aiokafka, deserializers set), nothing changes and the
consumer keeps returning ``ConsumerRecord`` s, which serve as well.

Example:
    >>> hand_over_decoded_records(object())  # not a started aiokafka consumer: left alone
    False
"""

from __future__ import annotations

import collections
import logging
from typing import Any

log = logging.getLogger("asyncflow.kafka")


def _as_decoded(tp: Any, record: Any) -> Any:
    """Stands in for ``PartitionRecords._consumer_record``: the decoded record itself."""
    return record


class _DecodedRecordBuffer(collections.OrderedDict[Any, Any]):
    """A fetcher's per-partition buffer that sets up each fetched batch to skip the copy."""

    def __setitem__(self, tp: Any, result: Any) -> None:
        records = getattr(result, "_partition_records", None)
        if records is not None:  # a FetchResult (a FetchError carries no records)
            records._consumer_record = _as_decoded
        super().__setitem__(tp, result)


def hand_over_decoded_records(consumer: Any) -> bool:
    """Make a started consumer's ``getmany`` return aiokafka's decoded records; whether it does.

    Call it after ``start()`` and before the consumer is assigned partitions.
    The records returned have ``offset``, ``key``, ``value`` (bytes),
    ``timestamp`` (epoch ms), ``timestamp_type`` and ``headers`` (a list of
    ``(name, bytes)``), but no ``topic`` or ``partition``: ``getmany`` keys
    them by partition already.

    Example:
        >>> class Consumer:  # key and value deserializers: the records must be copied
        ...     _key_deserializer = staticmethod(bytes.decode)
        >>> hand_over_decoded_records(Consumer())
        False
    """
    if getattr(consumer, "_key_deserializer", None) is not None or getattr(
        consumer, "_value_deserializer", None
    ) is not None:
        return False  # the copy is where aiokafka deserializes
    fetcher: Any = getattr(consumer, "_fetcher", None)
    buffer = getattr(fetcher, "_records", None)
    if type(buffer) is not collections.OrderedDict:
        return False
    try:
        from aiokafka.consumer.fetcher import PartitionRecords
    except ImportError:  # pragma: no cover - another aiokafka layout
        return False
    if not callable(getattr(PartitionRecords, "_consumer_record", None)):
        log.debug("aiokafka without PartitionRecords._consumer_record: records are copied")
        return False
    decoded = _DecodedRecordBuffer()
    for tp, result in buffer.items():  # fetched before this call: set up as well
        decoded[tp] = result
    fetcher._records = decoded
    return True
