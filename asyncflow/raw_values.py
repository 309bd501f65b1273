"""Values decoded in the lane: a slice's raw values, what decodes them, and where poison goes.

When nothing routes on a record's value (its key and event time come from
the record itself), the dispatcher hands a lane its values as read, and the
lane decodes them when it takes the slice from its queue, in its own turn:
the queues hold the records' bytes, not the objects made of them, and a
slice is decoded just before it is used. A slice is decoded all at once (one
loop in C). Decoding each value as the chain or the loop reaches it was
measured too, in batches() and in the per-item loop: valgrind counts fewer
instructions for it, but on the wall clock it was slower (by 10-15% for
batches of dicts), so the wall clock decided.

A record that does not decode is a dead letter with the same reason the
dispatcher gives (``decode_reason``), written when the lane reaches it, so
before the checkpoint that covers it; the rest of its slice goes on. A lane
that wrote dead letters waits while their output is full (``hold``), as the
read loop does for the dispatcher's.

Example:
    >>> from asyncflow.channels import Channel
    >>> from asyncflow.protocols import Record
    >>> dead = []
    >>> d = ValueDecoder(Channel("t"), lambda topic, p, rec, why: dead.append((rec.offset, why)))
    >>> d.decode_one(b'{"a": 1}'), d.decode_many([b"2"])
    ({'a': 1}, [2])
    >>> try:
    ...     d.decode_one(None)
    ... except DecodeError as exc:
    ...     d.poison("p0", Record(7, b"k", None), exc)
    >>> dead
    [(7, 'record has no value (tombstone)')]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from asyncflow.channels import Channel
from asyncflow.errors import DecodeError
from asyncflow.protocols import RawRecord

if TYPE_CHECKING:
    from asyncflow.writer import SinkWriter

DeadLetterRaw = Callable[[str, Hashable, RawRecord, str], None]
"""``dead_letter(topic, partition, record, reason)``: an input record that could not be decoded."""


def decode_value(decode: Callable[[bytes], Any], raw: bytes | None) -> Any:
    """``decode(raw)``, where a record without a value (a tombstone) does not decode.

    Example:
        >>> decode_value(int, b"3")
        3
    """
    if raw is None:
        raise DecodeError("record has no value (tombstone)")
    return decode(raw)


def decode_reason(exc: BaseException) -> str:
    """The dead-letter reason for a record whose decoding raised ``exc``.

    Example:
        >>> decode_reason(DecodeError("malformed JSON")), decode_reason(KeyError("id"))
        ('malformed JSON', "KeyError: 'id'")
    """
    if isinstance(exc, DecodeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class ValueDecoder:
    """Decodes one channel's raw values for its lanes; a record that does not decode is poison.

    ``decode_many`` and ``decode_one`` decode as the dispatcher would.
    ``poison`` writes the dead letter of a record ``decode_one`` raised on,
    with the reason.

    Example:
        >>> from asyncflow.channels import Channel
        >>> ValueDecoder(Channel("t"), lambda *a: None).decode_many([b"1", b"[2]"])
        [1, [2]]
    """

    __slots__ = ("channel", "dead_letter", "dead_letters_out")

    def __init__(
        self, channel: Channel[Any], dead_letter: DeadLetterRaw,
        dead_letters_out: SinkWriter | None = None,
    ) -> None:
        self.channel = channel
        self.dead_letter = dead_letter
        self.dead_letters_out = dead_letters_out
        """The writer ``dead_letter`` adds to: a lane that decoded poison waits while it is
        full (``hold``), as the read loop does for the dispatcher's."""

    async def hold(self) -> None:
        """Wait while the dead-letter output is full (a flood of poison: memory stays flat)."""
        out = self.dead_letters_out
        if out is not None and out.full:
            await out.wait_for_room()

    def decode_many(self, raws: Sequence[Any]) -> list[Any]:
        """All of ``raws`` at once; raises if any of them does not decode."""
        return self.channel.codec.decode_many(raws)  # type: ignore[attr-defined, no-any-return]

    def decode_one(self, raw: bytes | None) -> Any:
        """One value, as the dispatcher decodes it (a missing value is a tombstone)."""
        return decode_value(self.channel.codec.decode, raw)

    def poison(self, partition: Hashable, record: RawRecord, exc: BaseException) -> None:
        """``record`` does not decode (``decode_one`` raised ``exc``): its dead letter."""
        self.dead_letter(self.channel.name, partition, record, decode_reason(exc))


def can_decode_in_lane(channel: Channel[Any]) -> bool:
    """Whether ``channel``'s values may wait for the lane: nothing routes on them.

    Example:
        >>> from asyncflow.channels import Channel
        >>> can_decode_in_lane(Channel("t")), can_decode_in_lane(Channel("t", key=len))
        (True, False)
    """
    return (
        channel.key_fn is None
        and channel.time_ms is None
        and getattr(channel.codec, "decode_many", None) is not None
    )
