"""Errors that say what went wrong and what to do about it, and never show a secret.

Every error the worker reports to a user derives from ``AsyncflowError``; the
CLI prints its message on one line and exits non-zero, without a traceback.

Secrets stay out of messages: ``redact_url`` is the one helper that hides the
password of a URL's userinfo (``user:***@host``, with or without a scheme) and
the values of secret query options (``password``, ``secret``, ``token``...);
``redact_text`` applies it to every URL-like part of a text. Every
``AsyncflowError`` message goes through ``redact_text``, and so does every log
record the CLI writes (``RedactingFilter``).

Example:
    >>> str(BrokerUnavailable("kafka://127.0.0.1:1", "connection refused"))
    'cannot reach broker kafka://127.0.0.1:1: connection refused (is it running? check --broker / ASYNCFLOW_BROKER)'
    >>> str(BrokerUnavailable("kafka://alice:hunter2@127.0.0.1:1", "refused"))[:49]
    'cannot reach broker kafka://alice:***@127.0.0.1:1'
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any
from urllib.parse import parse_qsl

SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "credential", "signature")
"""An option whose name contains one of these holds a secret (``sasl_plain_password``...)."""
SECRET_NAMES = frozenset({"key", "api_key", "apikey", "access_key", "sig", "auth", "pass"})
"""Option names that are secrets as a whole word."""
MASK = "***"

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}.,;:]")
_USERINFO = re.compile(r"(?<![\w/%@.:\-+])([\w.%+\-~!$&*]+):([^\s/@'\"<>]+)@(?=[\w\[])")
_QUERY_SECRET = re.compile(r"([?&;])([\w.\-]+)=([^&\s'\"<>#]*)")


def is_secret_name(name: str) -> bool:
    """Whether an option or field named ``name`` holds a secret.

    Example:
        >>> is_secret_name("sasl_plain_password"), is_secret_name("ssl_keyfile")
        (True, False)
    """
    low = name.lower()
    return low in SECRET_NAMES or any(word in low for word in SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` with its userinfo password and secret query values replaced by ``***``.

    Works on URLs without a scheme too (``alice:pw@host:9092``), so a mistyped
    URL can be quoted in a message.

    Example:
        >>> redact_url("kafka://alice:hunter2@k:9092?sasl_plain_password=x&client_id=a")
        'kafka://alice:***@k:9092?sasl_plain_password=***&client_id=a'
        >>> redact_url("alice:hunter2@k:9092")
        'alice:***@k:9092'
    """
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:{MASK}@{hosts}" if colon else authority
    head, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        try:
            pairs = parse_qsl(query, keep_blank_values=True)
        except ValueError:  # pragma: no cover - parse_qsl is lenient unless strict
            pairs = []
        if any(is_secret_name(k) for k, _ in pairs):
            query = _QUERY_SECRET.sub(_mask_option, "?" + query)[1:]
        tail = f"{head}?{query}{hash_}{fragment}"
    return f"{scheme}{sep}{authority}{tail}"


def _mask_option(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2]}={MASK}" if is_secret_name(m[2]) else m[0]


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through ``redact_url``; bare ``user:pw@host`` too.

    Secret options outside a URL (``host:9092?ssl_password=x``) are masked as well.

    Example:
        >>> redact_text("broker URL 'bob:s3cret@h:1' has no scheme")
        "broker URL 'bob:***@h:1' has no scheme"
        >>> redact_text("nothing to hide")
        'nothing to hide'
    """
    if "@" not in text and "=" not in text:
        return text
    text = _URL.sub(lambda m: redact_url(m[0]), text)
    if "=" in text:
        text = _QUERY_SECRET.sub(_mask_option, text)
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m[1]}:{MASK}@", text)
    return text


def redacted_repr(settings: Any) -> str:
    """``repr`` of a settings dataclass with secrets masked and URLs redacted.

    A field whose name holds a secret (``is_secret_name``) shows ``***``; a
    field whose name ends in ``url`` goes through ``redact_url``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Login:
        ...     user: str
        ...     password: str
        ...     endpoint_url: str
        >>> redacted_repr(Login("bob", "hunter2", "http://bob:pw@h"))
        "Login(user='bob', password='***', endpoint_url='http://bob:***@h')"
    """
    shown = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None and is_secret_name(f.name):
            value = MASK
        elif isinstance(value, str) and f.name.endswith("url"):
            value = redact_url(value)
        shown.append(f"{f.name}={value!r}")
    return f"{type(settings).__name__}({', '.join(shown)})"


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message through ``redact_text``.

    Example:
        >>> r = logging.LogRecord("x", logging.INFO, "", 0, "at %s", ("kafka://a:pw@h",), None)
        >>> RedactingFilter().filter(r), r.getMessage()
        (True, 'at kafka://a:***@h')
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class AsyncflowError(Exception):
    """Base of every error asyncflow reports to users; its message never shows a secret.

    Example:
        >>> str(AsyncflowError("cannot reach kafka://app:s3cret@broker:9092"))
        'cannot reach kafka://app:***@broker:9092'
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class ConfigError(AsyncflowError):
    """A setting, URL or argument is wrong; the message names it and the accepted forms.

    Example:
        >>> import asyncflow as af
        >>> try:
        ...     af.App("a", lane_capacity=0)
        ... except af.ConfigError as exc:
        ...     print("lane_capacity" in str(exc))
        True
    """


