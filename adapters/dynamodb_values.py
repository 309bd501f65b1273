"""DynamoDB attribute values: exact conversion of Python values, both ways.

A float is stored as the decimal of its shortest ``repr`` (``0.1`` becomes
``0.1``, which reads back as the same float); datetimes, dates and times become
ISO-8601 strings; mappings, lists and sets become maps, lists and sets. NaN,
infinities, numbers outside DynamoDB's range, empty sets and unknown types
raise ``InvalidItemValue`` naming the field (``DynamoDBSink`` returns such a
record as ``Rejected`` with that message, and writes the rest of the batch).

Example:
    >>> to_attribute({"average": 0.1, "n": 3}, "value")
    {'M': {'average': {'N': '0.1'}, 'n': {'N': '3'}}}
    >>> from_attribute({"N": "0.1"})
    Decimal('0.1')
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from asyncflow.errors import SinkError


class InvalidItemValue(SinkError):
    """A value cannot be stored in DynamoDB (NaN, infinity, out of range, unknown type).

    Example:
        >>> str(InvalidItemValue("average", "nan is not a number DynamoDB can store"))
        "field 'average': nan is not a number DynamoDB can store"
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"field {path!r}: {problem}")
        self.path = path
        self.problem = problem


def _number(value: Decimal, path: str) -> str:
    if not value.is_finite():
        raise InvalidItemValue(
            path, f"{value} is not a number DynamoDB can store; filter or replace NaN/inf first"
        )
    if value.is_zero():
        return "0"
    significant = len(bytes(value.as_tuple().digits).rstrip(b"\0"))
    if significant > 38 or not -130 <= value.adjusted() <= 125:
        raise InvalidItemValue(
            path,
            f"{value} is outside DynamoDB's numbers (38 significant digits, 1E-130..9.9E+125); "
            "store it as a string instead",
        )
    return str(value)


def to_attribute(value: Any, path: str = "value") -> dict[str, Any]:
    """Convert a Python value to a DynamoDB ``AttributeValue`` (low-level client format).

    ``path`` names the field in error messages.

    Example:
        >>> to_attribute([1.5, "a", None, True])
        {'L': [{'N': '1.5'}, {'S': 'a'}, {'NULL': True}, {'BOOL': True}]}
        >>> to_attribute(datetime(2024, 2, 6, 16, 58, 8))
        {'S': '2024-02-06T16:58:08'}
    """
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, enum.Enum):
        return to_attribute(value.value, path)
    if isinstance(value, int):
        return {"N": _number(Decimal(value), path)}
    if isinstance(value, float):
        return {"N": _number(Decimal(repr(value)), path)}
    if isinstance(value, Decimal):
        return {"N": _number(value, path)}
    if isinstance(value, datetime | date | time):
        return {"S": value.isoformat()}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"B": bytes(value)}
    if isinstance(value, uuid.UUID):
        return {"S": str(value)}
    if isinstance(value, Mapping):
        return {"M": {str(k): to_attribute(v, f"{path}.{k}") for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [to_attribute(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, set | frozenset):
        return _set_attribute(value, path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_attribute(dataclasses.asdict(value), path)
    raise InvalidItemValue(
        path, f"values of type {type(value).__name__} cannot be stored; convert them first"
    )


def _set_attribute(value: set[Any] | frozenset[Any], path: str) -> dict[str, Any]:
    if not value:
        raise InvalidItemValue(path, "DynamoDB cannot store an empty set; use a list or omit it")
    if all(isinstance(v, str) for v in value):
        return {"SS": sorted(value)}
    if all(isinstance(v, bytes) for v in value):
        return {"BS": sorted(value)}
    if all(isinstance(v, int | float | Decimal) and not isinstance(v, bool) for v in value):
        return {"NS": [to_attribute(v, path)["N"] for v in value]}
    raise InvalidItemValue(path, "a set must hold only strings, only numbers or only bytes")


def from_attribute(attr: Mapping[str, Any]) -> Any:
    """Convert a DynamoDB ``AttributeValue`` back to Python (numbers as exact ``Decimal``).

    Example:
        >>> from_attribute({"M": {"x": {"N": "0.1"}, "t": {"L": [{"S": "a"}]}}})
        {'x': Decimal('0.1'), 't': ['a']}
    """
    ((kind, raw),) = attr.items()
    if kind == "N":
        return Decimal(raw)
    if kind in ("S", "B", "BOOL"):
        return raw
    if kind == "NULL":
        return None
    if kind == "M":
        return {k: from_attribute(v) for k, v in raw.items()}
    if kind == "L":
        return [from_attribute(v) for v in raw]
    if kind == "NS":
        return {Decimal(v) for v in raw}
    if kind in ("SS", "BS"):
        return set(raw)
    raise ValueError(f"unknown DynamoDB attribute type {kind!r}")


def item_from_dynamodb(item: Mapping[str, Any]) -> dict[str, Any]:
    """Convert an item as ``GetItem`` / ``Scan`` return it to a plain dict.

    Example:
        >>> item_from_dynamodb({"id": {"S": "a"}, "average": {"N": "20.5"}})
        {'id': 'a', 'average': Decimal('20.5')}
    """
    return {k: from_attribute(v) for k, v in item.items()}
