"""The HTTP port: uvicorn serving the ASGI app in the gRPC server's process and
event loop. The socket is bound first (a busy port fails at once, in one line);
signals stay with the service's own CLI; the drain keeps the listener open while
requests in flight finish, then closes connections.

uvicorn's HTTP protocol gets bounds of its own here (_HttpProtocol): the
request line and headers must arrive within the keep-alive timeout and fit in
max_metadata_kib (as gRPC metadata must); connections beyond
http_max_connections have their requests refused with 503 while those already
open keep being served; a connection has at most MAX_PIPELINE requests queued
behind the one being answered (pipelining), and what it sends beyond them waits
in the socket, unread; the body's deadline (http_body_timeout) goes to the app
(app.py answers 408)."""

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
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings
from .app import BODY_TIMEOUT, OVER_LIMIT
from .errors import head_too_large
from .responses import ABORT
from .tls import RotatingContext

log = logging.getLogger(__name__)
# Requests one connection may have queued behind the one being answered (HTTP/1.1 pipelining).
MAX_PIPELINE = 8
# What a connection sends is parsed this many bytes at a time (a body of a declared length at
# once), so that parsing stops soon after the pipeline is full: a 256 KiB read could otherwise
# queue 14,000 requests of 18 bytes at once.
PARSE_SLICE = 2048
# A reply sent before the request's body was read to its end (a 413 from the declared length,
# a 408) closes the connection, but not at once: the client may still be sending, and input
# that arrives at a closed socket resets the connection, the reply lost before the client
# reads it. What it sends is read and dropped until it pauses for LINGER_IDLE seconds, for at
# most LINGER_SECONDS and LINGER_BYTES in all; then the socket closes.
LINGER_IDLE = 1.0
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 << 20


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # SIGTERM and SIGINT are the service's (cli.py): they drain both ports


class _Flow(FlowControl):
    """uvicorn's flow control, with reading kept paused while the protocol holds back
    what the client sent (uvicorn resumes it whenever the app reads or a reply ends)."""

    def __init__(self, transport: asyncio.Transport, held: Any) -> None:
        super().__init__(transport)
        self._held = held

    def resume_reading(self) -> None:
        if not self._held():
            super().resume_reading()


class _Lingering:
    """The connection's transport as uvicorn's request cycles see it: closing it while
    the request's body is still coming in lingers (the protocol's `close_after_reply`)."""

    def __init__(self, transport: asyncio.Transport, protocol: _HttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_after_reply()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded: a request head (line and headers) that
    is not complete `head_timeout` seconds after the connection opened or the
    request began closes the connection (clients that never finish their headers
    hold no connection slot); a head over `max_head_bytes` gets 431 and the
    connection closes (httptools keeps whatever it is sent); a connection opened
    while `max_connections` others are open marks its requests OVER_LIMIT (the app
    answers 503). Requests sent ahead (pipelined) are parsed only while fewer than
    `max_pipeline` wait behind the one being answered: the rest of the bytes wait,
    and the socket is not read, until the queue drains (uvicorn queues every
    request a read holds and reads on after each reply: one socket writing
    `GET /v1/models` without reading its replies held 1.5 GB). The requests carry
    `body_timeout`, the seconds their body has to arrive once the app takes them.
    A reply that closes the connection before its request's body is in lingers:
    see LINGER_SECONDS."""

    head_timeout: float = 15.0
    max_head_bytes: int = 16 << 10
    max_connections: int = 1000
    max_pipeline: int = MAX_PIPELINE
    body_timeout: float = 60.0

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False  # a 431 went out; the rest of what the client sent is ignored
    _over_limit = False
    _backlog = b""  # received, not parsed yet: the pipeline was full
    _body_left = 0  # bytes of the current request's declared body not parsed yet
    _raw: asyncio.Transport
    _lingering: asyncio.TimerHandle | None = None  # the connection is closing: input is dropped
    _linger_end = 0.0
    _dropped = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        self.transport = _Lingering(transport, self)  # type: ignore[assignment]  # a stand-in
        self.flow = _Flow(transport, self._holding)
        self._over_limit = len(self.connections) > self.max_connections
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self._backlog = b""
        if self._lingering is not None:
            self._lingering.cancel()
        self.transport = self._raw
        super().connection_lost(exc)

    # -- closing -----------------------------------------------------------------------

    @property
    def lingering(self) -> bool:
        return self._lingering is not None

    def close_after_reply(self) -> None:
        """Close the connection; while the client is still sending the request's body,
        first half-close it and drop what arrives, for a bounded time."""
        cycle = self.cycle
        if (self._lingering is not None or self._raw.is_closing() or cycle is None or not cycle.more_body
                or not cycle.response_complete or cycle.disconnected or self.parser is None):
            if self._lingering is None:
                self._raw.close()
            return
        self._backlog = b""
        if self._raw.can_write_eof():  # the reply is followed by FIN (TLS cannot half-close)
            self._raw.write_eof()
        self._linger_end = self.loop.time() + LINGER_SECONDS
        self._lingering = self.loop.call_later(LINGER_IDLE, self._raw.close)
        self._raw.resume_reading()  # the client's end of file closes it sooner
        self.flow.read_paused = False

    def _still_lingering(self, size: int) -> None:
        """Input while closing: dropped; the idle timer starts again, within the overall bound."""
        self._dropped += size
        if self._lingering is not None:
            self._lingering.cancel()
        left = self._linger_end - self.loop.time()
        if self._dropped > LINGER_BYTES or left <= 0:
            self._raw.close()
        else:
            self._lingering = self.loop.call_later(min(LINGER_IDLE, left), self._raw.close)

    # -- pipelining ------------------------------------------------------------------

    def _pipeline_full(self) -> bool:
        return len(self.pipeline) >= self.max_pipeline

    def _holding(self) -> bool:
        return bool(self._backlog) or self._pipeline_full()

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._still_lingering(len(data))
            return
        if self._holding():
            self._hold(data)
            return
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._pipeline_full():
                self._hold(view[pos:])
                return
            step = max(self._body_left, PARSE_SLICE)
            super().data_received(view[pos:pos + step])  # type: ignore[arg-type]  # httptools takes any buffer
            pos += step
            if self.parser is None or self.transport.is_closing():
                return

    def _hold(self, data: bytes | memoryview) -> None:
        self._backlog += data
        self.flow.pause_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next request of the pipeline, if any
        if self._backlog and not self._pipeline_full() and not self.transport.is_closing():
            self.loop.call_soon(self._parse_backlog)

    def _parse_backlog(self) -> None:
        if self.parser is None or self.transport.is_closing() or self._pipeline_full():
            return
        data, self._backlog = self._backlog, b""
        self.data_received(data)
        if not self._holding():
            self.flow.resume_reading()

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
        extensions: dict[str, Any] = {**self.scope.get("extensions", {}), ABORT: self.transport.abort,
                                      BODY_TIMEOUT: {"seconds": self.body_timeout}}
        if self._over_limit:
            extensions[OVER_LIMIT] = {}
        self.scope["extensions"] = extensions
        length = dict(self.headers).get(b"content-length", b"")
        self._body_left = int(length) if length.isdigit() and len(length) < 19 else 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_left = max(0, self._body_left - len(body))
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
            "body_timeout": self.settings.http_body_timeout,
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
