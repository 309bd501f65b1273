"""Agents: the user's ``async def f(stream)``, run as N lanes, with an error policy.

Each lane runs the agent function on its own ``Stream``. When the function
raises, the policy decides: ``Retry`` re-delivers the failing event after a
backoff (then falls back to dead-lettering it or stopping), ``"dead_letter"``
sends the event to the dead-letter output and carries on with the next one,
``"stop"`` stops the worker. Every failure is logged on one line naming the
agent, lane, key and source position.

An agent written as an async generator sends what it yields to its ``sink``
outputs, keyed by the key of the event (or window result) being handled.

The topics an agent writes to (``Agent.writes``) are its ``sink`` outputs and
every topic its function refers to, directly or through the functions it
calls (``referenced_topics``): on a bounded input, a topic one agent writes and
another reads ends once its writers have finished (``asyncflow.runtime``).

An agent body must read its stream until the stream ends: one that returns
earlier stops the worker with an ``AgentError``, since the events left in its
lane could never be checkpointed.

Example:
    >>> Retry(times=2, backoff=0.1).delay(2)
    0.2
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from asyncflow.channels import Topic
from asyncflow.errors import AgentError, PartitionRevoked
from asyncflow.event import Event
from asyncflow.stream import LaneContext, Stream

if TYPE_CHECKING:
    from asyncflow.channels import Channel, Output

log = logging.getLogger("asyncflow.agent")


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failing event ``times`` times with exponential backoff, then ``then``.

    Example:
        >>> Retry(times=3, backoff=1.0, max_backoff=3.0).delay(3)
        3.0
    """

    times: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    then: Literal["dead_letter", "stop"] = "dead_letter"

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return float(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))


ErrorPolicy = Retry | Literal["dead_letter", "stop"]


