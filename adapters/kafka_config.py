"""Settings of the Kafka adapter: parsing ``kafka://`` URLs and options into client arguments.

Options come from the URL's query string and from a mapping (``--broker-option``
style); the mapping wins. Every value is a string, as on a command line.
Unknown names are an error, so a typo is not silently ignored.

Example:
    >>> s = KafkaSettings.parse("kafka://k1:9092,k2:9092?client_id=etl", {"acks": "1"})
    >>> s.bootstrap_servers, s.client_id, s.acks, s.enable_idempotence
    (['k1:9092', 'k2:9092'], 'etl', 1, False)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from aiokafka.errors import KafkaConnectionError, KafkaError

from asyncflow.errors import BrokerUnavailable, ConfigError, redact_url, redacted_repr

__all__ = ["URL_FORM", "KafkaSettings", "describe", "redact_url", "start_client", "stop_consumer"]

log = logging.getLogger("asyncflow.kafka")

URL_FORM = "kafka://[user:password@]host:port[,host:port...][?option=value&...]"
DEFAULT_PORT = 9092
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"Kafka option {name}={raw!r} is not a boolean; use true or false")


_MAY_BE_ZERO = frozenset({"linger_ms"})
"""Integer options for which 0 means something; every other one must be at least 1 (a 0
``retry_backoff_ms`` or ``fetch_max_wait_ms`` would poll the broker in a busy loop)."""


def _int(name: str, raw: str) -> int:
    low = 0 if name in _MAY_BE_ZERO else 1
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"Kafka option {name}={raw!r} is not an integer; use an integer >= {low}"
        ) from None
    if value < low:
        raise ConfigError(f"Kafka option {name}={raw!r} is too small; use an integer >= {low}")
    return value


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        for a in allowed:
            if value.lower() == a.lower():
                return a
        raise ConfigError(f"Kafka option {name}={raw!r} is not one of: {', '.join(allowed)}")

    return parse


def _text(name: str, raw: str) -> str:
    return raw


def _acks(name: str, raw: str) -> int:
    value = raw.strip().lower()
    if value in ("all", "-1"):
        return -1
    if value in ("0", "1"):
        return int(value)
    raise ConfigError(f"Kafka option {name}={raw!r} is not one of: 0, 1, all")


@dataclass(frozen=True, slots=True, repr=False)
class KafkaSettings:
    """Everything the Kafka adapter needs to build its clients.

    Build it with ``KafkaSettings.parse(url, options)``; the fields below are
    also the accepted option names (except ``bootstrap_servers``, from the URL).
    A URL's ``user:password@`` is the SASL username and password. ``repr``
    shows ``'***'`` for the password fields.

    Example:
        >>> KafkaSettings.parse("kafka://localhost").bootstrap_servers
        ['localhost:9092']
        >>> s = KafkaSettings.parse("kafka://alice:pw@k?security_protocol=SASL_SSL")
        >>> s.sasl_plain_username, "pw" in repr(s), "sasl_plain_password='***'" in repr(s)
        ('alice', False, True)
    """

    bootstrap_servers: list[str]
    client_id: str = "asyncflow"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True
    connect_timeout_ms: int = 10_000
    request_timeout_ms: int = 40_000
    retry_backoff_ms: int = 100
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int | None = None
    rebalance_timeout_ms: int = 60_000
    max_poll_interval_ms: int = 300_000
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 10_000
    fetch_max_wait_ms: int = 100
    fetch_min_bytes: int = 1
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 1_048_576
    linger_ms: int = 0
    max_batch: int = 10_000
    max_batch_size: int = 524_288
    max_request_size: int = 1_048_576
    enable_idempotence: bool = True
    acks: int = -1
    compression_type: str | None = None
    create_topics: bool = True
    replication_factor: int | None = None
    client: str = "aiokafka"
    transactional_id: str | None = None
    transaction_timeout_ms: int = 60_000

    @classmethod
    def parse(cls, url: str, options: Mapping[str, str] | None = None) -> KafkaSettings:
        """Parse ``kafka://host:port[,host:port][?option=value&...]`` plus extra options.

        Raises ``ConfigError`` naming the accepted form or the bad option.

        Example:
            >>> KafkaSettings.parse("kafka://b:1?enable_idempotence=false").enable_idempotence
            False
        """
        servers, query, credentials = _split_url(url)
        merged: dict[str, str] = dict(credentials)
        merged.update(query)
        merged.update(options or {})
        values: dict[str, Any] = {"bootstrap_servers": servers}
        for name, raw in merged.items():
            parser = _PARSERS.get(name)
            if parser is None:
                known = ", ".join(sorted(_PARSERS))
                raise ConfigError(f"unknown Kafka option {name!r}; known options: {known}")
            values[name] = parser(name, raw)
        if values.get("acks", -1) != -1 and "enable_idempotence" not in values:
            values["enable_idempotence"] = False  # as the Java client: acks=0/1 turns it off
        settings = cls(**values)
        settings._check()
        return settings

    def __repr__(self) -> str:
        return redacted_repr(self)

    def _check(self) -> None:
        if self.enable_idempotence and self.acks != -1:
            raise ConfigError(
                "Kafka option acks must be 'all' when enable_idempotence is true; "
                "set acks=all or enable_idempotence=false"
            )
        uses_sasl = self.sasl_mechanism != "PLAIN" or self.sasl_plain_username is not None
        if uses_sasl and not self.security_protocol.startswith("SASL"):
            raise ConfigError(
                "SASL options (sasl_* or user:password@ in the URL) need "
                "security_protocol=SASL_PLAINTEXT or SASL_SSL (e.g. ?security_protocol=SASL_SSL)"
            )
        if self.security_protocol.startswith("SASL") and (
            self.sasl_plain_username is None or self.sasl_plain_password is None
        ):
            raise ConfigError(
                f"security_protocol={self.security_protocol} needs "
                "sasl_plain_username and sasl_plain_password"
            )
        hb = self.heartbeat_interval
        if hb >= self.session_timeout_ms:
            raise ConfigError(
                f"Kafka option heartbeat_interval_ms={hb} must be below "
                f"session_timeout_ms={self.session_timeout_ms}"
            )
        if self.compression_type is not None and self.client == "aiokafka":
            from aiokafka import codec

            checks = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
            check = checks.get(self.compression_type)
            if check is not None and not check():
                raise ConfigError(
                    f"compression_type={self.compression_type} needs its Python library; "
                    f"install aiokafka[{self.compression_type}] or pick gzip"
                )

    @property
    def heartbeat_interval(self) -> int:
        """The heartbeat interval: the option, else a third of the session timeout (max 3 s).

        Example:
            >>> KafkaSettings.parse("kafka://k?session_timeout_ms=3000").heartbeat_interval
            1000
        """
        if self.heartbeat_interval_ms is not None:
            return self.heartbeat_interval_ms
        return min(3000, max(100, self.session_timeout_ms // 3))

    def ssl_context(self) -> ssl.SSLContext | None:
        """An SSL context for ``SSL``/``SASL_SSL`` (system CAs unless ``ssl_cafile``).

        Example:
            >>> KafkaSettings.parse("kafka://k").ssl_context() is None
            True
        """
        if not self.security_protocol.endswith("SSL"):
            return None
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile is not None:
                context.load_cert_chain(
                    self.ssl_certfile, keyfile=self.ssl_keyfile, password=self.ssl_password
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the Kafka TLS files: {exc}") from None
        context.check_hostname = self.ssl_check_hostname
        return context

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's consumer, producer and admin client.

        Example:
            >>> KafkaSettings.parse("kafka://k:1").client_args()["bootstrap_servers"]
            ['k:1']
        """
        args: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "retry_backoff_ms": self.retry_backoff_ms,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context(),
        }
        if self.security_protocol.startswith("SASL"):
            args["sasl_mechanism"] = self.sasl_mechanism
            args["sasl_plain_username"] = self.sasl_plain_username
            args["sasl_plain_password"] = self.sasl_plain_password
        return args

    def consumer_args(self, group_id: str) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaConsumer`` (manual commits).

        Example:
            >>> KafkaSettings.parse("kafka://k").consumer_args("g")["enable_auto_commit"]
            False
        """
        args = self.client_args()
        args.update(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval,
            max_poll_interval_ms=self.max_poll_interval_ms,
            rebalance_timeout_ms=self.rebalance_timeout_ms,
            max_poll_records=self.max_poll_records,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            fetch_min_bytes=self.fetch_min_bytes,
            fetch_max_bytes=self.fetch_max_bytes,
            max_partition_fetch_bytes=self.max_partition_fetch_bytes,
        )
        return args

    def producer_args(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer``.

        Example:
            >>> KafkaSettings.parse("kafka://k?enable_idempotence=no").producer_args()["acks"]
            -1
        """
        args = self.client_args()
        args.update(
            acks=self.acks,
            enable_idempotence=self.enable_idempotence,
            compression_type=self.compression_type,
            max_batch_size=self.max_batch_size,
            max_request_size=self.max_request_size,
            linger_ms=0,  # the sink closes its batches itself; the core does the lingering
        )
        return args

    def changelog_producer_args(self) -> dict[str, Any]:
        """Keyword arguments for the changelog producer: ``acks=all`` whatever ``acks`` says.

        Idempotence follows ``enable_idempotence``, as for the sink.

        Example:
            >>> s = KafkaSettings.parse("kafka://k?acks=1")
            >>> args = s.changelog_producer_args()
            >>> args["acks"], args["enable_idempotence"]
            (-1, False)
        """
        args = self.producer_args()
        args["acks"] = -1
        return args

    def reader_args(self) -> dict[str, Any]:
        """Keyword arguments for a changelog reader: no group, no commits, no offset reset.

        ``auto_offset_reset="none"``: a read from an offset the broker does not
        have raises instead of silently jumping to the start or the end. A
        restore reads up to the end of the log: its fetches wait at most 20 ms
        for more (a partition is not processed until its restore is done).

        Example:
            >>> args = KafkaSettings.parse("kafka://k").reader_args()
            >>> args["group_id"], args["enable_auto_commit"], args["isolation_level"]
            (None, False, 'read_uncommitted')
        """
        args = self.client_args()
        args.update(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",
            isolation_level="read_uncommitted",
            fetch_max_wait_ms=min(self.fetch_max_wait_ms, 20),
            fetch_min_bytes=self.fetch_min_bytes,
            fetch_max_bytes=self.fetch_max_bytes,
            max_partition_fetch_bytes=self.max_partition_fetch_bytes,
        )
        return args


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "client_id": _text,
    "security_protocol": _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    "sasl_plain_username": _text,
    "sasl_plain_password": _text,
    "ssl_cafile": _text,
    "ssl_certfile": _text,
    "ssl_keyfile": _text,
    "ssl_password": _text,
    "ssl_check_hostname": _bool,
    "auto_offset_reset": _choice("earliest", "latest"),
    "enable_idempotence": _bool,
    "create_topics": _bool,
    "acks": _acks,
    "compression_type": _choice("gzip", "snappy", "lz4", "zstd"),
    "client": _choice("aiokafka", "rdkafka"),
    "transactional_id": _text,
}
for _f in fields(KafkaSettings):
    if _f.name not in _PARSERS and _f.name != "bootstrap_servers":
        _PARSERS[_f.name] = _int


