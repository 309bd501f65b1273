"""The runtime: one ``asyncio.TaskGroup`` owning readers, lanes, sinks, timers, commits.

Start: open the broker, make sure topics exist, start the sink writers, start
one task per lane (agent bodies declare their windows), join the sources
(partitions get assigned and their state restored before they are read). Run:
each source's reader fetches batches and dispatches them; a ticker sends
watermarks; a checkpointer takes a checkpoint every commit interval
(``asyncflow.checkpoint``: outputs flushed, changelogs flushed, local stores
written, offsets committed). Stop (SIGINT/SIGTERM, ``app.stop()``, or every
bounded input ended): stop reading, take back what no lane has started, let
the lanes finish, take a last checkpoint, leave the groups. On the memory
broker the end of a bounded input travels stage by stage through the topics
the app writes to itself (``InputEnds``).

A stop takes at most about ``shutdown_timeout`` seconds, whatever the broker
does: draining, the last checkpoint and the last writes get what is left of
it but a closing share (``close_budget``), in which the sources leave their
groups and the sinks and the broker's clients are closed. If the stop could
not commit everything the lanes were handed (the broker unreachable, a lane
stuck), one ERROR line says which partitions stay at which committed offset,
why, and that a restart replays them; ``Runtime.unfinished`` holds that line
(the CLI then exits 1). Sources, sinks and the broker are closed on every way
out, errors included (each close bounded by ``close_budget``), so a consumer
always leaves its group and no client is left open.

Example:
    >>> import asyncio, asyncflow as af
    >>> asyncio.run(af.App("idle").run(stop_when_idle=True))
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Hashable
from typing import TYPE_CHECKING, Any

from asyncflow.agent import referenced_topics
from asyncflow.brokers import open_broker
from asyncflow.channels import Topic
from asyncflow.checkpoint import Checkpointer, Fenced
from asyncflow.dead_letters import DeadLetters
from asyncflow.dispatch import Dispatcher, Route
from asyncflow.errors import AsyncflowError, ConfigError
from asyncflow.event import Event, Watermark
from asyncflow.lanes import LaneQueue
from asyncflow.observe.observer import Observer
from asyncflow.observe.settings import web_settings_of
from asyncflow.observe.traces import lane_context, tracer_for
from asyncflow.protocols import (
    Broker,
    ChangelogBroker,
    CommittedPositions,
    Source,
    TopicSpec,
    TransactionalBroker,
    Transactions,
)
from asyncflow.state.manager import StateManager
from asyncflow.stream import LaneContext, Stream
from asyncflow.watermarks import PartitionWatermarks
from asyncflow.writer import SinkWriter

if TYPE_CHECKING:
    from asyncflow.app import App

log = logging.getLogger("asyncflow.worker")

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young-generation collections while a worker runs.

Above what the lanes and sink buffers hold at once (a few thousand records
each): at 10,000 a per-item loop over 300,000 readings ran 26 young and 2
older collections, 70-120 ns per event; at 50,000, one."""
CLOSE_SHARE = 0.25
"""Of ``shutdown_timeout``, the part kept for closing clients (at most ``CLOSE_MAX`` s)."""
CLOSE_MAX = 5.0


def close_budget(shutdown_timeout: float) -> float:
    """Seconds a stop keeps for leaving groups and closing clients.

    Example:
        >>> close_budget(30.0), close_budget(4.0)
        (5.0, 1.0)
    """
    return min(CLOSE_MAX, CLOSE_SHARE * shutdown_timeout)


