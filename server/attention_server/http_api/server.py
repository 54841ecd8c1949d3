"""The HTTP port: uvicorn serving the ASGI app in the gRPC server's process and
event loop. The socket is bound first (a busy port fails at once, in one line);
signals stay with the service's own CLI; the drain keeps the listener open while
requests in flight finish, then closes connections.

uvicorn's HTTP protocol gets three bounds of its own here (_HttpProtocol): the
request line and headers must arrive within the keep-alive timeout and fit in
max_metadata_kib (as gRPC metadata must), and connections beyond
http_max_connections have their requests refused with 503 while those already
open keep being served."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings
from .app import OVER_LIMIT
from .errors import head_too_large
from .tls import RotatingContext

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # SIGTERM and SIGINT are the service's (cli.py): they drain both ports


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded: a request head (line and headers) that
    is not complete `head_timeout` seconds after the connection opened or the
    request began closes the connection (clients that never finish their headers
    hold no connection slot); a head over `max_head_bytes` gets 431 and the
    connection closes (httptools keeps whatever it is sent); a connection opened
    while `max_connections` others are open marks its requests OVER_LIMIT (the app
    answers 503)."""

    head_timeout: float = 15.0
    max_head_bytes: int = 16 << 10
    max_connections: int = 1000

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False  # a 431 went out; the rest of what the client sent is ignored
    _over_limit = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_limit = len(self.connections) > self.max_connections
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def _expect_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("HTTP connection from %s closed: no complete request head within %.1f s",
                      self.client[0] if self.client else "?", self.head_timeout)
            self.transport.close()

    def _within_head_limit(self, size: int) -> bool:
        if self._refused:
            return False
        self._head_bytes += size
        if self._head_bytes <= self.max_head_bytes:
            return True
        self._refused = True
        self._head_done()
        log.info("HTTP request head over %d bytes refused (max_metadata_kib)", self.max_head_bytes)
        self.transport.write(head_too_large(self.max_head_bytes))
        self.transport.close()
        return False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._expect_head()

    def on_url(self, url: bytes) -> None:
        if self._within_head_limit(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._within_head_limit(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_done()
        if self._refused:
            return
        if self._over_limit:
            self.scope["extensions"] = {**self.scope.get("extensions", {}), OVER_LIMIT: {}}
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError with one line naming the port and the setting."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        if family == socket.AF_INET6 and address == "::" and socket.has_dualstack_ipv6():
            sock = socket.create_server((address, port), family=family, dualstack_ipv6=True, reuse_port=False)
        else:
            sock = socket.create_server((address, port), family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"HTTP port {host}:{port} is already in use; free it or choose another --http-port "
                          "(0 picks a free one, -1 turns the HTTP port off)") from None
        raise OSError(f"cannot bind the HTTP port {host}:{port} ({exc.strerror or exc}); check --http-host and "
                      "--http-port (-1 turns the HTTP port off)") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, settings: Settings, tls: RotatingContext | None) -> None:
        self.settings = settings
        self.tls = tls
        host = settings.http_host if settings.http_host is not None else settings.host
        self.socket = bind(host, settings.http_port)
        self.port: int = self.socket.getsockname()[1]
        self._server: _Uvicorn | None = None
        self._task: Any = None

    async def start(self, app: Any) -> None:
        protocol = type("HttpProtocol", (_HttpProtocol,), {
            "head_timeout": self.settings.http_keepalive_timeout,
            "max_head_bytes": self.settings.max_metadata_kib << 10,
            "max_connections": self.settings.http_max_connections,
        })
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, http=protocol, ws="none",
            interface="asgi3", server_header=False, proxy_headers=False,
            # The limit is _HttpProtocol's: uvicorn's own counts the asking connection too (a limit of 1
            # serves nothing) and, once reached, refuses the requests of every connection, old ones included.
            limit_concurrency=None,
            timeout_keep_alive=math.ceil(self.settings.http_keepalive_timeout),
            timeout_graceful_shutdown=max(1, int(self.settings.grace_period)),
        )
        config.load()
        if self.tls is not None:
            config.ssl = self.tls.context
        logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
        self._server = _Uvicorn(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.socket]),
                                                            name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        """Close the listener and the idle connections; requests still running, and replies
        still on their way to the client, get `grace` seconds."""
        if self._server is None:
            self.socket.close()
            return
        self._server.config.timeout_graceful_shutdown = max(1, int(grace + 0.999))
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = None