def _split_url(url: str) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    bad = f"bad Kafka URL {redact_url(url)!r}; expected {URL_FORM}"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(bad) from None
    if parts.scheme != "kafka" or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(bad)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    credentials: list[tuple[str, str]] = []
    if at:
        user, colon, password = userinfo.partition(":")
        if not user or not colon:
            raise ConfigError(f"{bad} (userinfo must be user:password)")
        credentials = [
            ("sasl_plain_username", unquote(user)),
            ("sasl_plain_password", unquote(password)),
        ]
    servers = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip())
        if not host or port is None:
            raise ConfigError(bad)
        servers.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(bad) from None
    return servers, query, credentials


def _host_port(item: str) -> tuple[str, int | None]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    elif ":" in item:
        return "", None
    else:
        host, port_text = item, ""
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return host, None
    return host, int(port_text)


async def start_client(client: Any, url: str, settings: KafkaSettings) -> None:
    """Start an aiokafka client within ``connect_timeout_ms``, else raise ``BrokerUnavailable``.

    Example:
        >>> async def main(settings: KafkaSettings) -> None:  # doctest: +SKIP
        ...     await start_client(AIOKafkaProducer(**settings.producer_args()), url, settings)
    """
    timeout_ms = settings.connect_timeout_ms
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            await client.start()
    except TimeoutError:
        await _close_quietly(client)
        raise BrokerUnavailable(
            url, f"no answer within {timeout_ms} ms (connect_timeout_ms)"
        ) from None
    except KafkaConnectionError:
        await _close_quietly(client)
        servers = ", ".join(settings.bootstrap_servers)
        raise BrokerUnavailable(
            url, f"no bootstrap server accepted a connection ({servers})"
        ) from None
    except (KafkaError, OSError) as exc:
        await _close_quietly(client)
        raise BrokerUnavailable(url, describe(exc)) from None


