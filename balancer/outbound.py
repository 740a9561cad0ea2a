"""How balancer talks to one pool's endpoints: TLS, injected headers, timeouts, checks.

A pool may end outside the cluster, at a hosted OpenAI-compatible provider: ``https://``
endpoints, an API key to send, a network farther away. :class:`Outbound` gathers what every
client of the pool's endpoints needs for that, so the request path (the forwarder), the
health checks, the model reads and the metrics polls all speak to an endpoint the same way:

- one ``ssl.SSLContext`` per pool, built at start (system CAs or ``tls.ca_file``, a client
  certificate for mutual TLS), with hostname verification and SNI on unless
  ``tls.verify`` is off;
- the injected headers (:class:`InjectedHeader`), whose values never reach a log line;
- the pool's timeouts, each defaulting to the ``limits`` setting of the same meaning;
- whether its endpoints are actively checked (and on which path) and polled for load.

A header read from a file follows the file: a Secret mounted as a volume is rotated by the
kubelet swapping a symlink, so the file's identity (inode, size, modification time) is
looked at on the request path at most once per :data:`HEADER_FILE_CHECK_INTERVAL`, and the
file is read again only when that changed. Checking on each request would cost a ``stat``
per request; checking on each new connection would keep an old key for as long as a
keep-alive connection lives, and a provider's connections live long. One ``stat`` a second
is nothing, and the kubelet itself takes up to a minute to update the volume.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from typing import Any, Final

from balancer.config import (
    ConfigError,
    PoolHeader,
    PoolSettings,
    PoolTLSSettings,
    Settings,
    header_value_problem,
)
from balancer.upstream import Connector

log = logging.getLogger("balancer.outbound")

HEADER_FILE_CHECK_INTERVAL: Final = 1.0
"""Seconds between two looks at a header file's identity (see the module's docstring)."""


HEADER_FILE_MAX: Final = 16 * 1024
"""Characters of a header file read; a longer file is refused (a token is far shorter; a
file that size is the wrong file)."""


def read_header_file(path: str) -> str:
    """The value in a header file: its text without trailing whitespace (a Secret written
    with ``echo`` ends in a newline). Raises OSError, UnicodeDecodeError, or ValueError
    for a file over :data:`HEADER_FILE_MAX`."""
    with open(path, encoding="utf-8") as f:
        text = f.read(HEADER_FILE_MAX + 1)
    if len(text) > HEADER_FILE_MAX:
        raise ValueError(f"over {HEADER_FILE_MAX} characters")
    return text.rstrip()


def resolve_header(key: str, header: PoolHeader) -> str:
    """The value of an injected header now (``prefix`` included), from its setting, the
    environment or its file; raises ConfigError naming ``key`` when it cannot be had (the
    sources were checked by ``config.validate``). No message quotes the value."""
    if header.value:
        return header.value
    if header.value_from_env:
        where = f"{key}.value_from_env"
        raw = os.environ.get(header.value_from_env)
        if raw is None:
            raise ConfigError(f"{where}: environment variable {header.value_from_env!r} is "
                              "not set")
        value = header.prefix + raw.strip()
    else:
        where, path = f"{key}.value_from_file", header.value_from_file
        try:
            value = header.prefix + read_header_file(path)
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {path!r}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {path!r} is not UTF-8 text") from None
        except ValueError as e:
            raise ConfigError(f"{where}: {path!r} is {e}") from None
    problem = header_value_problem(value)
    if problem is not None:
        raise ConfigError(f"{where}: the value {problem}")
    return value


def _file_problem(exc: Exception) -> str:
    """Why a TLS file did not load, in a few words."""
    if isinstance(exc, ssl.SSLError):
        return f"not usable PEM: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"cannot read it: {exc.strerror or exc}"
    return str(exc)


def ssl_context(where: str, tls: PoolTLSSettings | None) -> ssl.SSLContext:
    """The client TLS context of a pool: verification and hostname checks on (unless
    ``verify`` is off), the configured CAs or the system's, the client certificate if any.
    Raises ConfigError naming the key (``where`` is the pool's ``tls``) whose file does not
    load."""
    tls = tls or PoolTLSSettings()
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{where}.ca_file: {tls.ca_file!r}: {_file_problem(e)}") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file:
        try:
            # A password callback that gives none: an encrypted key fails here rather than
            # prompting on the terminal.
            context.load_cert_chain(tls.cert_file, tls.key_file or None, password=lambda: "")
        except (ssl.SSLError, OSError) as e:
            key = f"key {tls.key_file!r}" if tls.key_file else "its key"
            raise ConfigError(f"{where}.cert_file: {tls.cert_file!r} with {key}: "
                              f"{_file_problem(e)} (a PEM certificate chain and an "
                              "unencrypted private key that belongs to it)") from None
    return context


class InjectedHeader:
    """One header a pool adds to what it sends; its value is read from the setting, the
    environment (once) or a file (again when the file changes)."""

    __slots__ = ("_checked", "_identity", "_interval", "_value", "key", "name", "setting")

    def __init__(self, key: str, setting: PoolHeader,
                 check_interval: float = HEADER_FILE_CHECK_INTERVAL) -> None:
        self.key = key
        """The setting's key (``pools[0].headers[1]``), for log lines."""
        self.name = setting.name
        self.setting = setting
        self._interval = check_interval
        self._identity = self._stat()
        self._value = resolve_header(key, setting)
        self._checked = time.monotonic()

    def __repr__(self) -> str:
        return f"InjectedHeader({self.name!r}, from {self.key})"  # never the value

    def _stat(self) -> tuple[int, int, int, int] | None:
        path = self.setting.value_from_file
        if not path:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def value(self, now: float | None = None) -> str:
        """The current value; a file's is re-read when it changed since the last look,
        which happens at most once per check interval."""
        if not self.setting.value_from_file:
            return self._value
        now = time.monotonic() if now is None else now
        if now - self._checked >= self._interval:
            self._checked = now
            identity = self._stat()
            if identity != self._identity:
                self._reload(identity)
        return self._value

    def _reload(self, identity: tuple[int, int, int, int] | None) -> None:
        """Read the changed file; a value that cannot be read or used keeps the last one
        (the next change is tried again), with a warning that names the file only."""
        path = self.setting.value_from_file
        try:
            value = self.setting.prefix + read_header_file(path)
        except (OSError, ValueError) as e:  # ValueError: not UTF-8, or too long
            reason = (e.strerror if isinstance(e, OSError) else None) or \
                ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e))
            log.warning("%s.value_from_file: cannot read %r (%s); still sending the last value",
                        self.key, path, reason)
            return
        problem = header_value_problem(value)
        if problem is not None:
            log.warning("%s.value_from_file: the value in %r %s; still sending the last value",
                        self.key, path, problem)
            return
        self._identity = identity
        if value != self._value:
            self._value = value
            log.info("%s: %s header read again from %r (it changed)", self.key, self.name,
                     path)


