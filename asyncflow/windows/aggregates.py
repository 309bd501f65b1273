"""Window aggregates: what a window computes from its events, one event at a time.

An aggregate makes an empty accumulator (``create``), folds one value into it
(``add``, which returns the accumulator: it may be a new immutable value or the
same mutable one), combines two accumulators when session windows merge
(``merge``) and turns the accumulator into the window's result (``result``).

``field`` picks what to aggregate from each value: an attribute name (for
objects, and the key for dicts), a callable, or ``None`` for the whole value.
Like SQL, ``Sum``, ``Mean``, ``Min`` and ``Max`` skip ``None`` values; ``Count``
counts events.

A dict of aggregates is one aggregate whose result is a dict.

Example:
    >>> agg = as_aggregate({"avg": Mean("v"), "n": Count()})
    >>> acc = agg.create()
    >>> for t, v in enumerate([1.0, 2.0, 6.0]):
    ...     acc = agg.add(acc, {"v": v}, t)
    >>> agg.result(acc)
    {'avg': 3.0, 'n': 3}
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from operator import attrgetter, itemgetter
from typing import Any, Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

Field = str | Callable[[Any], Any] | None
"""An attribute name (or dict key), a function of the value, or ``None`` for the value itself."""


class Aggregate(Generic[A, R]):
    """The aggregate protocol; subclass it to write your own.

    ``add`` receives the event time too (epoch ms), for aggregates that depend
    on order in event time. ``mergeable`` is ``False`` for aggregates that
    cannot combine accumulators (they do not work with session windows).

    Example:
        >>> class Span(Aggregate[list[int], int]):
        ...     def create(self): return []
        ...     def add(self, acc, value, time_ms): acc.append(time_ms); return acc
        ...     def merge(self, a, b): return a + b
        ...     def result(self, acc): return max(acc) - min(acc)
        >>> s = Span(); acc = s.create()
        >>> for t in (5, 1, 9): acc = s.add(acc, None, t)
        >>> s.result(acc)
        8
    """

    __slots__ = ()

    mergeable: bool = True

    def create(self) -> A:
        """A new, empty accumulator."""
        raise NotImplementedError

    def add(self, acc: A, value: Any, time_ms: int) -> A:
        """Fold one event's value into ``acc``; return the accumulator."""
        raise NotImplementedError

    def merge(self, a: A, b: A) -> A:
        """Combine two accumulators (``a`` is the earlier window)."""
        raise NotImplementedError

    def result(self, acc: A) -> R:
        """The window's value."""
        raise NotImplementedError

    def loaded(self, acc: Any) -> A:
        """An accumulator as JSON brought it back from state (a restore): make it usable again.

        The default keeps it as it is (numbers, lists and dicts come back the
        same); override it when ``add`` needs another shape back.
        """
        result: A = acc
        return result


def _fast_getter(field: Field) -> Callable[[Any], Any] | None:
    if field is None:
        return None
    if isinstance(field, str):
        return itemgetter(field)  # dicts; _FieldAggregate._read switches for other values
    if callable(field):
        return field
    raise TypeError(f"field must be an attribute name, a callable or None, got {field!r}")


class _FieldAggregate(Aggregate[A, R]):
    """An aggregate over one field of each value.

    A name field is read with ``operator.itemgetter`` (C speed) until a value
    is not a mapping; from then on with ``operator.attrgetter``, and back again
    if a mapping comes. Each ``add`` does::

        get = self._get
        try:
            x = value if get is None else get(value)
        except (TypeError, AttributeError):
            x = self._read(value)
    """

    __slots__ = ("_field", "_get")

    def __init__(self, field: Field = None) -> None:
        self._field = field
        self._get = _fast_getter(field)

    def _read(self, value: Any) -> Any:
        field = self._field
        if not isinstance(field, str):
            assert field is not None
            return field(value)  # a callable's own error: let it raise again
        self._get = itemgetter(field) if isinstance(value, Mapping) else attrgetter(field)
        return self._get(value)