def describe(exc: BaseException) -> str:
    """One line naming an aiokafka error (its ``str`` already starts with the class name).

    Example:
        >>> describe(TimeoutError())
        'TimeoutError'
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    name = type(exc).__name__
    return text if name in text else (f"{name}: {text}" if text else name)


async def stop_consumer(consumer: Any, url: str, timeout: float, *, leave_group: bool) -> bool:
    """Stop an aiokafka consumer within ``timeout`` seconds, leaving its group if it is in one.

    ``True`` if it stopped in time; else (the broker does not answer) its
    connections are closed without the goodbyes and ``False`` is returned: a
    group then drops this member only after ``session_timeout_ms``. Works
    around two things of aiokafka 0.14: its fetcher's ``close`` re-raises the
    cancellation of its own fetch tasks (``CancelledError`` out of ``stop``,
    connections left open), and it sends ``LeaveGroup`` only from generation 1
    on while Tansu numbers a group's first generation 0 (Apache Kafka starts
    at 1), so a lone member never left its group there.

    Example:
        >>> async def close(consumer: AIOKafkaConsumer) -> None:  # doctest: +SKIP
        ...     await stop_consumer(consumer, url, 5.0, leave_group=True)
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if (
        leave_group
        and coordinator is not None
        and getattr(coordinator, "generation", None) == 0
        and getattr(coordinator, "member_id", "")
    ):
        coordinator.generation = 1  # joined in Tansu's generation 0: let aiokafka say goodbye
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    stopped = False
    try:
        async with asyncio.timeout(timeout):
            try:
                await consumer.stop()
            except asyncio.CancelledError:
                if task is None or task.cancelling() > cancelling:
                    raise  # a cancellation of ours (or the timeout): not aiokafka's own
                log.debug("aiokafka's fetcher re-raised its own cancellation; closing %s", url)
                await _force_close(consumer)
        stopped = True
    except TimeoutError:
        log.warning(
            "closing the Kafka consumer for %s took over %.1fs (the broker does not answer); "
            "closed its connections without leaving the group, which drops this member after "
            "session_timeout_ms", url, timeout,
        )
    except (KafkaError, OSError) as exc:
        log.warning("closing the Kafka consumer for %s failed: %s", url, describe(exc))
    finally:
        if not stopped:  # also when cancelled from outside: no connection is left open
            await _force_close(consumer)
    return stopped


