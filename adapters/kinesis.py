"""Amazon Kinesis Data Streams: a source (shards as partitions) and a sink.

The code lives in ``kinesis_source`` (readers, commits, resharding),
``kinesis_shards`` (lineage bookkeeping, no I/O), ``kinesis_stream`` (stream
check, shard listing), ``kinesis_checkpoints`` (the DynamoDB checkpoint table)
and ``kinesis_sink`` (``PutRecords``); this module is the public face.

Example:
    >>> from adapters.kinesis import KinesisSink, KinesisSource, Shard
    >>> src = KinesisSource("clicks", app_name="sessions", region="us-east-1")
    >>> sink = KinesisSink("alerts", region="us-east-1")
    >>> Shard("clicks", "shardId-000000000000").shard_id
    'shardId-000000000000'
"""

from .kinesis_checkpoints import CheckpointError, CheckpointStore
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
    "Shard",
    "StreamNotFound",
    "check_stream",
    "list_shards",
]
