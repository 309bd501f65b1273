"""Agents: the user's ``async def f(stream)``, run as N lanes, with an error policy.

Each lane runs the agent function on its own ``Stream``. When the function
raises, the policy decides: ``Retry`` re-delivers the failing event after a
backoff (then falls back to dead-lettering it or stopping), ``"dead_letter"``
sends the event to the dead-letter output and carries on with the next one,
``"stop"`` stops the worker. Every failure is logged on one line naming the
agent, lane, key and source position.

An agent written as an async generator sends what it yields to its ``sink``
outputs, keyed by the key of the event (or window result) being handled.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from asyncflow.errors import AgentError
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

    async def run_lane(self, stream: Stream[Any], lane: LaneContext) -> None:
        """Run the agent function on one lane until its input ends."""
        failed_offset: tuple[Any, int] | None = None
        attempts = 0
        finished = False  # the body returned at the end of its input (not cancelled, not failed)
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
