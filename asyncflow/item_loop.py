"""The per-item loop (``async for value in stream``), compiled for the stream's steps.

``async for`` over a stream runs one async generator: a tight loop over the
lane's local batch, or over a slice's values (``asyncflow.slices``) when the
steps are ``map`` and ``filter`` only (or none). This module writes that
generator once per sequence of step kinds, with the steps' calls in the loop
itself: ``value = f0(value)`` for a ``map``, ``if not f1(value): continue``
for a ``filter``. Each step then costs one Python call. Through the chain's
``one_value`` it cost two (the helper's frame as well), and through C's
``map``/``filter`` iterators a call from C into Python each, which costs
more than a call between Python frames. On ``benchmarks/memory_pipeline.py``'s
typed per-item pipeline valgrind counted 11,452 instructions per event through
``one_value``, 11,081 through ``map``/``filter`` and about 190 fewer again
inline; on the wall clock (300,000 events, best of 7, one core) the inlined
loop took 0.211-0.212 s against 0.212-0.227 s through ``map``/``filter``.

The loop binds its steps when it starts (``__aiter__``). Steps added to the
stream while it runs (an agent body that adds them inside its loop) are
followed from the next slice on, through the chain's ``one_value``, as
before. Everything else (the lane's events, a barrier, a push-back, the end
of input) goes the same way for every chain.

Example:
    >>> from asyncflow.testing import stream_of
    >>> import asyncio
    >>> s = stream_of([1, 2, 3]).map(lambda v: v * 10).filter(lambda v: v > 10)
    >>> async def demo():
    ...     return [v async for v in item_loop(s._chain)(s)]
    >>> asyncio.run(demo())
    [20, 30]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from itertools import islice
from operator import length_hint
from typing import TYPE_CHECKING, Any

from asyncflow.chain import FILTER, MAP, SKIP, Chain
from asyncflow.slices import LaneSlice

if TYPE_CHECKING:
    from asyncflow.stream import Stream

ItemLoop = Callable[["Stream[Any]"], AsyncIterator[Any]]
"""``loop(stream)``: the async iterator ``async for`` runs over ``stream``."""

_TEMPLATE = '''
def make(chain, {params}):
    async def values(self):
        skip = SKIP
        budget = stream.TURN_EVERY  # values until the next turn of the event loop, across slices
        while True:
            buf = self._buf
            pos = self._pos
            n = len(buf)
            if pos < n and self._sync_ops and not self._pushed_back:
                ops = self._ops
                apply = self._chain.one
                self._window_key = NO_KEY
                while pos < n:
                    ev = buf[pos]
                    pos += 1
                    self._pos = pos
                    self._held = self._current = ev
                    value = ev.value if not ops else apply(self, ev)
                    if value is skip:
                        continue
                    yield value
                    budget -= 1
                    if not budget:  # the writer and the other lanes get a turn
                        budget = stream.TURN_EVERY
                        await asyncio.sleep(0)
                    if self._buf is not buf or self._pushed_back:
                        break
                continue
            if pos >= n and not self._pushed_back and self._takes_columns():
                cols = self._cols
                if cols is None or self._cpos >= len(cols):
                    # the lane's next slice, as columns when it came so (else events, above)
                    try:
                        got = await self._refill(columns=True)
                    except StopAsyncIteration:
                        return
                    if type(got) is LaneSlice:
                        self._cols, self._cpos = got, 0
                    continue
                # a slice by its values: the event behind one is made only if asked for.
                # The list iterator is the position (``_cpos``): it has gone past the value
                # being handled, or past the one a step raised on.
                values = cols.values
                if type(values) is not list:
                    values = list(values)
                start = self._cpos
                it = iter(values)
                if start:
                    it.__setstate__(start)
                self._cn = len(values)
                self._cit = it
                self._window_key = NO_KEY
                in_slice = IN_SLICE
                # this loop's own steps run inline; steps added since it began go
                # through the chain's one_value
                one = None if self._chain is chain else self._chain.one_value
                # up to a turn's budget of values at a time; nothing is checked after a
                # value: a push_back or a read that takes the slice stops the iterator
                while left := length_hint(it):
                    if one is None:
                        for value in islice(it, budget):
                            self._current = None
                            self._held = in_slice
{steps}
                            yield value
                    else:
                        for value in islice(it, budget):
                            self._current = None
                            self._held = in_slice
                            value = one(value)
                            if value is skip:
                                continue
                            yield value
                    if self._cit is not it:
                        break  # the slice was taken from the loop
                    budget -= left - length_hint(it)
                    if budget <= 0:  # the writer and the other lanes get a turn
                        budget = stream.TURN_EVERY
                        await asyncio.sleep(0)
                continue
            try:
                value = await self.__anext__()
            except StopAsyncIteration:
                return
            yield value

    return values
'''

_makers: dict[tuple[int, ...], Callable[..., ItemLoop]] = {}
"""The generated loop per sequence of step kinds (a handful per app)."""


def item_loop(chain: Chain) -> ItemLoop:
    """The per-item loop for a stream whose steps are ``chain``'s (see the module docstring).

    For a chain with steps other than ``map`` and ``filter`` (its values need
    their events) the loop takes the lane's events and calls the chain on
    each, as it always did: only ``map``/``filter`` chains go by values.

    Example:
        >>> from asyncflow.testing import stream_of
        >>> import asyncio
        >>> s = stream_of(["a", "bb", "ccc"]).filter(lambda v: len(v) > 1).map(str.upper)
        >>> async def demo():
        ...     return [(v, s.current.offset) async for v in item_loop(s._chain)(s)]
        >>> asyncio.run(demo())
        [('BB', 1), ('CCC', 2)]
    """
    kinds: tuple[int, ...] = ()
    fns: tuple[Callable[..., Any], ...] = ()
    if chain.one_value is not None:  # else no loop over values: nothing to inline
        kinds = tuple(kind for kind, _ in chain.steps)
        fns = tuple(fn for _, fn in chain.steps)
    make = _makers.get(kinds)
    if make is None:
        make = _makers[kinds] = _compile(kinds)
    return make(chain, *fns)


def _compile(kinds: tuple[int, ...]) -> Callable[..., ItemLoop]:
    """Generate ``make(chain, f0, ...) -> loop`` for a sequence of ``map``/``filter`` kinds."""
    from asyncflow import stream  # its sentinels; it imports this module

    indent = " " * 28
    steps = []
    for i, kind in enumerate(kinds):
        if kind == MAP:
            steps.append(f"{indent}value = f{i}(value)")
        elif kind == FILTER:
            steps += [f"{indent}if not f{i}(value):", f"{indent}    continue"]
        else:  # pragma: no cover - item_loop passes map/filter chains only
            raise ValueError(f"step kind {kind} does not run on values alone")
    params = ", ".join(f"f{i}" for i in range(len(kinds))) or "*_"
    code = _TEMPLATE.format(params=params, steps="\n".join(steps) or f"{indent}pass")
    env: dict[str, Any] = {
        "SKIP": SKIP, "stream": stream, "NO_KEY": stream._NO_KEY,
        "IN_SLICE": stream._IN_SLICE, "LaneSlice": LaneSlice, "islice": islice,
        "length_hint": length_hint, "asyncio": asyncio,
    }
    namespace: dict[str, Any] = {}
    exec(compile(code, f"<item loop {kinds}>", "exec"), env, namespace)  # noqa: S102
    make: Callable[..., ItemLoop] = namespace["make"]
    return make
