"""Fused operator chains: a lane's map/filter/key_by/stateful_map steps as one function.

``stream.map(f).filter(g)`` adds steps to the lane's chain; before the loop
runs, the synchronous steps are compiled into straight-line Python, the way
``dataclasses`` and ``namedtuple`` build their methods: no loop over the
steps, no dispatch on their kind, one call per event (``one``) or one call per
lane slice (``many``; ``columns`` for a slice's values alone, and ``one_value``
for one value alone, when every step is a ``map`` or a ``filter``). They keep
the chain's rules:

- a ``filter`` that says no, or a ``stateful_map`` step that returns ``None``,
  drops the event (``SKIP`` from ``one``);
- a ``key_by`` that changes the key makes a new ``Event`` (same position), and
  the stream's current event becomes it, so state and windows see the new key;
- ``stateful_map`` steps read the state of the stream's current event, which
  is set before they run;
- if a step raises, the event it raised on becomes the stream's current (and
  held) event, for the agent's error policy, and the error goes on up.

Example:
    >>> from asyncflow.event import Event
    >>> from types import SimpleNamespace
    >>> chain = compile_chain(((MAP, lambda v: v * 10), (FILTER, lambda v: v > 10)))
    >>> stream = SimpleNamespace(current=None, _held=None, _failed_src=None)
    >>> chain.one(stream, Event("k", 1)) is SKIP, chain.one(stream, Event("k", 2))
    (True, 20)
    >>> values, done = [], []
    >>> chain.many(stream, [Event("k", n) for n in range(4)], values, done)
    >>> values
    [20, 30]
    >>> out, dropped = [], []
    >>> chain.columns(stream, [0, 1, 2, 3], out, dropped)
    >>> out, dropped, kept_indices(4, dropped)
    ([20, 30], [0, 1], [2, 3])
    >>> chain.one_value(1) is SKIP, chain.one_value(3)
    (True, 30)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from asyncflow.event import Event

MAP, AMAP, FILTER, AFILTER, KEY, STATEFUL = range(6)
"""The kinds of step; the ``A`` ones are async and run outside a compiled chain."""

SYNC_KINDS = frozenset((MAP, FILTER, KEY, STATEFUL))

SKIP: Any = object()
"""What ``Chain.one`` returns for an event the chain dropped."""

Step = tuple[int, Callable[..., Any]]


class Chain:
    """The compiled form of a chain of synchronous steps.

    ``one(stream, event)`` returns the event's value after every step, or
    ``SKIP``. ``many(stream, events, values, done)`` runs the chain over a lane
    slice, appending each surviving value to ``values`` and its event to
    ``done``; when a step raises, ``stream._failed_src`` is the slice's event
    it raised on (so the rest of the slice can be handed back).

    Example:
        >>> compile_chain(()).one(None, Event("k", 5))
        5
    """

    __slots__ = ("columns", "many", "one", "one_value", "steps")

    def __init__(
        self,
        steps: tuple[Step, ...],
        one: Callable[[Any, Event[Any]], Any],
        many: Callable[[Any, list[Event[Any]], list[Any], list[Event[Any]]], None],
        columns: Callable[[Any, Sequence[Any], list[Any], list[int]], None] | None = None,
        one_value: Callable[[Any], Any] | None = None,
    ) -> None:
        self.steps = steps
        self.one = one
        self.many = many
        self.columns = columns
        """For chains of ``map`` and ``filter`` only: ``columns(stream, values, out, dropped)``
        runs the chain over a slice's values alone (no events), appending each surviving
        value to ``out`` and the index of each value a filter dropped to ``dropped`` (the
        indices count from the first of ``values``; ``kept_indices`` gives the others).
        Filters let most values through, so the rare case keeps the books: the loop
        itself counts nothing. When a step raises, ``stream._failed_index`` is the index
        it raised on. ``None`` for chains whose steps need the event (``key_by``,
        ``stateful_map``)."""
        self.one_value = one_value
        """For the same chains as ``columns``: ``one_value(value)``, one value through the
        chain (``SKIP`` if a filter dropped it). The per-item loop runs its own steps
        inline (``asyncflow.item_loop``) and calls this for steps added while it runs.
        A step that raises raises through it: the caller knows which value it was."""


def compile_chain(steps: tuple[Step, ...]) -> Chain:
    """Compile synchronous ``(kind, fn)`` steps into a ``Chain`` (see the module docstring).

    The code is generated once per sequence of kinds and cached; the
    functions are bound to it per call, so an agent body that adds its steps
    again after an error (new lambdas each time) costs a closure, not a compile.

    Example:
        >>> chain = compile_chain(((KEY, len),))
        >>> class S: current = _held = _failed_src = None
        >>> chain.one(S, Event(None, "abc")), S.current.key
        ('abc', 3)
    """
    kinds = tuple(kind for kind, _ in steps)
    if any(kind not in SYNC_KINDS for kind in kinds):
        raise ValueError("only synchronous steps compile; async ones run one event at a time")
    factory = _factories.get(kinds)
    if factory is None:
        factory = _factories[kinds] = _factory(kinds)
    one, many, columns, one_value = factory(*(fn for _, fn in steps))
    return Chain(steps, one, many, columns, one_value)


_factories: dict[tuple[int, ...], Callable[..., tuple[Any, Any, Any, Any]]] = {}
"""Generated code per sequence of step kinds (a handful per app)."""


def _factory(kinds: tuple[int, ...]) -> Callable[..., tuple[Any, Any, Any, Any]]:
    """Generate ``make(f0, ...) -> (one, many, columns, one_value)`` for step kinds."""
    rekeys = KEY in kinds
    stateful = STATEFUL in kinds

    def body(drop: str, indent: str) -> list[str]:
        lines = []
        for i, kind in enumerate(kinds):
            name = f"f{i}"
            if kind == MAP:
                lines.append(f"{indent}value = {name}(value)")
            elif kind == FILTER:
                lines.append(f"{indent}if not {name}(value): {drop}")
            elif kind == KEY:
                lines += [
                    f"{indent}key = {name}(value)",
                    f"{indent}if key is not ev.key:",
                    f"{indent}    ev = Event(key, value, ev.time, ev.headers, ev.partition, ev.offset)",
                    f"{indent}    stream._held = stream.current = ev",
                ]
            else:  # STATEFUL
                lines += [f"{indent}value = {name}(value)", f"{indent}if value is None: {drop}"]
        return lines

    params = ", ".join(f"f{i}" for i in range(len(kinds)))
    drop_index = "dropped.append(len(out) + len(dropped) - base); continue"
    code = [
        f"def make({params}):",
        "    def one(stream, ev):",
        "        try:",
        "            value = ev.value",
        *body("return SKIP", "            "),
        "        except BaseException:",
        "            stream._held = stream.current = ev",
        "            raise",
        "        return value",
        "",
        "    def many(stream, events, values, done):",
        "        add_value = values.append",
        "        add_event = done.append",
        "        src = None",
        "        try:",
        "            for src in events:",
        "                ev = src",
        *(["                stream.current = ev"] if stateful or rekeys else []),
        "                value = ev.value",
        *body("continue", "                "),
        "                add_value(value)",
        "                add_event(ev)",
        "        except BaseException:",
        "            stream._held = stream.current = ev",
        "            stream._failed_src = src",
        "            raise",
        "",
        *(
            [
                "    columns = one_value = None",
            ]
            if stateful or rekeys
            else [
                # a value's index is how many went to out or dropped before it
                "    def columns(stream, values, out, dropped):",
                "        base = len(out) + len(dropped)",
                "        try:",
                "            for value in values:",
                *body(drop_index, "                "),
                "                out.append(value)",
                "        except BaseException:",
                "            stream._failed_index = len(out) + len(dropped) - base",
                "            raise",
                "",
                "    def one_value(value):",
                *body("return SKIP", "        "),
                "        return value",
            ]
        ),
        "",
        "    return one, many, columns, one_value",
    ]
    namespace: dict[str, Any] = {}
    env: dict[str, Any] = {"Event": Event, "SKIP": SKIP}
    exec(compile("\n".join(code) + "\n", f"<chain {kinds}>", "exec"), env, namespace)  # noqa: S102
    make: Callable[..., tuple[Any, Any, Any, Any]] = namespace["make"]
    return make


def kept_indices(n: int, dropped: Sequence[int]) -> list[int]:
    """The indices ``0 .. n-1`` that are not in ``dropped`` (ascending, as a chain fills it).

    Example:
        >>> kept_indices(6, [0, 3, 4])
        [1, 2, 5]
    """
    kept: list[int] = []
    start = 0
    for i in dropped:
        kept += range(start, i)
        start = i + 1
    kept += range(start, n)
    return kept


def last_kept(n: int, dropped: Sequence[int]) -> int:
    """The last of ``0 .. n-1`` not in ``dropped`` (ascending); ``-1`` if every one is.

    Example:
        >>> last_kept(5, [1, 3, 4]), last_kept(3, []), last_kept(2, [0, 1])
        (2, 2, -1)
    """
    last = n - 1
    j = len(dropped) - 1
    while j >= 0 and dropped[j] == last:
        last -= 1
        j -= 1
    return last


NO_STEPS = compile_chain(())
"""The chain of a stream with no steps (values pass through)."""
