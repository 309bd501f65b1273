"""Amazon Kinesis Data Streams: a source (shards as partitions, leased between workers) and a sink.

The code lives in ``kinesis_source`` (readers, leases held, commits,
resharding), ``kinesis_leases`` (lease decisions: expiry, taking, balancing;
no I/O), ``kinesis_lease_table`` (the DynamoDB lease table, conditional
writes), ``kinesis_shards`` (lineage bookkeeping and the end of a shard, no
I/O), ``kinesis_stream`` (stream check, shard listing), ``kinesis_checkpoints``
(reading checkpoints, the table of earlier versions) and ``kinesis_sink``
(``PutRecords``); this module is the public face.

Example:
    >>> from adapters.kinesis import KinesisSink, KinesisSource, Shard
    >>> src = KinesisSource("clicks", app_name="sessions", region="us-east-1")
    >>> sink = KinesisSink("alerts", region="us-east-1")
    >>> Shard("clicks", "shardId-000000000000").shard_id
    'shardId-000000000000'
"""

from .kinesis_checkpoints import CheckpointError, CheckpointStore
from .kinesis_lease_table import LeaseLost, LeaseTable
from .kinesis_leases import Lease, LeaseSettings
from .kinesis_shards import SHARD_END, Shard
from .kinesis_sink import KinesisSink, KinesisSinkStats
from .kinesis_source import KinesisSource, KinesisSourceStats
from .kinesis_stream import StreamNotFound, check_stream, list_shards

__all__ = [
    "SHARD_END",
    "CheckpointError",
    "CheckpointStore",
    "KinesisSink",
    "KinesisSinkStats",
    "KinesisSource",
    "KinesisSourceStats",
    "Lease",
    "LeaseLost",
    "LeaseSettings",
    "LeaseTable",
    "Shard",
    "StreamNotFound",
    "check_stream",
    "list_shards",
]
