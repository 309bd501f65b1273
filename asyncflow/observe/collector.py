"""The Prometheus view of one app: a collector that reads its counters when scraped.

Nothing is added to the per-event path: ``collect`` reads the app's
``Metrics`` (counters the dispatcher, writers, dead letters and checkpointer
already keep, once per batch) and the runtime's partitions and lanes at scrape
time. Each app gets its own ``CollectorRegistry`` (``registry_for``), so two
apps in one process never clash. Labels are bounded: topics, agents, sinks,
partitions and dead-letter reason *classes*, never keys or free text.

Metric names (all prefixed ``asyncflow_``): ``events_in_total{topic,agent}``,
``events_out_total{sink,topic}``, ``dead_letters_total{reason}``,
``late_events_total``, ``consumer_lag{topic,partition}``,
``consumer_committed_offset{topic,partition}``,
``watermark_seconds{topic,partition}``, ``lane_queue_depth{agent}``,
``partitions_paused``, ``partition_pauses_total``, ``commits_total``,
``commit_failures_total``, ``commit_seconds``, ``checkpoints_total``,
``checkpoint_seconds``, ``sink_write_seconds{sink}``,
``sink_rejected_total{sink}``, ``sink_retries_total{sink}``,
``processing_seconds`` (event read to offset committed), ``checkpoints_abandoned_total``,
``events_abandoned_total``,
``state_restored_shards_total``, ``state_restore_records_total``,
``future_events_total``, ``info{app,version}``.

Example:
    >>> import asyncflow as af
    >>> from asyncflow.runtime import Runtime
    >>> from prometheus_client import generate_latest
    >>> app = af.App("scraped"); app.metrics.incr_labeled("events_in", ("rides", "parse"), 5)
    >>> text = generate_latest(registry_for(Runtime(app))).decode()
    >>> 'asyncflow_events_in_total{agent="parse",topic="rides"} 5.0' in text
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from asyncflow import __version__
from asyncflow.metrics import Histogram
from asyncflow.observe.status import end_offsets, lane_depths, partition_labels

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from asyncflow.runtime import Runtime


def _histogram(name: str, doc: str, labels: list[str],
               series: dict[tuple[str, ...], Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, h in sorted(series.items()):
        buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in h.buckets()]
        family.add_metric(list(values), buckets, h.sum)
    return family


RETRY_COUNTERS = ("retries", "stats.records_retried", "stats.unprocessed_retried")
"""Where a sink keeps the count of records it retried (Kinesis, DynamoDB), first found wins."""


def sink_retries(sink: object) -> int | None:
    """Records or writes the sink retried so far, if it counts them (else ``None``).

    The Kafka sink's retries happen inside the producer and are not counted;
    the Kinesis and DynamoDB sinks count the records they sent again.

    Example:
        >>> from types import SimpleNamespace
        >>> sink_retries(SimpleNamespace(stats=SimpleNamespace(unprocessed_retried=3)))
        3
        >>> sink_retries(object()) is None
        True
    """
    for path in RETRY_COUNTERS:
        value: object = sink
        for part in path.split("."):
            value = getattr(value, part, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class RuntimeCollector(Collector):
    """Yields the app's metrics from its counters and its runtime, when a scrape asks.

    Example:
        >>> import asyncflow as af
        >>> from asyncflow.runtime import Runtime
        >>> names = [m.name for m in RuntimeCollector(Runtime(af.App("c"))).collect()]
        >>> "asyncflow_events_in" in names and "asyncflow_processing_seconds" in names
        True
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        """One family per metric, read now."""
        runtime = self.runtime
        app = runtime.app
        m = app.metrics
        info = InfoMetricFamily("asyncflow", "The app this worker runs.", labels=["app"])
        info.add_metric([app.id], {"version": __version__})
        yield info

        events_in = CounterMetricFamily(
            "asyncflow_events_in", "Records read, per topic and the agent reading them.",
            labels=["topic", "agent"])
        for (topic, agent), n in sorted(m.labeled("events_in").items()):
            events_in.add_metric([topic, agent], n)
        yield events_in
        events_out = CounterMetricFamily(
            "asyncflow_events_out", "Records written by each sink writer, per destination topic.",
            labels=["sink", "topic"])
        for (sink, topic), n in sorted(m.labeled("events_out").items()):
            events_out.add_metric([sink, topic], n)
        yield events_out
        dead = CounterMetricFamily(
            "asyncflow_dead_letters", "Dead letters by reason class "
            "(decode, event_time_ahead, no_event_time, late, agent_error, sink_rejected, other).",
            labels=["reason"])
        for (reason,), n in sorted(m.labeled("dead_letters").items()):
            dead.add_metric([reason], n)
        yield dead
        for name, metric, doc in (
            ("late_events", "asyncflow_late_events", "Events behind the watermark on arrival."),
            ("partition_pauses", "asyncflow_partition_pauses",
             "Times a partition was paused because a lane was full."),
            ("commits", "asyncflow_commits", "Offset commits that succeeded."),
            ("commits_failed", "asyncflow_commit_failures", "Offset commits that failed."),
            ("checkpoints", "asyncflow_checkpoints", "Checkpoints completed."),
            ("checkpoints_abandoned", "asyncflow_checkpoints_abandoned",
             "Checkpoints given up (a lane did not reach the barrier in time)."),
            ("events_abandoned", "asyncflow_events_abandoned",
             "Events left half done because their partition was given up meanwhile "
             "(its new owner handles them)."),
            ("state.restored_shards", "asyncflow_state_restored_shards",
             "Table partitions restored from their changelog."),
            ("state.restore_records", "asyncflow_state_restore_records",
             "Changelog records read while restoring state."),
            ("future_events", "asyncflow_future_events",
             "Records whose event time was too far ahead (dead letters)."),
        ):
            yield CounterMetricFamily(metric, doc, value=m.get(name))

        lag = GaugeMetricFamily(
            "asyncflow_consumer_lag", "Records in the partition after the last committed offset.",
            labels=["topic", "partition"])
        committed_g = GaugeMetricFamily(
            "asyncflow_consumer_committed_offset", "The last offset committed.",
            labels=["topic", "partition"])
        watermark = GaugeMetricFamily(
            "asyncflow_watermark_seconds", "The largest event time read from the partition "
            "(Unix seconds).", labels=["topic", "partition"])
        paused = 0
        for r in runtime.runners:
            committed = r.checkpointer.committed
            for p, end in end_offsets(r.source).items():
                done = committed.get(p)
                lag.add_metric(list(partition_labels(p)),
                               max(0, end - (0 if done is None else done + 1)))
            for p, done in committed.items():
                committed_g.add_metric(list(partition_labels(p)), done)
            marks = r.dispatcher.watermarks
            for p in marks.partitions:
                frontier = marks.frontier(p)
                if frontier is not None:
                    watermark.add_metric(list(partition_labels(p)), frontier / 1000)
            paused += len(r.dispatcher.paused)
        yield lag
        yield committed_g
        yield watermark
        yield GaugeMetricFamily("asyncflow_partitions_paused",
                                "Partitions paused now because a lane is full.", value=paused)
        depth = GaugeMetricFamily("asyncflow_lane_queue_depth",
                                  "Events queued in the agent's lanes.", labels=["agent"])
        for agent, n in sorted(lane_depths(runtime).items()):
            depth.add_metric([agent], n)
        yield depth

        rejected = CounterMetricFamily("asyncflow_sink_rejected",
                                       "Records a sink refused (each became a dead letter).",
                                       labels=["sink"])
        retries = CounterMetricFamily("asyncflow_sink_retries",
                                      "Records a sink sent again after a transient refusal "
                                      "(sinks that count them: Kinesis, DynamoDB).",
                                      labels=["sink"])
        for w in runtime.writers.values():
            rejected.add_metric([w.name], w.rejected)
            tried = sink_retries(w.sink)
            if tried is not None:
                retries.add_metric([w.name], tried)
        yield rejected
        yield retries

        yield _histogram("asyncflow_commit_seconds", "Offset commit latency.", [],
                         m.histograms("commit_seconds"))
        yield _histogram("asyncflow_checkpoint_seconds", "Checkpoint duration "
                         "(barrier, flush, state, commit).", [], m.histograms("checkpoint_seconds"))
        yield _histogram("asyncflow_sink_write_seconds", "Latency of one sink write (a batch).",
                         ["sink"], m.histograms("sink_write_seconds"))
        yield _histogram("asyncflow_processing_seconds", "From a record read to its offset "
                         "committed (processed, outputs flushed, state written), per batch.", [],
                         m.histograms("processing_seconds"))


def registry_for(runtime: Runtime) -> CollectorRegistry:
    """A registry of its own for one runtime's app (never the global one).

    Example:
        >>> import asyncflow as af
        >>> from asyncflow.runtime import Runtime
        >>> a, b = registry_for(Runtime(af.App("a"))), registry_for(Runtime(af.App("a")))
        >>> a is not b
        True
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return registry
