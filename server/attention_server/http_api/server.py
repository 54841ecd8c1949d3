"""The HTTP port: uvicorn serving the ASGI app in the gRPC server's process and
event loop. The socket is bound first (a busy port fails at once, in one line);
signals stay with the service's own CLI; the drain keeps the listener open while
requests in flight finish, then closes connections."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from ..settings import Settings
from .tls import RotatingContext

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # SIGTERM and SIGINT are the service's (cli.py): they drain both ports


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
        import asyncio

        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, http="httptools", ws="none",
            interface="asgi3", server_header=False, proxy_headers=False,
            limit_concurrency=self.settings.http_max_connections,
            timeout_keep_alive=int(max(1, self.settings.http_keepalive_timeout)),
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
        """Close the listener and the idle connections; requests still running get `grace` seconds."""
        if self._server is None:
            self.socket.close()
            return
        self._server.config.timeout_graceful_shutdown = max(1, int(grace + 0.999))
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = None
