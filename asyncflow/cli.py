"""The ``asyncflow`` command: run a worker, manage topics, print the version.

``asyncflow worker module:attr`` imports ``attr`` (an ``App``, or a callable
returning one) from ``module`` and runs it until SIGINT/SIGTERM, which drain
the lanes, flush the sinks, commit and exit 0. Problems a user can fix (a
missing module, a bad broker URL, an unreachable broker) print one line and
exit non-zero.

``asyncflow worker ... --web-port PORT [--web-host ADDR]`` (or
``ASYNCFLOW_WEB_PORT`` / ``ASYNCFLOW_WEB_HOST``) serves the live page at ``/``,
``/api/status`` and Prometheus ``/metrics`` on ``127.0.0.1:PORT`` unless told
another address (``asyncflow.observe``); ``asyncflow status --web
http://host:port`` prints the same figures in the terminal and exits 1 with
one line when nothing answers there.

Exit codes of ``asyncflow worker``:

* **0**: stopped by SIGINT/SIGTERM with everything the lanes were handed
  committed.
* **1**: an error stopped the worker (a sink that failed after its retries,
  an agent with ``on_error="stop"``, a source error), one ``asyncflow: error:``
  line says which; or a stop that could not commit everything within
  ``shutdown_timeout`` (the broker unreachable, a lane stuck): one ERROR log
  line names the partitions, their committed offsets and the reason, and says
  that a restart replays the rest. Nothing is lost either way (at-least-once),
  but the stop did not do all it was asked, so a supervisor or deploy script
  can tell it from a clean one.
* **2**: a setting, URL or argument is wrong.
* **130**: a second SIGINT/SIGTERM, which exits at once without draining.

A stop takes at most about ``shutdown_timeout`` seconds (an ``App`` setting,
30 s by default), whether or not the broker answers, and the consumer leaves
its group and every client is closed on every way out.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    asyncflow 0.1.0
    0
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from asyncflow import __version__
from asyncflow.app import App
from asyncflow.brokers import open_broker
from asyncflow.errors import AsyncflowError, ConfigError, RedactingFilter
from asyncflow.observe.settings import configure_web, web_settings
from asyncflow.protocols import TopicSpec

log = logging.getLogger("asyncflow.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
"""The values ``--log-level`` / ``ASYNCFLOW_LOG_LEVEL`` accept (any case)."""

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
    """Import ``module:attr`` and return the ``App`` it names (or that a factory function returns).

    Every mistake is a one-line ``ConfigError``: a module that is missing, has
    a syntax error or raises on import (naming the file and line), an
    attribute that is missing or is neither an ``App`` nor an app factory.

    Example:
        >>> load_app("no_such_module_xyz:app")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: cannot import module 'no_such_module_xyz': No module named 'no_such_module_xyz' (run from the project root or add it to PYTHONPATH)
        >>> load_app("asyncflow.app:Timer")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: asyncflow.app:Timer is a class, not an asyncflow App; name an App (app = af.App(...)) or a function returning one
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected module:attr (e.g. apps.sensor_averages:app), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except AsyncflowError:
        raise  # already one line naming the setting (e.g. App(...) at import time)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise ConfigError(
                f"cannot import module {module_name!r}: {exc} "
                "(run from the project root or add it to PYTHONPATH)"
            ) from None
        raise ConfigError(_failure(f"cannot import module {module_name!r}", exc)) from None
    except Exception as exc:  # noqa: BLE001 - the user's module: any error is one line
        raise ConfigError(_failure(f"cannot import module {module_name!r}", exc)) from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        names = sorted(n for n, v in vars(module).items() if isinstance(v, App))
        hint = f"; apps there: {', '.join(names)}" if names else ""
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if isinstance(obj, App):
        return obj
    wanted = "name an App (app = af.App(...)) or a function returning one"
    if isinstance(obj, type):
        raise ConfigError(f"{spec} is a class, not an asyncflow App; {wanted}")
    if not callable(obj):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not an asyncflow App; {wanted}")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise ConfigError(
            f"{spec} needs arguments, so it is not an app factory; {wanted} (with no arguments)"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): try the call
    try:
        made = obj()
    except AsyncflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory: any error is one line
        raise ConfigError(_failure(f"app factory {spec} raised", exc)) from None
    if not isinstance(made, App):
        raise ConfigError(
            f"{spec}() returned a {type(made).__name__}, not an asyncflow App; {wanted}"
        )
    return made


_IMPORTLIB = os.path.dirname(importlib.__file__ or "<importlib>") + os.sep


def _failure(what: str, exc: BaseException) -> str:
    """One line: ``what``, where in the user's code it happened, and the exception.

    Example:
        >>> error = SyntaxError("invalid syntax", ("m.py", 3, 1, "x ="))
        >>> _failure("cannot import module 'm'", error)
        "cannot import module 'm': SyntaxError: invalid syntax (m.py, line 3); fix it and run again"
    """
    if isinstance(exc, SyntaxError):
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        return f"{what}: {type(exc).__name__}: {exc.msg}{where}; fix it and run again"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen ", _IMPORTLIB)) and f.filename != __file__
    ]
    where = ""
    if frames:
        first, last = frames[0], frames[-1]
        where = f" ({first.filename}, line {first.lineno}"
        if last is not first:
            where += f"; raised at {last.filename}, line {last.lineno}"
        where += ")"
    text = str(exc).splitlines()[0] if str(exc) else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{what}: {detail}{where}; fix it and run again"


