"""One snapshot of a running worker, as plain data: what the page, the terminal and the log show.

``status(runtime)`` reads what the runtime keeps anyway (the dispatchers'
read positions and watermarks, the checkpointers' commits, the lanes' queues,
the app's counters) and changes nothing. Lag per partition is the end of the
partition as the source last saw it (Kafka's high watermark from the last
fetch, the memory broker's log length) minus the next offset to commit. A
bounded input (a memory-broker topic that has ended) also says how far along
it is.

Example:
    >>> partition_labels(("rides", 3)), partition_labels("shard-1")
    (('rides', '3'), ('', 'shard-1'))
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from asyncflow import __version__
from asyncflow.channels import Topic
from asyncflow.errors import redact_url

if TYPE_CHECKING:
    from asyncflow.runtime import Runtime, SourceRunner


def partition_labels(partition: Hashable) -> tuple[str, str]:
    """``(topic, partition)`` label values of a source partition (``""`` topic for a shard id).

    Example:
        >>> from asyncflow.protocols import TopicPartition
        >>> partition_labels(TopicPartition("rides", 0))
        ('rides', '0')
    """
    topic = getattr(partition, "topic", None)
    number = getattr(partition, "partition", None)
    if topic is None and isinstance(partition, tuple) and len(partition) == 2:
        topic, number = partition
    if topic is None or number is None:
        return "", str(partition)
    return str(topic), str(number)


def end_offsets(source: Any) -> dict[Hashable, int]:
    """Per partition, the offset after its last record as the source knows it (no request).

    A source offers ``end_offsets_now()`` (the Kafka source); the memory
    broker's source is read directly. Others give ``{}`` (lag unknown).

    Example:
        >>> from asyncflow.memory import MemoryBroker
        >>> from asyncflow.protocols import TopicSpec
        >>> b = MemoryBroker(); b.create_topic("t")
        >>> end_offsets(b.source([TopicSpec("t")], "g"))
        {}
    """
    ask = getattr(source, "end_offsets_now", None)
    if callable(ask):
        return dict(ask())
    broker = getattr(source, "broker", None)
    topics = getattr(broker, "topics", None)
    assigned = getattr(source, "_assigned", None)
    if not isinstance(topics, dict) or not isinstance(assigned, list):
        return {}
    out: dict[Hashable, int] = {}
    for tp in assigned:
        topic = topics.get(tp.topic)
        if topic is not None:
            out[tp] = len(topic.partitions[tp.partition])
    return out


def bounded_total(source: Any) -> int | None:
    """Records in the source's topics if every one has ended (a replay), else ``None``.

    Example:
        >>> from asyncflow.memory import MemoryBroker
        >>> from asyncflow.protocols import TopicSpec
        >>> b = MemoryBroker(); b.create_topic("t"); _ = b.produce("t", b"k", b"v")
        >>> src = b.source([TopicSpec("t")], "g")
        >>> bounded_total(src) is None, b.end("t"), bounded_total(src)
        (True, None, 1)
    """
    broker = getattr(source, "broker", None)
    topics = getattr(broker, "topics", None)
    names = getattr(source, "topics", None)
    if not isinstance(topics, dict) or not names:
        return None
    total = 0
    for name in names:
        topic = topics.get(name)
        if topic is None or not topic.ended:
            return None
        total += sum(len(p) for p in topic.partitions)
    return total


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def partitions(runner: SourceRunner) -> list[dict[str, Any]]:
    """Per partition of one source: read and committed offsets, end, lag, watermark, paused."""
    d = runner.dispatcher
    read_to = d.read_to
    committed = runner.checkpointer.committed
    ends = end_offsets(runner.source)
    paused = d.paused
    known = set(d.watermarks.partitions) | set(read_to) | set(ends)
    rows = []
    for p in sorted(known, key=str):
        topic, number = partition_labels(p)
        done = committed.get(p)
        end = ends.get(p)
        next_commit = 0 if done is None else done + 1
        lag = None if end is None else max(0, end - next_commit)
        frontier = d.watermarks.frontier(p)
        rows.append({
            "topic": topic, "partition": number, "read_to": read_to.get(p),
            "committed": done, "end": end, "lag": lag,
            "watermark_ms": frontier, "watermark": _iso(frontier), "paused": p in paused,
        })
    return rows


def topology(runtime: Runtime) -> dict[str, Any]:
    """Topics (with partitions), agents (what they read and write), sinks, the dead-letter output."""
    app = runtime.app
    target = app.dead_letter_target
    topics = [
        {"name": ch.name, "partitions": ch.spec.partitions}
        for ch in app.channels.values() if isinstance(ch, Topic)
    ]
    agents = [
        {"name": a.name, "reads": a.channel.name, "lanes": a.concurrency,
         "writes": sorted(t.name for t in a.writes)}
        for a in app.agents.values()
    ]
    return {
        "topics": topics,
        "agents": agents,
        "sinks": sorted(app.sinks),
        "dead_letters": target if isinstance(target, str) else getattr(target, "name", "sink"),
    }


def lane_depths(runtime: Runtime) -> dict[str, int]:
    """Events queued in each agent's lanes (summed over its lanes)."""
    out: dict[str, int] = {}
    for r in runtime.runners:
        for route in r.routes.values():
            for agent, queues in zip(route.agents, route.consumers, strict=True):
                out[agent] = out.get(agent, 0) + sum(q.size for q in queues)
    return out