class Count(Aggregate[int, int]):
    """The number of events in the window.

    Example:
        >>> c = Count(); c.result(c.add(c.add(c.create(), "a", 0), "b", 1))
        2
    """

    __slots__ = ()

    def create(self) -> int:
        return 0

    def add(self, acc: int, value: Any, time_ms: int) -> int:
        return acc + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, acc: int) -> int:
        return acc


class Sum(_FieldAggregate[Any, Any]):
    """The sum of ``field`` over the window (0 when every value is ``None``).

    Example:
        >>> s = Sum("n"); s.result(s.add(s.add(s.create(), {"n": 2}, 0), {"n": 3}, 1))
        5
    """

    __slots__ = ()

    def create(self) -> Any:
        return 0

    def add(self, acc: Any, value: Any, time_ms: int) -> Any:
        get = self._get
        try:
            x = value if get is None else get(value)
        except (TypeError, AttributeError):
            x = self._read(value)
        return acc if x is None else acc + x

    def merge(self, a: Any, b: Any) -> Any:
        return a + b

    def result(self, acc: Any) -> Any:
        return acc


class Mean(_FieldAggregate[list[Any], Any]):
    """The arithmetic mean of ``field`` (``None`` when every value is ``None``).

    Example:
        >>> m = Mean(); m.result(m.add(m.add(m.create(), 1, 0), 4, 1))
        2.5
    """

    __slots__ = ()

    def create(self) -> list[Any]:
        return [0, 0]

    def add(self, acc: list[Any], value: Any, time_ms: int) -> list[Any]:
        get = self._get
        try:
            x = value if get is None else get(value)
        except (TypeError, AttributeError):
            x = self._read(value)
        if x is not None:
            acc[0] += x
            acc[1] += 1
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [a[0] + b[0], a[1] + b[1]]

    def result(self, acc: list[Any]) -> Any:
        return acc[0] / acc[1] if acc[1] else None


class Min(_FieldAggregate[Any, Any]):
    """The smallest ``field`` value in the window (``None`` when there is none).

    Example:
        >>> m = Min("t"); m.result(m.add(m.add(m.create(), {"t": 3}, 0), {"t": 1}, 1))
        1
    """

    __slots__ = ()

    def create(self) -> Any:
        return None

    def add(self, acc: Any, value: Any, time_ms: int) -> Any:
        get = self._get
        try:
            x = value if get is None else get(value)
        except (TypeError, AttributeError):
            x = self._read(value)
        return x if acc is None or (x is not None and x < acc) else acc

    def merge(self, a: Any, b: Any) -> Any:
        return b if a is None or (b is not None and b < a) else a

    def result(self, acc: Any) -> Any:
        return acc


class Max(_FieldAggregate[Any, Any]):
    """The largest ``field`` value in the window (``None`` when there is none).

    Example:
        >>> m = Max(); m.result(m.add(m.add(m.create(), 3, 0), 1, 1))
        3
    """

    __slots__ = ()

    def create(self) -> Any:
        return None

    def add(self, acc: Any, value: Any, time_ms: int) -> Any:
        get = self._get
        try:
            x = value if get is None else get(value)
        except (TypeError, AttributeError):
            x = self._read(value)
        return x if acc is None or (x is not None and x > acc) else acc

    def merge(self, a: Any, b: Any) -> Any:
        return b if a is None or (b is not None and b > a) else a

    def result(self, acc: Any) -> Any:
        return acc


# First/Last keep (event time, arrival number, value); the arrival number breaks
# ties in event time by arrival order, also across merged session windows.


def _load_stamped(agg: Any, acc: Any) -> _Stamped:
    """A First/Last accumulator back from state: a tuple again, and new arrivals after it."""
    if acc is None:
        return None
    stamped = (int(acc[0]), int(acc[1]), acc[2])
    ahead = next(agg._arrivals)
    agg._arrivals = itertools.count(max(ahead, stamped[1] + 1))
    return stamped
_Stamped = tuple[int, int, Any] | None


