"""Shared plumbing of the AWS adapters: clients, retries with jitter, clear errors.

One aiobotocore client is made per source or sink (``open_client``) and kept for
its lifetime. botocore's own retries are switched off: every call goes through
``call_with_retry``, so a single, documented policy (exponential backoff with
full jitter, a bounded number of retries) applies to throttling and transient
failures alike. Errors a user can fix (no region, rejected credentials, an
unreachable endpoint) are turned into ``AsyncflowError`` s that say what to do.

Example:
    >>> Backoff(base=0.1, cap=1.0, max_retries=3, seed=1).delay(10) <= 1.0
    True
    >>> AwsOptions(region="eu-west-1").region
    'eu-west-1'
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from asyncflow.errors import (
    AsyncflowError,
    BrokerUnavailable,
    ConfigError,
    redact_url,
    redacted_repr,
)

log = logging.getLogger("adapters.aws")

T = TypeVar("T")

THROTTLING_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "LimitExceededException",
        "TooManyRequestsException",
        "KMSThrottlingException",
    }
)
"""Error codes that mean "slow down": always retried with backoff."""

TRANSIENT_CODES = frozenset(
    {
        "InternalFailure",
        "InternalServerError",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
"""Error codes of server-side hiccups: retried like throttling."""

CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "AccessDeniedException",
        "AccessDenied",
    }
)
"""Error codes meaning the credentials were rejected or lack a permission."""


class AwsUnavailable(BrokerUnavailable):
    """An AWS endpoint could not be reached (a ``BrokerUnavailable`` with an AWS hint).

    Example:
        >>> str(AwsUnavailable("kinesis", "http://127.0.0.1:1", "connection refused"))[:32]
        'cannot reach kinesis at http://1'
    """

    def __init__(self, service: str, url: str, reason: str) -> None:
        AsyncflowError.__init__(
            self,
            f"cannot reach {service} at {url}: {reason} (is the endpoint right? "
            f"check endpoint_url / AWS_ENDPOINT_URL and the region)",
        )
        self.url = url
        self.reason = reason


class AwsCredentialsError(ConfigError):
    """AWS credentials are missing or were rejected.

    Example:
        >>> isinstance(AwsCredentialsError("no credentials"), ConfigError)
        True
    """


@dataclass(frozen=True, slots=True, repr=False)
class AwsOptions:
    """Where and as whom an adapter talks to AWS; ``None`` means "from the environment".

    Unset fields follow botocore's usual chain: ``AWS_ENDPOINT_URL[_<SERVICE>]``,
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the
    shared config files.

    ``repr`` shows ``'***'`` for the secret key and the session token.

    Example:
        >>> AwsOptions(endpoint_url="http://127.0.0.1:5000", region="us-east-1").endpoint_url
        'http://127.0.0.1:5000'
        >>> "s3cret" in repr(AwsOptions(aws_access_key_id="AK", aws_secret_access_key="s3cret"))
        False
    """

    endpoint_url: str | None = None
    region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    profile: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_pool_connections: int = 16

    def __repr__(self) -> str:
        return redacted_repr(self)


def resolve_region(options: AwsOptions, session: AioSession) -> str:
    """The region to use: the option, ``AWS_REGION``, then botocore's own lookup.

    Example:
        >>> resolve_region(AwsOptions(region="ap-south-1"), AioSession())
        'ap-south-1'
    """
    region = options.region or os.environ.get("AWS_REGION")
    if not region:
        region = session.get_config_variable("region")
    if not region:
        raise ConfigError(
            "no AWS region configured: pass region=... or set AWS_REGION / AWS_DEFAULT_REGION"
        )
    return str(region)


async def open_client(stack: contextlib.AsyncExitStack, service: str, options: AwsOptions) -> Any:
    """Create one aiobotocore client for ``service``, closed when ``stack`` closes.

    Retries inside botocore are off (``call_with_retry`` does them).

    Example:
        >>> async def demo() -> None:
        ...     async with contextlib.AsyncExitStack() as stack:
        ...         client = await open_client(stack, "dynamodb", AwsOptions(region="us-east-1"))
    """
    session = AioSession(profile=options.profile) if options.profile else AioSession()
    region = resolve_region(options, session)
    config = AioConfig(
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        max_pool_connections=options.max_pool_connections,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    kwargs: dict[str, Any] = {"region_name": region, "config": config}
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    try:
        return await stack.enter_async_context(session.create_client(service, **kwargs))
    except NoRegionError as exc:  # pragma: no cover - resolve_region catches it first
        raise ConfigError(f"no AWS region for {service}: {exc}") from exc


def endpoint_of(client: Any) -> str:
    """The URL a client sends its requests to (for messages; a password in it is masked).

    Example:
        >>> class C:
        ...     class meta: endpoint_url = "http://127.0.0.1:5000"
        >>> endpoint_of(C())
        'http://127.0.0.1:5000'
    """
    return redact_url(str(getattr(getattr(client, "meta", None), "endpoint_url", "?")))


class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits ``uniform(0, min(cap, base*2**n))``.

    Each adapter owns its own ``Backoff`` (and random generator): no global state.

    Example:
        >>> b = Backoff(base=0.05, cap=2.0, max_retries=5, seed=7)
        >>> all(0 <= b.delay(n) <= 2.0 for n in range(20))
        True
    """

    __slots__ = ("_rng", "base", "cap", "max_retries")

    def __init__(
        self, base: float = 0.05, cap: float = 5.0, max_retries: int = 10, seed: int | None = None
    ) -> None:
        if base <= 0 or cap < base or max_retries < 0:
            raise ConfigError("backoff needs 0 < base <= cap and max_retries >= 0")
        self.base = base
        self.cap = cap
        self.max_retries = max_retries
        self._rng = random.Random(seed)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return self._rng.uniform(0.0, min(self.cap, self.base * (2.0 ** min(attempt, 62))))

    async def sleep(self, attempt: int) -> None:
        """Wait ``delay(attempt)`` seconds."""
        await asyncio.sleep(self.delay(attempt))


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a ``ClientError`` (``None`` for anything else).

    Example:
        >>> error_code(ClientError({"Error": {"Code": "ThrottlingException"}}, "PutRecords"))
        'ThrottlingException'
    """
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a ``ClientError``, if known.

    Example:
        >>> http_status(ClientError({"ResponseMetadata": {"HTTPStatusCode": 503}}, "Scan"))
        503
    """
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def is_retryable(exc: BaseException) -> bool:
    """Throttling, a 5xx, a dropped connection or a timeout: worth another try.

    Example:
        >>> is_retryable(ClientError({"Error": {"Code": "RequestLimitExceeded"}}, "BatchWriteItem"))
        True
    """
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = http_status(exc) or 0
        return code in THROTTLING_CODES or code in TRANSIENT_CODES or status >= 500
    return isinstance(exc, BotoConnectionError | HTTPClientError | asyncio.TimeoutError)


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint did not answer at all (refused, timed out, name not resolved).

    Example:
        >>> is_unreachable(ValueError())
        False
    """
    return isinstance(exc, BotoConnectionError | HTTPClientError)


def credentials_problem(
    exc: BaseException, service: str, endpoint: str
) -> AwsCredentialsError | None:
    """A clear ``AwsCredentialsError`` if ``exc`` says the credentials are missing or rejected.

    Some servers (moto with auth on) answer JSON APIs with an XML 403 body, so a
    403 whose message names a credential error counts too.

    Example:
        >>> e = ClientError({"Error": {"Code": "UnrecognizedClientException"}}, "Scan")
        >>> "credentials" in str(credentials_problem(e, "dynamodb", "http://x"))
        True
    """
    hint = (
        "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, "
        "or the aws_access_key_id=... options"
    )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AwsCredentialsError(f"no usable AWS credentials for {service} at {endpoint}: {hint}")
    if not isinstance(exc, ClientError):
        return None
    code = error_code(exc) or ""
    message = str(exc.response.get("Error", {}).get("Message", ""))
    named = code in CREDENTIAL_CODES or any(c in message for c in CREDENTIAL_CODES)
    if not named and http_status(exc) != 403:
        return None
    if code.startswith("AccessDenied") or "AccessDenied" in message:
        return AwsCredentialsError(
            f"{service} at {endpoint} denied access ({code}): the credentials lack a "
            f"permission for {exc.operation_name}; grant it in IAM"
        )
    found = next((c for c in CREDENTIAL_CODES if c == code or c in message), code or "403")
    return AwsCredentialsError(
        f"{service} at {endpoint} rejected the AWS credentials ({found}) on "
        f"{exc.operation_name}: {hint}"
    )


def describe(exc: BaseException) -> str:
    """A one-line description of an AWS failure for error messages.

    Example:
        >>> describe(ClientError({"Error": {"Code": "X", "Message": "bad"}}, "Scan"))
        'X: bad'
    """
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        message = str(err.get("Message", "")).strip().splitlines()
        return f"{err.get('Code', '?')}: {message[0] if message else ''}".rstrip(": ")
    if isinstance(exc, BotoCoreError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


async def call_with_retry(
    fn: Callable[..., Awaitable[T]],
    /,
    *,
    backoff: Backoff,
    service: str,
    endpoint: str,
    what: str,
    fail: Callable[[str], AsyncflowError],
    **kwargs: Any,
) -> T:
    """Call ``fn(**kwargs)``, retrying what ``is_retryable`` with ``backoff``.

    Rejected credentials raise ``AwsCredentialsError`` at once; an endpoint that
    stays unreachable raises ``AwsUnavailable``; anything else that stays failing
    raises ``fail(message)`` (e.g. ``SinkError``).

    Example:
        >>> async def ok(**kw: Any) -> int:
        ...     return 1
        >>> asyncio.run(call_with_retry(ok, backoff=Backoff(), service="s", endpoint="e",
        ...                             what="test", fail=ConfigError))
        1
    """
    attempt = 0
    while True:
        try:
            return await fn(**kwargs)
        except (TimeoutError, ClientError, BotoCoreError) as exc:
            creds = credentials_problem(exc, service, endpoint)
            if creds is not None:
                raise creds from exc
            if not is_retryable(exc):
                raise
            if attempt >= backoff.max_retries:
                if is_unreachable(exc):
                    raise AwsUnavailable(service, endpoint, describe(exc)) from exc
                raise fail(
                    f"{service} {what} still failing after {attempt + 1} attempts: {describe(exc)}"
                ) from exc
            log.debug("%s %s: %s; retry %d", service, what, describe(exc), attempt + 1)
            await backoff.sleep(attempt)
            attempt += 1


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The most telling leaf of an exception group: an ``AsyncflowError`` if there is one.

    Example:
        >>> first_error(ExceptionGroup("g", [ValueError("a"), ConfigError("b")]))
        ConfigError('b')
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, AsyncflowError)), leaves[0])


def _resolve_to_builtins() -> Callable[[Any], Any] | None:
    try:
        module = importlib.import_module("asyncflow.records")
    except ImportError:
        return None
    fn = getattr(module, "to_builtins", None)
    return fn if callable(fn) else None


def plain_converter() -> Callable[[Any], Any]:
    """A function turning an output value into builtins (dicts, lists, scalars).

    Uses ``asyncflow.records.to_builtins`` when the core provides it; otherwise
    handles mappings and dataclasses itself. Call once per sink, at start.

    Example:
        >>> @dataclasses.dataclass
        ... class W:
        ...     id: str
        ...     mean: float
        >>> plain_converter()(W("a", 1.5))
        {'id': 'a', 'mean': 1.5}
    """
    core = _resolve_to_builtins()

    def convert(value: Any) -> Any:
        if core is not None:
            return core(value)
        if isinstance(value, Mapping):
            return dict(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return value

    return convert