class Agent:
    """A registered agent: its function, input channel, lanes, outputs and error policy.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> @app.agent(app.topic("t"), concurrency=4)
        ... async def count(stream):
        ...     async for _ in stream:
        ...         pass
        >>> app.agents["count"].concurrency
        4
    """

    def __init__(
        self,
        fn: Callable[[Stream[Any]], Any],
        channel: Channel[Any],
        *,
        concurrency: int = 1,
        sinks: Sequence[Output] = (),
        on_error: ErrorPolicy = "dead_letter",
        name: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("an agent needs at least one lane (concurrency >= 1)")
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise TypeError(f"agent {fn.__name__!r} must be an 'async def' function of a stream")
        self.fn = fn
        self.channel = channel
        self.concurrency = concurrency
        self.sinks = list(sinks)
        self.on_error = on_error
        self.name = name or fn.__name__
        self._is_generator = inspect.isasyncgenfunction(fn)

    @property
    def writes(self) -> list[Topic[Any]]:
        """The topics this agent may send to: its ``sink`` topics and those its function uses.

        Example:
            >>> import asyncflow as af
            >>> app = af.App("a")
            >>> numbers, doubled = app.topic("numbers"), app.topic("doubled")
            >>> @app.agent(numbers)
            ... async def double(stream):
            ...     async for n in stream:
            ...         await doubled.send(None, 2 * n)
            >>> [t.name for t in app.agents["double"].writes]
            ['doubled']
        """
        found = [s for s in self.sinks if isinstance(s, Topic)]
        for t in referenced_topics(self.fn):
            if not any(t is f for f in found):
                found.append(t)
        return found

    async def run_lane(self, stream: Stream[Any], lane: LaneContext) -> None:
        """Run the agent function on one lane until its input ends."""
        failed_offset: tuple[Any, int] | None = None
        attempts = 0
        finished = False  # the body returned at the end of its input (not cancelled, not failed)
        guard = self.channel.replay_guard
        if guard is not None:  # a repartition's topic: records forwarded twice count once
            from asyncflow.repartition import drop_replayed

            stream._begin_with_state_step(guard, drop_replayed)
        try:
            while True:
                try:
                    await self._body(stream)
                    if not stream.input_ended:
                        raise AgentError(
                            f"agent {self.name!r} lane {lane.index} returned before its input "
                            "ended; an agent must read its stream to the end (the events left in "
                            "its lane could never be committed)"
                        )
                    finished = True
                    return
                except (asyncio.CancelledError, AgentError):
                    raise
                except Exception as exc:
                    events = stream._take_in_flight()
                    if isinstance(exc, PartitionRevoked):
                        # abandoned, not failed: the partition's new owner handles it again
                        gone = exc.partition
                        log.info("agent %s lane %d: %s", self.name, lane.index, exc)
                        kept = [e for e in events if e.partition != gone]
                        stream.metrics.incr("events_abandoned", len(events) - len(kept))
                        events = kept
                        if not events:
                            continue
                    from_result = not events and stream._window_key is not _no_key()
                    if from_result:  # raised while handling a window result: that is what failed
                        events = [_result_event(stream)]
                    ev = events[-1] if events else None
                    where = (events[0].partition, events[0].offset) if events else None
                    attempts = attempts + 1 if where == failed_offset else 1
                    failed_offset = where
                    desc = (
                        f"key={ev.key!r} at {ev.partition}@{ev.offset}" if ev is not None else "-"
                    )
                    if len(events) > 1:
                        desc += f" (a batch of {len(events)} events)"
                    reason = f"{type(exc).__name__}: {exc}"
                    policy = self.on_error
                    if isinstance(policy, Retry) and attempts <= policy.times and events and not from_result:
                        delay = policy.delay(attempts)
                        log.warning(
                            "agent %s lane %d failed on %s (%s); retry %d/%d in %.2fs",
                            self.name, lane.index, desc, reason, attempts, policy.times, delay,
                        )
                        await asyncio.sleep(delay)
                        for e in reversed(events):
                            stream.push_back(e)
                        continue
                    action = policy.then if isinstance(policy, Retry) else policy
                    if action == "stop" or not events:
                        log.error("agent %s lane %d failed on %s: %s; stopping", self.name,
                                  lane.index, desc, reason)
                        raise AgentError(
                            f"agent {self.name!r} failed on {desc}: {reason} "
                            "(on_error='stop'; use on_error='dead_letter' or af.Retry to go on)"
                        ) from exc
                    log.error("agent %s lane %d failed on %s: %s; sent to dead letters",
                              self.name, lane.index, desc, reason)
                    for e in events:
                        await stream.dead_letter(e, f"agent {self.name} raised {reason}")
        finally:
            stream.close(finished)

    async def _body(self, stream: Stream[Any]) -> None:
        stream._restart()  # a restarted body rebuilds its operations and gets its windows back
        if not self._is_generator:
            await self.fn(stream)
            return
        sinks = self.sinks
        async for out in self.fn(stream):
            key = stream.output_key
            for s in sinks:
                await s.send(key, out)


def _no_key() -> Any:
    from asyncflow.stream import _NO_KEY

    return _NO_KEY


def _result_event(stream: Stream[Any]) -> Event[Any]:
    """The window result being handled when the body raised, as an event for the error policy."""
    key = stream._window_key
    stream._window_key = _no_key()
    ev = stream.current
    return Event(key, {"window_result_of_key": key}, None, (),
                 ev.partition if ev is not None else None, -1)


def referenced_topics(fn: Callable[..., Any]) -> list[Topic[Any]]:
    """The topics a function refers to: by global name, by closure, or in the functions it calls.

    What an agent (or a task) may send to, found without running it: the names
    its code (and the code nested in it) uses, looked up in its globals and
    closure; functions of the same module found that way are followed too. A topic reached
    only through an attribute of some other object is not found: name it in the
    agent's ``sink=`` instead.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("a")
        >>> out = app.topic("out")
        >>> async def forward(v):
        ...     await out.send(None, v)
        >>> async def body(stream):
        ...     async for v in stream:
        ...         await forward(v)
        >>> [t.name for t in referenced_topics(body)]
        ['out']
    """
    found: list[Topic[Any]] = []
    seen: set[int] = set()
    todo: list[Any] = [fn]
    home = getattr(inspect.unwrap(fn), "__globals__", None)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Topic):
            found.append(obj)
            continue
        if isinstance(obj, types.MethodType):
            todo.append(obj.__func__)
            continue
        if not isinstance(obj, types.FunctionType) or (obj is not fn and obj.__globals__ is not home):
            continue  # helpers of the same module are followed; libraries are not
        namespace = obj.__globals__
        for cell in obj.__closure__ or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                pass
        codes = [obj.__code__]
        while codes:
            code = codes.pop()
            for name in code.co_names:
                if name in namespace:
                    todo.append(namespace[name])
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return found