class _StoppedBeforeStart(BaseException):
    """SIGINT/SIGTERM while the app module is imported or the worker sets up (a clean exit 0)."""


def _stop_before_start() -> dict[signal.Signals, Any]:
    """Until the worker's own handlers are in place, SIGINT/SIGTERM end it cleanly (exit 0).

    Returns the handlers it replaced (none outside the main thread).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: Any) -> None:
        raise _StoppedBeforeStart(signal.Signals(signum).name)

    return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}


async def _run_worker(app: App) -> int:
    """Run ``app`` until a signal stops it; the exit code (1 if the stop left records uncommitted)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    stopping = False
    runtime = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal stopping, runtime
        if stopping:
            log.warning("second %s: exiting without draining", sig.name)
            os._exit(130)
        stopping = True
        runtime = app._runtime
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
    return 1 if runtime is not None and runtime.unfinished else 0


async def _topics(args: argparse.Namespace) -> None:
    url = args.broker or os.environ.get("ASYNCFLOW_BROKER") or "memory://"
    if args.topics_cmd == "create" and args.partitions < 1:
        raise ConfigError(f"--partitions {args.partitions} is not allowed; use an integer >= 1")
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


def _log_level(arg: str | None) -> int:
    """The logging level from ``--log-level``, else ``ASYNCFLOW_LOG_LEVEL``, else info.

    Example:
        >>> _log_level("WARNING") == logging.WARNING
        True
        >>> _log_level("loud")
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: log level 'loud' (--log-level / ASYNCFLOW_LOG_LEVEL) is not allowed; use one of: debug, info, warning, error
    """
    raw = arg if arg is not None else os.environ.get("ASYNCFLOW_LOG_LEVEL") or "info"
    name = raw.strip().lower()
    if name not in LOG_LEVELS:
        raise ConfigError(
            f"log level {raw!r} (--log-level / ASYNCFLOW_LOG_LEVEL) is not allowed; "
            f"use one of: {', '.join(LOG_LEVELS)}"
        )
    level: int = getattr(logging, name.upper())
    return level


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncflow", description="Run asyncflow stream workers.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="run an app: asyncflow worker module:attr")
    w.add_argument("app", help="module:attr naming an App (or a function returning one)")
    w.add_argument("--broker", help="memory:// (default) or kafka://host:port[,host:port]")
    w.add_argument("--log-level", help=f"one of {', '.join(LOG_LEVELS)} "
                   "(default: ASYNCFLOW_LOG_LEVEL, else info)")
    w.add_argument("--web-port", help="serve the live page, /api/status and /metrics on this port "
                   "(default: ASYNCFLOW_WEB_PORT, else off; 0: any free port)")
    w.add_argument("--web-host", help="address the web port binds (default: ASYNCFLOW_WEB_HOST, "
                   "else 127.0.0.1)")
    st = sub.add_parser("status", help="a running worker's figures: asyncflow status --web URL")
    st.add_argument("--web", required=True, help="the worker's web address, e.g. "
                    "http://127.0.0.1:9100")
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


def _status(url: str) -> int:
    """``asyncflow status --web URL``: print the worker's figures; 1 when it does not answer."""
    from asyncflow.observe.terminal import StatusUnavailable, fetch_status, render

    try:
        print(render(asyncio.run(fetch_status(url))))
    except StatusUnavailable as exc:
        print(f"asyncflow: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asyncflow`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"asyncflow {__version__}")
        return 0
    if args.cmd is None:
        _parser().print_help()
        return 2
    try:
        level = _log_level(getattr(args, "log_level", None))
    except ConfigError as exc:
        print(f"asyncflow: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if args.cmd == "status":
        return _status(args.web)
    try:
        web = web_settings(args.web_port, args.web_host) if args.cmd == "worker" else None
    except ConfigError as exc:
        print(f"asyncflow: error: {exc}", file=sys.stderr)
        return 2
    early = _stop_before_start() if args.cmd == "worker" else {}
    try:
        if args.cmd == "worker":
            app = load_app(args.app)
            if args.broker:
                app.set_broker(args.broker)
            configure_web(app, web)
            return asyncio.run(_run_worker(app))
        else:
            asyncio.run(_topics(args))
    except _StoppedBeforeStart as stop:
        log.info("%s before the worker started: nothing was read, so nothing is left to commit; "
                 "exiting", stop)
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        user = _first_user_error(exc)
        if user is None:
            raise
        print(f"asyncflow: error: {user}", file=sys.stderr)
        return 2 if isinstance(user, ConfigError) else 1
    finally:
        for s, handler in early.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
