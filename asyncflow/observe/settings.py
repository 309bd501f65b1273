"""Where the web view and ``/metrics`` listen: ``--web-port`` and ``--web-host``, or the environment.

Off unless a port is given (``--web-port`` or ``ASYNCFLOW_WEB_PORT``); it
binds ``127.0.0.1`` unless ``--web-host`` / ``ASYNCFLOW_WEB_HOST`` says
otherwise, so a worker never exposes itself on a network by default. Port
``0`` binds any free port (the log line says which). Settings are per app
(``configure_web``), so two apps in one process do not share them.

Example:
    >>> web_settings(port=9100, host=None, env={})
    WebSettings(port=9100, host='127.0.0.1')
    >>> web_settings(port=None, host=None, env={}) is None
    True
    >>> web_settings(port=None, host=None, env={"ASYNCFLOW_WEB_PORT": "70000"})
    Traceback (most recent call last):
    ...
    asyncflow.errors.ConfigError: web_port (ASYNCFLOW_WEB_PORT) = '70000' is not allowed; use an integer from 0 to 65535 (0: any free port)
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asyncflow.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
"""The address the web view binds without ``--web-host``: loopback only."""


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The port and address of a worker's web view and ``/metrics``.

    Example:
        >>> WebSettings(port=8080, host="0.0.0.0").url
        'http://0.0.0.0:8080/'
    """

    port: int
    host: str = DEFAULT_HOST

    @property
    def url(self) -> str:
        """The page's address as configured (the port may still be 0: any free port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def _port(given: int | str | None, env: Mapping[str, str]) -> int | None:
    source = "--web-port" if given is not None else "ASYNCFLOW_WEB_PORT"
    raw: Any = given if given is not None else env.get("ASYNCFLOW_WEB_PORT")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        port = int(raw)
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"web_port ({source}) = {str(raw)!r} is not allowed; "
            "use an integer from 0 to 65535 (0: any free port)"
        )
    return port


def web_settings(
    port: int | str | None, host: str | None, env: Mapping[str, str] | None = None
) -> WebSettings | None:
    """The web settings from arguments, else the environment; ``None`` when no port is set.

    Example:
        >>> web_settings(None, None, {"ASYNCFLOW_WEB_PORT": "9100", "ASYNCFLOW_WEB_HOST": "::1"})
        WebSettings(port=9100, host='::1')
        >>> web_settings(None, " ", {"ASYNCFLOW_WEB_PORT": "1"})
        Traceback (most recent call last):
        ...
        asyncflow.errors.ConfigError: web_host (--web-host) = ' ' is not allowed; use an address to bind, e.g. 127.0.0.1 or 0.0.0.0
    """
    env = os.environ if env is None else env
    number = _port(port, env)
    raw_host = host if host is not None else env.get("ASYNCFLOW_WEB_HOST")
    if raw_host is not None and not raw_host.strip():
        source = "--web-host" if host is not None else "ASYNCFLOW_WEB_HOST"
        raise ConfigError(
            f"web_host ({source}) = {raw_host!r} is not allowed; "
            "use an address to bind, e.g. 127.0.0.1 or 0.0.0.0"
        )
    if number is None:
        return None
    return WebSettings(number, raw_host.strip() if raw_host else DEFAULT_HOST)


_configured: weakref.WeakKeyDictionary[Any, WebSettings | None] = weakref.WeakKeyDictionary()


def configure_web(app: Any, settings: WebSettings | None) -> None:
    """Give ``app`` its web settings (the CLI does, from its flags); ``None`` turns the view off.

    Example:
        >>> import asyncflow as af
        >>> app = af.App("seen")
        >>> configure_web(app, WebSettings(0)); web_settings_of(app)
        WebSettings(port=0, host='127.0.0.1')
    """
    _configured[app] = settings


def web_settings_of(app: Any) -> WebSettings | None:
    """``app``'s web settings: as configured, else from ``ASYNCFLOW_WEB_PORT`` / ``_HOST``.

    Example:
        >>> import asyncflow as af
        >>> web_settings_of(af.App("unseen")) is None or True
        True
    """
    if app in _configured:
        return _configured[app]
    return web_settings(None, None)