class First(_FieldAggregate[_Stamped, Any]):
    """``field`` of the event with the earliest event time; on a tie, the one that arrived first.

    Example:
        >>> f = First("v"); acc = f.create()
        >>> for t, v in [(5, "b"), (2, "a"), (2, "late tie")]: acc = f.add(acc, {"v": v}, t)
        >>> f.result(acc)
        'a'
    """

    __slots__ = ("_arrivals",)

    def __init__(self, field: Field = None) -> None:
        super().__init__(field)
        self._arrivals = itertools.count()

    def create(self) -> _Stamped:
        return None

    def add(self, acc: _Stamped, value: Any, time_ms: int) -> _Stamped:
        if acc is None or time_ms < acc[0]:
            get = self._get
            try:
                x = value if get is None else get(value)
            except (TypeError, AttributeError):
                x = self._read(value)
            return (time_ms, next(self._arrivals), x)
        return acc

    def merge(self, a: _Stamped, b: _Stamped) -> _Stamped:
        if a is None:
            return b
        return a if b is None or a[:2] < b[:2] else b

    def result(self, acc: _Stamped) -> Any:
        return None if acc is None else acc[2]

    def loaded(self, acc: Any) -> _Stamped:
        return _load_stamped(self, acc)


class Last(_FieldAggregate[_Stamped, Any]):
    """``field`` of the event with the latest event time; on a tie, the one that arrived last.

    Example:
        >>> f = Last(); acc = f.create()
        >>> for t, v in [(5, "b"), (9, "c"), (9, "d")]: acc = f.add(acc, v, t)
        >>> f.result(acc)
        'd'
    """

    __slots__ = ("_arrivals",)

    def __init__(self, field: Field = None) -> None:
        super().__init__(field)
        self._arrivals = itertools.count()

    def create(self) -> _Stamped:
        return None

    def add(self, acc: _Stamped, value: Any, time_ms: int) -> _Stamped:
        if acc is None or time_ms >= acc[0]:
            get = self._get
            try:
                x = value if get is None else get(value)
            except (TypeError, AttributeError):
                x = self._read(value)
            return (time_ms, next(self._arrivals), x)
        return acc

    def merge(self, a: _Stamped, b: _Stamped) -> _Stamped:
        if a is None:
            return b
        return a if b is None or a[:2] > b[:2] else b

    def result(self, acc: _Stamped) -> Any:
        return None if acc is None else acc[2]

    def loaded(self, acc: Any) -> _Stamped:
        return _load_stamped(self, acc)


class Collect(_FieldAggregate[list[Any], list[Any]]):
    """The window's ``field`` values as a list, in arrival order.

    After session windows merge, the earlier session's values come first.

    Example:
        >>> c = Collect(); c.result(c.add(c.add(c.create(), "x", 0), "y", 1))
        ['x', 'y']
    """

    __slots__ = ()

    def create(self) -> list[Any]:
        return []

    def add(self, acc: list[Any], value: Any, time_ms: int) -> list[Any]:
        get = self._get
        try:
            acc.append(value if get is None else get(value))
        except (TypeError, AttributeError):
            acc.append(self._read(value))
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return a + b

    def result(self, acc: list[Any]) -> list[Any]:
        return list(acc)  # a snapshot: a window that fires again must not change earlier results


class _Fold(Aggregate[A, A]):
    __slots__ = ("_builder", "_folder", "_merger", "mergeable")

    def __init__(
        self,
        builder: Callable[[], A],
        folder: Callable[[A, Any], A],
        merger: Callable[[A, A], A] | None,
    ) -> None:
        self._builder = builder
        self._folder = folder
        self._merger = merger
        self.mergeable = merger is not None

    def create(self) -> A:
        return self._builder()

    def add(self, acc: A, value: Any, time_ms: int) -> A:
        return self._folder(acc, value)

    def merge(self, a: A, b: A) -> A:
        if self._merger is None:
            raise TypeError("this fold has no merger, so its windows cannot merge")
        return self._merger(a, b)

    def result(self, acc: A) -> A:
        return acc