def status(runtime: Runtime, history: list[tuple[float, float, float]] | None = None) -> dict[str, Any]:
    """Everything the web page shows, as JSON-able data (``history``: the observer's samples).

    Example:
        >>> import asyncflow as af
        >>> from asyncflow.runtime import Runtime
        >>> snapshot = status(Runtime(af.App("status-doc")))
        >>> snapshot["app"], snapshot["partitions"], snapshot["progress"]
        ('status-doc', [], None)
    """
    app = runtime.app
    m = app.metrics
    rows = [row for r in runtime.runners for row in partitions(r)]
    known_lag = [row["lag"] for row in rows if row["lag"] is not None]
    totals = {
        "events_in": int(m.get("events_in")),
        "events_out": sum(m.labeled("events_out").values()),
        "dead_letters": int(m.get("dead_letters")),
        "late_events": int(m.get("late_events")),
        "checkpoints": int(m.get("checkpoints")),
        "partition_pauses": int(m.get("partition_pauses")),
    }
    progress = None
    totals_bounded = [bounded_total(r.source) for r in runtime.runners]
    if runtime.runners and all(t is not None for t in totals_bounded):
        total = sum(t or 0 for t in totals_bounded)
        read = sum(row["read_to"] + 1 for row in rows if row["read_to"] is not None)
        progress = {"read": read, "total": total,
                    "fraction": (read / total) if total else 1.0}
    dead = getattr(runtime, "dead_letters", None)
    recent = [
        {"at": d.at, "reason_class": d.reason_class, "reason": d.reason, "topic": d.topic,
         "partition": d.partition, "offset": d.offset}
        for d in (list(dead.recent)[::-1] if dead is not None else [])
    ]
    marks = [r.dispatcher.watermarks.peek() for r in runtime.runners]
    known_marks = [w for w in marks if w is not None]
    watermark = min(known_marks) if known_marks else None
    return {
        "app": app.id,
        "version": __version__,
        "broker": redact_url(app.broker_url),
        "running": runtime.started,
        "time": time.time(),
        "topology": topology(runtime),
        "partitions": rows,
        "lag": sum(known_lag) if known_lag else None,
        "watermark_ms": watermark,
        "watermark": _iso(watermark),
        "lanes": lane_depths(runtime),
        "totals": totals,
        "dead_letter_reasons": {k[0]: v for k, v in m.labeled("dead_letters").items()},
        "progress": progress,
        "throughput": [{"t": t, "in_per_s": i, "out_per_s": o} for t, i, o in (history or [])],
        "recent_dead_letters": recent,
    }


def status_of_idle(app: Any) -> dict[str, Any]:
    """The topology of an app that is not running (what ``status`` shows before a start).

    Example:
        >>> import asyncflow as af
        >>> status_of_idle(af.App("idle"))["topics"]
        []
    """
    from asyncflow.runtime import Runtime

    return topology(Runtime(app))