class BrokerUnavailable(AsyncflowError):
    """The broker or service could not be reached.

    Example:
        >>> err = BrokerUnavailable("kafka://u:pw@localhost:9092", "connection refused")
        >>> err.url, err.reason
        ('kafka://u:***@localhost:9092', 'connection refused')
    """

    def __init__(self, url: str, reason: str) -> None:
        url = redact_url(url)
        super().__init__(
            f"cannot reach broker {url}: {reason} (is it running? check --broker / ASYNCFLOW_BROKER)"
        )
        self.url = url
        self.reason = reason


class TopicMissing(AsyncflowError):
    """A topic does not exist and creating it is not allowed.

    Example:
        >>> TopicMissing("orders", "kafka://localhost:9092").topic
        'orders'
    """

    def __init__(self, topic: str, url: str) -> None:
        super().__init__(
            f"topic {topic!r} does not exist on {redact_url(url)}; create it "
            f"(`asyncflow topics create {topic} --partitions N`) or declare it with create=True"
        )
        self.topic = topic


class SinkError(AsyncflowError):
    """A sink could not write a batch after its retries; the worker stops without acking it.

    Example:
        >>> isinstance(SinkError("table 'avg': throttled 8 times"), AsyncflowError)
        True
    """


class DecodeError(AsyncflowError):
    """A record is not valid for its topic's type: malformed bytes or a field of the wrong type.

    Example:
        >>> from asyncflow.codecs import JsonCodec
        >>> try:
        ...     JsonCodec().decode(b"{oops")
        ... except DecodeError as exc:
        ...     print(str(exc).split(":")[0])
        malformed JSON
    """


class AgentError(AsyncflowError):
    """An agent raised and its error policy is to stop the worker.

    Example:
        >>> import asyncio, asyncflow as af
        >>> from asyncflow.testing import TestRun
        >>> app = af.App("a")
        >>> @app.agent(app.topic("in"), on_error="stop")
        ... async def fails(stream):
        ...     async for v in stream:
        ...         raise ValueError(f"cannot handle {v}")
        >>> async def main():
        ...     async with TestRun(app) as run:
        ...         await run.send_many("in", [1])
        ...         await run.finish()
        >>> try:
        ...     asyncio.run(main())
        ... except* af.AgentError as group:  # the worker's task group raises it
        ...     print(str(group.exceptions[0]).split(":")[0])
        agent 'fails' failed on key=None at TopicPartition(topic='in', partition=0)@0
    """


class PartitionRevoked(AsyncflowError):
    """An event's partition was given up (revoked or lost) while a lane was handling it.

    Raised when that event asks for the partition's state after the worker
    let it go: the event is abandoned (no output, no dead letter), since the
    partition's new owner handles it again from the last committed offset.
    ``partition`` is the partition given up.

    Example:
        >>> e = PartitionRevoked("p3", "partition p3 was given up")
        >>> e.partition, str(e)
        ('p3', 'partition p3 was given up')
    """

    def __init__(self, partition: Any, message: str) -> None:
        super().__init__(message)
        self.partition = partition


class CommitFailed(AsyncflowError):
    """``Source.commit`` could not commit, for a reason that may pass; nothing of it counts as done.

    The broker is unreachable, or did not answer in time. The checkpointer
    keeps the positions uncommitted and commits them again at its next
    checkpoint. (A commit refused because the partitions moved to another
    member is not this: the source logs it and returns, since their new
    owner replays from the last commit.)

    Example:
        >>> str(CommitFailed("committing offsets of group g got no answer within 40 s"))
        'committing offsets of group g got no answer within 40 s'
    """