async def _force_close(consumer: Any) -> None:
    """Cancel a consumer's background tasks and close its connections (best effort, 1 s)."""
    tasks: list[asyncio.Task[Any]] = []
    coordinator = getattr(consumer, "_coordinator", None)
    fetcher = getattr(consumer, "_fetcher", None)
    for owner, names in (
        (coordinator, ("_coordination_task", "_heartbeat_task", "_commit_refresh_task")),
        (fetcher, ("_fetch_task",)),
    ):
        for name in names:
            t = getattr(owner, name, None)
            if isinstance(t, asyncio.Task) and not t.done():
                tasks.append(t)
    tasks += [t for t in getattr(fetcher, "_pending_tasks", ()) if not t.done()]
    for t in tasks:
        t.cancel()
    client = getattr(consumer, "_client", None)
    try:
        async with asyncio.timeout(1.0):
            await asyncio.gather(*tasks, return_exceptions=True)
            if client is not None:
                await client.close()
    except (TimeoutError, KafkaError, OSError) as exc:
        log.debug("closing a Kafka consumer's connections failed: %s", exc)


async def _close_quietly(client: Any) -> None:
    closer = getattr(client, "stop", None) or client.close
    try:
        await closer()
    except Exception as exc:  # noqa: BLE001 - best effort after a failed start
        log.debug("closing a Kafka client that failed to start: %s", exc)