class SourceRunner:
    """One source: its dispatcher, reader loop, checkpoints and rebalance handling."""

    def __init__(
        self,
        runtime: Runtime,
        source: Source,
        routes: dict[str, Route],
        lanes: dict[Hashable, LaneQueue],
        transactions: Transactions | None = None,
    ) -> None:
        self.runtime = runtime
        self.source = source
        self.routes = routes
        app = runtime.app
        self.dispatcher = Dispatcher(
            source,
            routes,
            PartitionWatermarks(app.idle_timeout if app.idle_timeout > 0 else None),
            app.clock,
            app.metrics,
            runtime.dead_letters.raw,
            max_time_ahead_ms=app.max_time_ahead_ms,
            dead_letters_out=runtime.dead_letters.writer,
        )
        self.owned: set[Hashable] = set()
        """Partitions assigned here now."""
        self.gate = asyncio.Event()
        """Exactly-once: the reader dispatches only while it is set (see ``Checkpointer.gate``)."""
        self.gate.set()
        self.checkpointer = Checkpointer(
            dispatcher=self.dispatcher,
            lanes=lanes,
            flush=runtime.flush_writers,
            state=runtime.state,
            source=source,
            metrics=app.metrics,
            transactions=transactions,
            gate=self.gate,
        )
        self.ended = asyncio.Event()
        self._reading = True

    async def on_assigned(self, partitions: Collection[Hashable]) -> None:
        """Restore the partitions' state, then let the dispatcher read them."""
        log.info("assigned %s", _fmt(partitions))
        parts = list(partitions)
        self.owned.update(parts)
        self.checkpointer.lost.difference_update(parts)
        committed: dict[Hashable, int | None] = {}
        if isinstance(self.source, CommittedPositions) and self.runtime.state.has_state:
            committed = await self.source.committed(parts)
        states = await self.runtime.state.assign(parts, committed)
        if not getattr(self.source, "offsets_survive_restarts", True):
            # records are numbered afresh by each run: offsets of an earlier run say nothing
            for ps in states.values():
                for shard in ps.shards.values():
                    shard.applied = None
        for p in parts:
            ps = states[p]
            self.dispatcher.assign(p, skip_to=ps.skip_to, frontier=ps.frontier)

    async def on_revoked(self, partitions: Collection[Hashable]) -> None:
        """Checkpoint them, take back what the lanes hold of them, then give up their state.

        Without state the lanes' events of them are taken back first (the new
        owner replays them); with state the lanes drain them into the checkpoint,
        and only what a checkpoint that did not complete left is taken back.
        """
        gone = set(partitions)
        self.owned.difference_update(gone)
        log.info("revoking %s: checkpointing", _fmt(partitions))
        if not self.checkpointer.gapless:
            # with state (or exactly-once) the lanes drain what they hold instead: a cut
            # below records other lanes already processed would leave state ahead of it
            # (exactly-once: commit outputs it does not cover)
            self.dispatcher.take_back(gone)
        done = await self.checkpointer.checkpoint(
            timeout=self.runtime.app.drain_timeout, only=gone
        )
        if not done:
            log.warning("revoked %s without a last checkpoint; the new owner replays from the "
                        "last committed offsets", _fmt(partitions))
        # what the lanes still hold of them (the checkpoint did not complete) is the new
        # owner's: handled here after the release, it would be on state this worker let go
        self.dispatcher.take_back(gone)
        self.runtime.state.release(gone)
        self.dispatcher.forget(gone)
        self.checkpointer.forget(gone)

    async def on_lost(self, partitions: Collection[Hashable]) -> None:
        """Partitions taken away without a rebalance (this member was dropped from the group).

        Their new owner may be restoring or writing their state already: no
        checkpoint is taken (it would write into their changelogs), what no lane
        has started is taken back, and their state is let go; everything since
        the last checkpoint is replayed by the new owner.
        """
        gone = set(partitions)
        self.owned.difference_update(gone)
        tx = self.checkpointer.transactions
        if tx is not None:
            # their outputs may be in the open transaction: it must never commit
            await tx.abort("partitions lost")
            self.checkpointer.failed = True
            raise Fenced(
                f"fenced: lost {_fmt(partitions)} (this worker is no longer a member of the "
                "group; another one replays them): its transaction is aborted, nothing of it "
                "is committed, and it stops"
            )
        log.warning("lost %s (no longer a member of the group): dropping their state without "
                    "a checkpoint", _fmt(partitions))
        self.dispatcher.take_back(gone)
        self.checkpointer.lose(gone)
        self.runtime.state.release(gone, lost=True)
        self.dispatcher.forget(gone)
        self.checkpointer.forget(gone)

    async def read_loop(self) -> None:
        source, dispatcher = self.source, self.dispatcher
        ends = self.runtime.ends
        by_topic = ends.active and callable(getattr(source, "topic_exhausted", None))
        fetch_timeout = min(0.2, self.runtime.app.watermark_interval)
        gate = self.gate
        while self._reading:
            batches = await source.fetch(fetch_timeout)
            if batches:
                if not gate.is_set():
                    await gate.wait()  # exactly-once: a checkpoint takes a gapless cut
                    # partitions revoked meanwhile: their records are their new owner's
                    batches = [b for b in batches if b.partition in self.owned]
                for b in batches:
                    dispatcher.dispatch(b)
                dispatcher.broadcast_watermark()
                dead = self.runtime.dead_letters.writer
                if dead.full:
                    # a flood of poison: read no more until the dead letters are written, so
                    # memory holds at most the writer's bound and one fetch more (for a
                    # dead-letter topic that writer is the producer: full outputs hold reads too)
                    self.runtime.app.metrics.incr("reads_held_for_outputs")
                    await dead.wait_for_room()
            if by_topic:  # each input ends on its own, internal topics once their writers end
                if await ends.advance(self):
                    self.ended.set()
                    return
                if not batches and dispatcher.has_parked:  # a drained source fetches at once
                    await asyncio.sleep(0.005)  # while lanes take the last parked parts
            elif not batches and getattr(source, "exhausted", False):
                if dispatcher.has_parked:  # lanes are still taking the last parked parts
                    await asyncio.sleep(0.005)
                    continue
                dispatcher.broadcast_watermark(final=True)
                dispatcher.close_lanes()
                ends.closed.update(self.routes)
                self.ended.set()
                return

    def close_input(self, name: str) -> None:
        """The input ``name`` is over: its lanes get the final watermark and finish once drained."""
        wall = self.runtime.app.clock.wall_ms()
        watermarks = self.dispatcher.watermarks
        mark = Watermark(watermarks.current(wall), wall, final=True, marks=watermarks.marks(wall))
        for queues in self.routes[name].consumers:
            for q in queues:
                q.put_watermark(mark)
                q.close()

    def stop_reading(self) -> None:
        self._reading = False

    async def commit_loop(self, stopping: asyncio.Event) -> None:
        """A checkpoint every commit interval, until ``stopping`` (never cut one in half)."""
        app = self.runtime.app
        interval = app.commit_interval
        while not stopping.is_set():
            try:
                async with asyncio.timeout(interval):
                    await stopping.wait()
                return
            except TimeoutError:
                pass
            await self.checkpointer.checkpoint(timeout=max(app.shutdown_timeout, 10 * interval))

    async def ticker(self) -> None:
        interval = self.runtime.app.watermark_interval
        while not self.ended.is_set():
            await asyncio.sleep(interval)
            if not self.ended.is_set():
                self.dispatcher.broadcast_watermark()
            self.report_gauges()

    def report_gauges(self) -> None:
        """Lane queue sizes and paused partitions, as metrics gauges."""
        metrics = self.runtime.app.metrics
        lanes = self.dispatcher.lanes
        metrics.gauge("lanes.queued", sum(q.size for q in lanes))
        metrics.gauge("lanes.peak", max((q.peak for q in lanes), default=0))
        metrics.gauge("partitions.paused", len(self.dispatcher.paused))


