"""The ``asyncflow`` command: run a worker, manage topics, print the version.

``asyncflow worker module:attr`` imports ``attr`` (an ``App``, or a callable
returning one) from ``module`` and runs it until SIGINT/SIGTERM, which drain
the lanes, flush the sinks, commit and exit 0. Problems a user can fix (a
missing module, a bad broker URL, an unreachable broker) print one line and
exit non-zero.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    asyncflow 0.1.0
    0
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from asyncflow import __version__
from asyncflow.app import App
from asyncflow.brokers import open_broker
from asyncflow.errors import AsyncflowError, ConfigError
from asyncflow.protocols import TopicSpec

log = logging.getLogger("asyncflow.cli")

CLIENT_LOGGERS = ("aiokafka",)
"""Client libraries whose start-up errors repeat ours: quiet until the worker runs."""


class _QuietUntilRunning(logging.Filter):
    """Drops client log records until the worker has started (our one-line error says it)."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        runtime = self.app._runtime
        return record.levelno >= logging.CRITICAL or (runtime is not None and runtime.started)


def load_app(spec: str) -> App:
    """Import ``module:attr`` and return the ``App`` it names.

    Example:
        >>> load_app("no_such_module_xyz:app")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: cannot import module 'no_such_module_xyz': No module named 'no_such_module_xyz' (run from the project root or add it to PYTHONPATH)
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected module:attr (e.g. apps.sensor_averages:app), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r}: {exc} "
            "(run from the project root or add it to PYTHONPATH)"
        ) from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        names = sorted(n for n, v in vars(module).items() if isinstance(v, App))
        hint = f"; apps there: {', '.join(names)}" if names else ""
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if not isinstance(obj, App) and callable(obj):
        obj = obj()
    if not isinstance(obj, App):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not an asyncflow App")
    return obj


async def _run_worker(app: App) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    stopping = False

    def on_signal(sig: signal.Signals) -> None:
        nonlocal stopping
        if stopping:
            log.warning("second %s: exiting without draining", sig.name)
            os._exit(130)
        stopping = True
        log.info("%s received: draining, flushing and committing", sig.name)
        app.stop()

    for s in signals:
        loop.add_signal_handler(s, on_signal, s)
    quiet = _QuietUntilRunning(app)
    client_logs = [logging.getLogger(name) for name in CLIENT_LOGGERS]
    for logger in client_logs:
        logger.addFilter(quiet)
    try:
        await app.run()
    finally:
        for s in signals:
            loop.remove_signal_handler(s)
        for logger in client_logs:
            logger.removeFilter(quiet)


async def _topics(args: argparse.Namespace) -> None:
    url = args.broker or os.environ.get("ASYNCFLOW_BROKER") or "memory://"
    broker = open_broker(url, {})
    try:
        if args.topics_cmd == "create":
            await broker.ensure_topics(
                [TopicSpec(n, partitions=args.partitions, create=True) for n in args.names]
            )
            print(f"created (or already there): {', '.join(args.names)}")
        else:
            for name, n in sorted((await broker.list_topics()).items()):
                print(f"{name}\t{n}")
    finally:
        await broker.close()


def _first_user_error(exc: BaseException) -> AsyncflowError | None:
    if isinstance(exc, AsyncflowError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_user_error(inner)
            if found is not None:
                return found
    cause = exc.__cause__
    return _first_user_error(cause) if cause is not None else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncflow", description="Run asyncflow stream workers.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="run an app: asyncflow worker module:attr")
    w.add_argument("app", help="module:attr naming an App (or a function returning one)")
    w.add_argument("--broker", help="memory:// (default) or kafka://host:port[,host:port]")
    w.add_argument("--log-level", default=os.environ.get("ASYNCFLOW_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    broker_help = "kafka://host:port (default: ASYNCFLOW_BROKER)"
    t = sub.add_parser("topics", help="create or list topics on a broker")
    t.add_argument("--broker", help=broker_help)
    tsub = t.add_subparsers(dest="topics_cmd", required=True)
    c = tsub.add_parser("create", help="create topics")
    c.add_argument("names", nargs="+")
    c.add_argument("--partitions", type=int, default=1)
    c.add_argument("--broker", help=broker_help, default=argparse.SUPPRESS)
    ls = tsub.add_parser("list", help="list topics and their partition counts")
    ls.add_argument("--broker", help=broker_help, default=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asyncflow`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"asyncflow {__version__}")
        return 0
    if args.cmd is None:
        _parser().print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.cmd == "worker":
            app = load_app(args.app)
            if args.broker:
                app.set_broker(args.broker)
            asyncio.run(_run_worker(app))
        else:
            asyncio.run(_topics(args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        user = _first_user_error(exc)
        if user is None:
            raise
        print(f"asyncflow: error: {user}", file=sys.stderr)
        return 2 if isinstance(user, ConfigError) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