def fold(
    builder: Callable[[], A],
    folder: Callable[[A, Any], A],
    merger: Callable[[A, A], A] | None = None,
) -> Aggregate[A, A]:
    """An aggregate from a starting value and a step function (Bytewax's ``fold_window``).

    ``folder(acc, value)`` returns the new accumulator. Session windows also
    need ``merger(a, b)``, which combines two accumulators. The result is the
    accumulator itself: when a window can emit more than once (``emit="updates"``,
    allowed lateness), return new values from ``folder`` rather than mutating
    the accumulator, or earlier results change with it.

    Example:
        >>> uniq = fold(set, lambda s, v: s | {v}, merger=lambda a, b: a | b)
        >>> acc = uniq.create()
        >>> for v in "abca": acc = uniq.add(acc, v, 0)
        >>> sorted(uniq.result(acc))
        ['a', 'b', 'c']
    """
    return _Fold(builder, folder, merger)


_EMPTY: Any = object()


class _Reduce(Aggregate[Any, Any]):
    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self._fn = fn

    def create(self) -> Any:
        return _EMPTY

    def add(self, acc: Any, value: Any, time_ms: int) -> Any:
        return value if acc is _EMPTY else self._fn(acc, value)

    def merge(self, a: Any, b: Any) -> Any:
        if a is _EMPTY:
            return b
        return a if b is _EMPTY else self._fn(a, b)

    def result(self, acc: Any) -> Any:
        return None if acc is _EMPTY else acc


def reduce(fn: Callable[[Any, Any], Any]) -> Aggregate[Any, Any]:
    """An aggregate that combines the window's values pairwise, in arrival order.

    Example:
        >>> longest = reduce(lambda a, b: b if len(b) > len(a) else a)
        >>> acc = longest.create()
        >>> for w in ["to", "window", "flow"]: acc = longest.add(acc, w, 0)
        >>> longest.result(acc)
        'window'
    """
    return _Reduce(fn)


class Composite(Aggregate[list[Any], dict[str, Any]]):
    """Several aggregates over the same events; the result is a dict by name.

    Example:
        >>> c = Composite({"lo": Min(), "hi": Max()}); acc = c.create()
        >>> for v in (4, 2, 8): acc = c.add(acc, v, 0)
        >>> c.result(acc)
        {'lo': 2, 'hi': 8}
    """

    __slots__ = ("_names", "_parts", "mergeable")

    def __init__(self, parts: Mapping[str, Aggregate[Any, Any]]) -> None:
        if not parts:
            raise ValueError("a dict of aggregates needs at least one entry")
        self._names = tuple(parts)
        self._parts = tuple(as_aggregate(p) for p in parts.values())
        self.mergeable = all(p.mergeable for p in self._parts)

    def create(self) -> list[Any]:
        return [p.create() for p in self._parts]

    def add(self, acc: list[Any], value: Any, time_ms: int) -> list[Any]:
        for i, part in enumerate(self._parts):
            acc[i] = part.add(acc[i], value, time_ms)
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [p.merge(x, y) for p, x, y in zip(self._parts, a, b, strict=True)]

    def result(self, acc: list[Any]) -> dict[str, Any]:
        return {n: p.result(x) for n, p, x in zip(self._names, self._parts, acc, strict=True)}

    def loaded(self, acc: Any) -> list[Any]:
        return [p.loaded(x) for p, x in zip(self._parts, acc, strict=True)]


def as_aggregate(spec: Aggregate[Any, Any] | Mapping[str, Any]) -> Aggregate[Any, Any]:
    """An aggregate, or a dict of them composed into one.

    Example:
        >>> as_aggregate({"n": Count()}).result([3])
        {'n': 3}
    """
    if isinstance(spec, Aggregate):
        return spec
    if isinstance(spec, Mapping):
        return Composite(spec)
    raise TypeError(
        f"aggregate must be an Aggregate (Count(), Mean('value'), fold(...), ...) "
        f"or a dict of them, got {spec!r}"
    )