class InputEnds:
    """How the end of bounded inputs reaches every agent, through the topics the app writes itself.

    On a broker whose topics end (the memory broker), each input's lanes get
    the final watermark and close as soon as that input is read to its end.
    An *internal* topic, one that an agent of the app writes (``Agent.writes``)
    and another reads, is over once every input of the agents writing it is
    over, their lanes have finished (windows fired on the final watermark) and
    what was sent is flushed; the app's user tasks that refer to it must have
    returned too. The worker then releases it on the broker
    (``MemoryBroker.release_writer``), and its readers drain it and finish in
    turn: a chain of stages ends stage by stage. Until then the worker holds it
    as a writer, so an early ``end`` (``TestRun.finish``) cannot cut it short.

    Topics in a cycle (A writes ``mid``, B reads ``mid`` and writes A's input)
    can never be over this way, since each waits for the other: one warning at
    start names them, and the worker runs until it is stopped. Kafka topics
    never end: with such a broker nothing here is active.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> raw, mid = app.topic("raw"), app.topic("mid")
        >>> @app.agent(raw)
        ... async def parse(stream):
        ...     async for v in stream:
        ...         await mid.send(None, v)
        >>> @app.agent(mid)
        ... async def use(stream):
        ...     async for v in stream:
        ...         pass
        >>> ends = InputEnds(app, broker=None)
        >>> ends.writers, ends.cyclic
        ({'mid': ['parse']}, [])
    """

    def __init__(
        self, app: App, broker: Any, flush: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.app = app
        self.broker = broker
        self._flush = flush
        self.active = callable(getattr(broker, "add_writer", None))
        """Whether the broker's topics can end (the memory broker): else nothing here runs."""
        self.closed: set[str] = set()
        """Inputs whose lanes got the final watermark."""
        self.released: set[str] = set()
        inputs = {a.channel.name for a in app.agents.values()}
        readable = {n for n in inputs if isinstance(app.channels.get(n), Topic)
                    and app.channels[n].source is None}
        self.inputs_of = {a.name: a.channel.name for a in app.agents.values()}
        self.writers: dict[str, list[str]] = {}
        """Internal topic -> the agents that write it."""
        for agent in app.agents.values():
            for t in agent.writes:
                if t.name in readable:
                    self.writers.setdefault(t.name, []).append(agent.name)
        self.task_writers: dict[str, list[int]] = {
            name: [i for i, fn in enumerate(app.tasks)
                   if any(t.name == name for t in referenced_topics(fn))]
            for name in self.writers
        }
        self.cyclic = self._cycles()
        self._lanes: dict[str, list[asyncio.Task[None]]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._held: set[str] = set()

    def _cycles(self) -> list[str]:
        """Internal topics from which following writers back to their inputs leads round again."""
        cyclic = []
        for start in self.writers:
            seen: set[str] = set()
            todo = [self.inputs_of[w] for w in self.writers[start]]
            while todo:
                name = todo.pop()
                if name == start:
                    cyclic.append(start)
                    break
                if name in seen:
                    continue
                seen.add(name)
                todo.extend(self.inputs_of[w] for w in self.writers.get(name, ()))
        return sorted(cyclic)

    def start(self, lanes: dict[str, list[asyncio.Task[None]]]) -> None:
        """Hold every internal topic as a writer, and say so if some can never end."""
        self._lanes = lanes
        if not self.active:
            return
        for name in self.writers:
            self.broker.add_writer(name, self)
            self._held.add(name)
        if self.cyclic:
            loop = " ; ".join(
                f"{', '.join(self.writers[t])} -> {t} -> "
                f"{', '.join(a for a, i in self.inputs_of.items() if i == t)}"
                for t in self.cyclic
            )
            log.warning("topics %s form a cycle (%s): the end of the input cannot travel round "
                        "it, so this worker runs until it is stopped", ", ".join(self.cyclic), loop)

    def watch_tasks(self, tasks: list[asyncio.Task[Any]]) -> None:
        """The app's user tasks, in ``app.tasks`` order (a task that refers to a topic writes it)."""
        self._tasks = tasks

    def stop(self) -> None:
        """Let go of what was not released: a stop, not the end of the input (idempotent)."""
        held, self._held = self._held, set()
        for name in sorted(held - self.released):
            self.broker.release_writer(name, self, end=False)

    async def advance(self, runner: SourceRunner) -> bool:
        """Close the inputs of ``runner`` that are over and release the internal topics that are.

        Returns whether every input of ``runner`` is closed.
        """
        source: Any = runner.source
        for name in runner.routes:
            if name not in self.closed and not runner.dispatcher.has_parked \
                    and source.topic_exhausted(name):
                runner.close_input(name)
                self.closed.add(name)
        for name, agents in self.writers.items():
            if name not in self.released and name not in self.cyclic and self._over(name, agents):
                if self._flush is not None:
                    await self._flush()  # what its writers sent is in the topic before it ends
                self.released.add(name)
                self._held.discard(name)
                self.broker.release_writer(name, self, end=True)
                log.info("internal topic %s ended: %s finished", name, ", ".join(agents))
        return all(name in self.closed for name in runner.routes)

    def _over(self, name: str, agents: list[str]) -> bool:
        if not all(self.inputs_of[a] in self.closed for a in agents):
            return False
        if not all(t.done() for a in agents for t in self._lanes.get(a, ())):
            return False
        tasks = self._tasks
        return all(i < len(tasks) and tasks[i].done() for i in self.task_writers[name])


class Runtime:
    """Runs one app until it is stopped or its bounded inputs end."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.broker: Broker | None = None
        self.writers: dict[str, SinkWriter] = {}
        self.lanes: list[LaneContext] = []
        self.started = False
        """True once every source has joined and the lanes run."""
        self._stop = asyncio.Event()
        self.unfinished: str | None = None
        """After a stop that left records uncommitted: the line saying so (else ``None``)."""
        self.ends = InputEnds(app, None)
        """Where the end of bounded inputs has got to (the real one is made by ``run``)."""
        self._lane_agents: list[str] = []
        self._lane_streams: list[Stream[Any]] = []
        self.runners: list[SourceRunner] = []
        """One per source, once ``run`` has built them (what ``asyncflow.observe`` reads)."""
        self.observer: Observer | None = None
        """Samples rates, logs progress, serves the web view (made by ``run``)."""
        self.transactions: Transactions | None = None
        """Exactly-once: the broker's transactions (``None``: at-least-once)."""

    def request_stop(self) -> None:
        self._stop.set()

    async def flush_writers(self) -> None:
        """Make every output durable, the dead letters last (sinks refuse records while writing).

        What a sink refuses during its flush is in the dead-letter writer's
        buffer once that flush returns; the dead-letter writer is flushed
        after the others, again while its own flushes turn up refusals (a
        dead letter it refuses goes again without its value), at most three
        times.
        """
        dead = self.dead_letters.writer
        await asyncio.gather(*(w.flush() for w in self.writers.values() if w is not dead))
        for _ in range(3):
            refused = self.dead_letters.refused
            await dead.flush()
            if self.dead_letters.refused == refused:
                return

    def _exactly_once(self, broker: Broker) -> Transactions | None:
        """``processing_guarantee="exactly_once"``: the broker's transactions (else ``None``).

        A broker without transactions, or an input read from another source
        than the broker, is a ``ConfigError`` (one line). Sinks other than the
        broker's own are outside the transaction: a warning says so.
        """
        app = self.app
        if app.processing_guarantee != "exactly_once":
            return None
        unsupported = getattr(broker, "exactly_once_unsupported", None)
        if unsupported or not isinstance(broker, TransactionalBroker):
            raise ConfigError(
                "processing_guarantee=exactly_once needs a broker with transactions: "
                f"{unsupported or f'{broker.url} has none'}"
            )
        own = sorted(n for n, ch in app.channels.items() if getattr(ch, "source", None) is not None)
        if own:
            raise ConfigError(
                f"processing_guarantee=exactly_once covers inputs read from the broker only; "
                f"{', '.join(own)} read from their own sources (use at_least_once)"
            )
        for name in app.sinks:
            log.warning("sink %s is outside the exactly-once transactions: what it writes may "
                        "be written twice after a failure (at-least-once)", name)
        transactions = broker.exactly_once(app.id)
        if hasattr(transactions, "metrics"):
            transactions.metrics = app.metrics
        return transactions

    def _open_broker(self) -> Broker:
        app = self.app
        arg = app._broker_arg
        if arg is not None and not isinstance(arg, str):
            return arg
        return open_broker(app.broker_url, app.broker_options)

    def _state_location(self) -> tuple[str | None, str]:
        """Where local stores go (``None``: nowhere on disk) and which kind they are.

        The memory broker forgets its topics and offsets when the process
        ends, so state kept on disk past that would claim offsets of records
        that no longer exist: without ``ASYNCFLOW_STATE_DIR`` its state lives
        in memory stores (its changelogs live in the broker), unless an input
        comes from an external source whose positions outlive the process
        (Kinesis, SSE with a checkpoint): a source says so with
        ``positions_survive_restarts``.
        """
        app = self.app
        if app.state_store == "memory":
            return None, "memory"
        if app.state_dir is not None:
            return app.state_dir, app.state_store
        resumable = any(
            getattr(ch.source, "positions_survive_restarts", True)
            for ch in app.channels.values()
            if ch.source is not None
        )
        if self.app.broker_url.startswith("memory://") and not resumable:
            return None, "memory"
        return default_state_dir(), app.state_store

    async def run(self, *, stop_when_idle: bool = False) -> None:
        app = self.app
        self.broker = broker = self._open_broker()
        self.transactions = self._exactly_once(broker)
        app._runtime = self
        directory, store = self._state_location()
        topics = [c.spec.partitions for c in app.channels.values() if isinstance(c, Topic)]
        self.state = StateManager(
            app.id,
            directory=directory,
            store=store,
            broker=broker if isinstance(broker, ChangelogBroker) else None,
            clock=app.clock,
            changelog_partitions=max(topics, default=1),
            metrics=app.metrics,
            exactly_once=self.transactions is not None,
            # a restore's read_committed waits out a dead worker's open transaction, which
            # the coordinator aborts after its timeout
            restore_timeout=max(60.0, float(getattr(self.transactions, "timeout", 0.0)) + 30.0),
        )
        for table in app.tables.values():
            self.state.declare_table(table)
        gc_before = gc.get_threshold()
        if gc_before[0] < GC_YOUNG_THRESHOLD:
            # the per-event path allocates short-lived objects; collecting the young
            # generation every 700 allocations costs more than the events themselves
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc_before[1:])
        # what exists before the worker starts (modules, the app, loaded data) lives as
        # long as the worker: keep it out of the full collections that events in queues
        # and buffers trigger, each of which would otherwise walk the whole heap
        gc.freeze()
        try:
            await self._run(broker, stop_when_idle)
        finally:
            self.ends.stop()  # internal topics not ended by now are let go, not ended
            gc.unfreeze()
            gc.set_threshold(*gc_before)
            app._runtime = None
            for ch in app.channels.values():
                if isinstance(ch, Topic):
                    ch._bound = None
            for out in app.sinks.values():
                out._bound = None
            self.state.close()
            await _bounded(broker.close(), close_budget(app.shutdown_timeout),
                           f"closing the broker {broker.url}")

    async def _run(self, broker: Broker, stop_when_idle: bool) -> None:
        app = self.app
        topics = [c for c in app.channels.values() if isinstance(c, Topic)]
        dl_target = app.dead_letter_target
        dl_topic = dl_target if isinstance(dl_target, str) else None
        specs = [t.spec for t in topics]
        if dl_topic is not None and dl_topic not in app.channels:
            specs.append(TopicSpec(dl_topic, partitions=1))
        await broker.ensure_topics(specs)

        self.producer = SinkWriter(broker.sink(), app.metrics)
        self.writers["__producer__"] = self.producer
        for name, out in app.sinks.items():
            self.writers[name] = SinkWriter(out.sink, app.metrics)
        dl_writer = self.producer
        if not isinstance(dl_target, str):
            dl_writer = self.writers["__dead_letters__"] = SinkWriter(dl_target, app.metrics)
        self.dead_letters = DeadLetters(dl_writer, dl_topic, dict(app.channels), app.metrics)
        for w in self.writers.values():
            w.on_rejected = self.dead_letters.rejected

        for ch in app.channels.values():
            if isinstance(ch, Topic):
                ch._bound = self.producer
        for name, out in app.sinks.items():
            out._bound = self.writers[name]
        self.ends = InputEnds(app, broker, self.producer.flush)
        runners, lane_jobs = self._build(broker)
        self.runners = runners
        tracer = tracer_for(app)
        if tracer is not None:
            for r in runners:
                r.dispatcher.tracer = tracer
            for w in self.writers.values():
                w.tracer = tracer
        observer = self.observer = Observer(self, web_settings_of(app))
        try:
            async with asyncio.TaskGroup() as tg:
                writer_tasks = [tg.create_task(w.run(), name=f"sink:{n}")
                                for n, w in self.writers.items()]
                lane_tasks = [tg.create_task(job, name=f"lane:{i}", context=None if tracer is None
                                             else lane_context(self._lane_streams[i]))
                              for i, job in enumerate(lane_jobs)]
                lanes_of: dict[str, list[asyncio.Task[None]]] = {}
                for agent_name, task in zip(self._lane_agents, lane_tasks, strict=True):
                    lanes_of.setdefault(agent_name, []).append(task)
                self.ends.start(lanes_of)
                for _ in range(3):  # agent bodies run to their first await: windows are declared
                    await asyncio.sleep(0)
                observing = tg.create_task(observer.run(), name="observer")
                await observer.serving()  # the web port is bound (or refused) before any join
                for r in runners:
                    await r.source.start(r)
                    r.dispatcher.broadcast_watermark()  # lanes learn the wall clock first
                reader_tasks = [tg.create_task(r.read_loop(), name="reader") for r in runners]
                stopping = asyncio.Event()
                checkpoints = [tg.create_task(r.commit_loop(stopping), name="checkpoints")
                               for r in runners]
                aux = [tg.create_task(r.ticker(), name="ticker") for r in runners]
                aux.append(observing)
                aux += [tg.create_task(self._timer(t.fn, t.interval), name=t.name)
                        for t in app.timers]
                user = [tg.create_task(fn(), name=getattr(fn, "__name__", "task"))
                        for fn in app.tasks]
                self.ends.watch_tasks(user)
                log.info("worker %s running on %s (%d agents, %d lanes)", app.id, broker.url,
                         len(app.agents), len(lane_tasks))
                self.started = True

                await self._until_stop(runners, lane_tasks, user, stop_when_idle)
                deadline = time.monotonic() + app.shutdown_timeout - close_budget(
                    app.shutdown_timeout
                )

                def left() -> float:
                    return max(0.0, deadline - time.monotonic())

                reasons: list[str] = []
                for r in runners:
                    r.stop_reading()
                if not await _finish(reader_tasks, left()):
                    reasons.append("a source's last fetch did not end in time")
                stopping.set()  # a checkpoint under way finishes first
                if not await _finish(checkpoints, left()):
                    reasons.append("a checkpoint under way did not finish in time")
                for t in aux:
                    t.cancel()
                await asyncio.gather(*aux, return_exceptions=True)
                for r in runners:
                    if not r.ended.is_set():
                        if r.checkpointer.gapless:
                            # state or exactly-once: the lanes drain what they hold (no
                            # take-back, which would leave the last cut below records other
                            # lanes processed)
                            await _drain_parked(r, left())
                        else:
                            # a stop, not the end of the input: what no lane has started
                            # waits for the replay instead of holding up the shutdown
                            taken = r.dispatcher.take_back()
                            if taken:
                                log.info("stopping: %d queued events left for the replay", taken)
                        r.dispatcher.close_lanes()
                if lane_tasks:
                    _, pending = await asyncio.wait(lane_tasks, timeout=left())
                    for t in pending:
                        log.warning("lane %s did not finish within shutdown_timeout=%gs; what "
                                    "it holds is replayed", t.get_name(), app.shutdown_timeout)
                        t.cancel()
                    if pending:
                        reasons.append(f"{len(pending)} lanes did not finish in time")
                for t in user:
                    t.cancel()
                for r in runners:
                    reason = await self._last_checkpoint(r, left())
                    if reason:
                        reasons.append(reason)
                    r.report_gauges()
                for w in self.writers.values():
                    w.close()
                unwritten = sum(w.buffered for w in self.writers.values())
                if not await _finish(writer_tasks, left()):
                    reasons.append("the sinks did not write their last outputs in time")
                self._report_stop(runners, reasons, unwritten)
        finally:
            await self._close_clients(runners)
        log.info("worker %s stopped: %s", app.id, app.metrics.snapshot())

    async def _last_checkpoint(self, runner: SourceRunner, timeout: float) -> str | None:
        """The checkpoint at stop, within ``timeout`` s; why it did not complete, or ``None``."""
        checkpointer = runner.checkpointer
        try:
            async with asyncio.timeout(timeout):
                if await checkpointer.checkpoint(timeout=timeout, final=True):
                    return None
        except TimeoutError:
            step = checkpointer.step
            earlier = (f" (the commit before: {checkpointer.last_error})"
                       if checkpointer.commit_failures and checkpointer.last_error else "")
            return _STUCK.get(step, "the last checkpoint did not finish in time") + earlier
        except AsyncflowError as exc:  # an output that could not be written
            return str(exc)
        return checkpointer.last_error or "the last checkpoint did not complete"

    def _report_stop(self, runners: list[SourceRunner], reasons: list[str], unwritten: int) -> None:
        """One ERROR line if the stop left records uncommitted (``self.unfinished``)."""
        behind = {p: v for r in runners for p, v in r.checkpointer.uncommitted().items()}
        if not behind:
            return
        shown = []
        for p, (committed, read) in sorted(behind.items(), key=lambda kv: str(kv[0]))[:4]:
            at = "nothing committed" if committed is None else f"committed to {committed}"
            shown.append(f"{_name(p)} read to {read}, {at}")
        if len(behind) > len(shown):
            shown.append(f"{len(behind) - len(shown)} more")
        outputs = f"; {unwritten} outputs were not written" if unwritten else ""
        why = "; ".join(dict.fromkeys(reasons)) or "the last checkpoint did not complete"
        why = why.replace(" in time", f" within shutdown_timeout={self.app.shutdown_timeout:g}s")
        self.unfinished = (
            f"stopped without committing {len(behind)} partitions ({'; '.join(shown)}){outputs}: "
            f"{why}. Their records after the committed offsets are read and processed again "
            "when the worker restarts " + (
                "(exactly-once: what was written for them was aborted)" if self.transactions
                else "(at-least-once: some outputs may be written twice)")
        )
        log.error("%s", self.unfinished)

    async def _close_clients(self, runners: list[SourceRunner]) -> None:
        """Stop every source (it leaves its group) and sink, on every way out, in bounded time."""
        budget = close_budget(self.app.shutdown_timeout)
        closes = [_bounded(r.source.stop(), budget, "stopping a source (leaving its group)")
                  for r in runners]
        closes += [_bounded(w.stop(), budget, f"closing sink {w.name}")
                   for w in self.writers.values()]
        if closes:
            await asyncio.gather(*closes)

    async def _until_stop(
        self,
        runners: list[SourceRunner],
        lanes: list[asyncio.Task[None]],
        user: list[asyncio.Task[Any]],
        stop_when_idle: bool,
    ) -> None:
        """Wait for a stop request, or for every bounded input to end and its lanes to finish."""
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            if not runners:
                if stop_when_idle and user:
                    pending = list(user)
                    while pending and not stop.done():
                        await asyncio.wait([stop, *pending], return_when=asyncio.FIRST_COMPLETED)
                        pending = [t for t in pending if not t.done()]
                elif not (stop_when_idle and not self.app.timers):
                    await stop
                return
            waits = [asyncio.ensure_future(r.ended.wait()) for r in runners]
            try:
                while not stop.done() and not all(w.done() for w in waits):
                    await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if stop.done():
                return
            pending = [t for t in lanes if not t.done()]
            while pending and not stop.done():
                await asyncio.wait([stop, *pending], return_when=asyncio.FIRST_COMPLETED)
                pending = [t for t in pending if not t.done()]
        finally:
            stop.cancel()

    def _build(self, broker: Broker) -> tuple[list[SourceRunner], list[Any]]:
        """Create lanes per agent and group the channels they read by source."""
        app = self.app
        by_channel: dict[str, list[list[LaneQueue]]] = {}
        agents_of: dict[str, list[str]] = {}
        jobs: list[Any] = []
        pending_lanes: list[tuple[Any, LaneQueue, LaneContext, str]] = []
        lanes_of: dict[str, dict[Hashable, LaneQueue]] = {}
        for agent in app.agents.values():
            queues = []
            for i in range(agent.concurrency):
                q = LaneQueue(app.lane_capacity)
                ctx = LaneContext(agent.name, i, lanes=agent.concurrency, state=self.state)
                self.lanes.append(ctx)
                queues.append(q)
                pending_lanes.append((agent, q, ctx, agent.channel.name))
                lanes_of.setdefault(agent.channel.name, {})[ctx.id] = q
            by_channel.setdefault(agent.channel.name, []).append(queues)
            agents_of.setdefault(agent.channel.name, []).append(agent.name)
        broker_routes: dict[str, Route] = {}
        runners: list[SourceRunner] = []
        runner_of: dict[str, SourceRunner] = {}
        for name, consumers in by_channel.items():
            ch = app.channels[name]
            route = Route(ch, consumers, agents_of[name])
            if ch.source is None:
                broker_routes[name] = route
            else:
                runner = SourceRunner(self, ch.source, {name: route}, lanes_of[name])
                runners.append(runner)
                runner_of[name] = runner
        if broker_routes:
            specs = [app.channels[n].spec for n in broker_routes]
            src = broker.source(specs, app.id)
            if hasattr(src, "fetch_max"):
                src.fetch_max = app.fetch_max
            lanes = {lane: q for n in broker_routes for lane, q in lanes_of[n].items()}
            runner = SourceRunner(self, src, broker_routes, lanes, self.transactions)
            runners.append(runner)
            runner_of.update(dict.fromkeys(broker_routes, runner))
        self._lane_agents = [agent.name for agent, _, _, _ in pending_lanes]
        self._lane_streams = []  # the lanes' streams, in the order of the jobs (for traces)
        for agent, q, ctx, ch_name in pending_lanes:
            ctx.finished = runner_of[ch_name].checkpointer.lane_finished
            dead = self._dead_letter_fn(ch_name)
            stream: Stream[Any] = Stream(q, ctx, metrics=app.metrics, dead_letter=dead)
            jobs.append(agent.run_lane(stream, ctx))
            self._lane_streams.append(stream)
        return runners, jobs

    def _dead_letter_fn(self, channel: str) -> Any:
        async def dead_letter(event: Event[Any], reason: str) -> None:
            await self.dead_letters.event(event, reason, channel)

        return dead_letter

    async def _timer(self, fn: Any, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await fn()
            except Exception:
                log.exception("timer %s failed", getattr(fn, "__name__", fn))


def default_state_dir() -> str:
    """Where local stores go without ``ASYNCFLOW_STATE_DIR``: ``$XDG_STATE_HOME/asyncflow``.

    Example:
        >>> default_state_dir().endswith("asyncflow")
        True
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "asyncflow")


_STUCK = {
    "lanes": "the lanes did not reach the last checkpoint in time",
    "outputs": "the outputs and state were not written in time",
    "commit": "the source did not answer the last commit in time",
}
"""Why a stop's checkpoint did not finish, by the step it was waiting in."""


async def _drain_parked(runner: SourceRunner, timeout: float) -> None:
    """Exactly-once stop: wait for parked slices to enter their lanes; else no last commit."""
    deadline = time.monotonic() + timeout
    while runner.dispatcher.has_parked:
        if time.monotonic() > deadline:
            runner.dispatcher.take_back()
            runner.checkpointer.failed = True  # its cut would have a gap: commit nothing
            runner.checkpointer.last_error = "parked events did not enter their lanes in time"
            return
        await asyncio.sleep(0.005)


async def _finish(tasks: list[asyncio.Task[Any]], timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``tasks``; cancel the rest. ``True`` if all finished."""
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        log.debug("%s did not finish in time at stop; cancelled", t.get_name())
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return not pending


async def _bounded(close: Awaitable[Any], timeout: float, what: str) -> None:
    """Await a close within ``timeout`` s; log (never raise) a failure or a timeout."""
    try:
        async with asyncio.timeout(timeout):
            await close
    except TimeoutError:
        log.info("%s did not finish within %gs; gave up on it", what, timeout)
    except Exception as exc:  # noqa: BLE001 - closing must go on with the others
        log.warning("%s failed: %s", what, exc)


def _name(partition: Hashable) -> str:
    """``topic[3]`` for a topic partition, else the partition as it prints.

    Example:
        >>> from asyncflow.protocols import TopicPartition
        >>> _name(TopicPartition("rides", 3)), _name("shard-1")
        ('rides[3]', 'shard-1')
    """
    topic, number = getattr(partition, "topic", None), getattr(partition, "partition", None)
    return f"{topic}[{number}]" if topic is not None and number is not None else str(partition)


def _fmt(partitions: Collection[Hashable]) -> str:
    return ", ".join(sorted(str(p) for p in partitions)) or "-"