class Outbound:
    """What every client of one pool's endpoints needs: TLS, headers, timeouts, checks."""

    def __init__(self, index: int, pool: PoolSettings, settings: Settings, *,
                 check_interval: float = HEADER_FILE_CHECK_INTERVAL) -> None:
        where = f"pools[{index}]"
        self.name = pool.name
        limits, t = settings.limits, pool.timeouts
        self.connect_timeout = limits.connect_timeout if t.connect is None else t.connect
        self.first_byte_timeout = (limits.first_byte_timeout if t.first_byte is None
                                   else t.first_byte)
        self.idle_timeout = limits.idle_timeout if t.idle is None else t.idle
        self.total_timeout = limits.total_timeout if t.total is None else t.total
        health = settings.health
        self.health_active = health.active if pool.health.active is None else pool.health.active
        self.health_path = health.path if pool.health.path is None else pool.health.path
        self.load_poll = pool.load_poll
        self.ssl_context: ssl.SSLContext | None = None
        """The pool's TLS context; None when no endpoint is https (a Service's pods)."""
        self.server_name = pool.tls.server_name if pool.tls is not None else ""
        if pool.tls is not None or any(u.startswith("https:") for u in pool.endpoints):
            self.ssl_context = ssl_context(f"{where}.tls", pool.tls)
            if pool.tls is not None and not pool.tls.verify:
                log.warning("%s.tls.verify is off: pool %s's endpoints are not "
                            "authenticated, and whoever is on the path can read what is sent "
                            "to them, injected headers included", where, pool.name)
        self.headers = tuple(InjectedHeader(f"{where}.headers[{j}]", h, check_interval)
                             for j, h in enumerate(pool.headers))
        self.header_names = frozenset(h.name.lower() for h in self.headers)
        """Lowercased names of the injected headers: a client's of these names are
        dropped, so the configured value always wins."""

    def connector(self) -> Connector:
        """A connector for the request path's connection pools to this pool's endpoints."""
        return Connector(self.connect_timeout, self.ssl_context, self.server_name)

    def header_items(self) -> list[tuple[str, str]]:
        """The injected headers with their current values."""
        now = time.monotonic()
        return [(h.name, h.value(now)) for h in self.headers]

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiohttp request to one of the endpoints (checks, model
        reads, metrics polls): the same TLS context, server name and headers as requests."""
        options: dict[str, Any] = {}
        if self.ssl_context is not None:
            options["ssl"] = self.ssl_context
            if self.server_name:
                options["server_hostname"] = self.server_name
        if self.headers:
            options["headers"] = dict(self.header_items())
        return options


def outbounds(settings: Settings, *,
              check_interval: float = HEADER_FILE_CHECK_INTERVAL) -> dict[str, Outbound]:
    """Every pool's :class:`Outbound`, by pool name. Raises ConfigError when a TLS file
    does not load or a header's value cannot be had."""
    return {pool.name: Outbound(i, pool, settings, check_interval=check_interval)
            for i, pool in enumerate(settings.pools)}

