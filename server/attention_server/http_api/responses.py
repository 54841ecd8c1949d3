"""Response bodies: JSON (orjson, numpy arrays included) and multi-part binary
bodies sent without joining their parts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import Code, ServiceError

JSON = "application/json"
OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=OPTIONS)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers, media_type=JSON)


# Bodies go out in pieces of this size: each waits until the client has taken
# the previous ones (uvicorn's flow control), so a reply's memory is held, and
# counted in the result budget, until it is really sent.
CHUNK = 1 << 20


# The scope extension (set by http_api/server.py) that drops the connection at once,
# unsent bytes included: what a reply to a client that stopped reading needs.
ABORT = "attention.abort"


class SlowReader(ServiceError):
    """The client did not read for `http_write_timeout` seconds: the connection is dropped."""

    code = Code.CANCELLED


class _DropSlowReaders(logging.Filter):
    """uvicorn logs an app exception after the response started with a traceback:
    for a client that stopped reading, the middleware's one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SlowReader))


def quiet_slow_readers() -> None:
    """Install the filter on uvicorn's error logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropSlowReaders) for f in logger.filters):
        logger.addFilter(_DropSlowReaders())


def write_timeout(scope: Scope) -> float | None:
    """The app's `http_write_timeout` (set on app.state by the server), or None."""
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "write_timeout", None)


async def send_body(send: Send, body: bytes | memoryview, more: bool, timeout: float | None,
                    scope: Scope | None = None) -> None:
    """Send `body` in CHUNK pieces, each within `timeout` seconds; after that the
    connection is dropped (its unsent bytes with it) and SlowReader raised."""
    view = memoryview(body)
    starts = range(0, len(view), CHUNK) if len(view) else [0]
    for start in starts:
        message = {"type": "http.response.body", "body": view[start:start + CHUNK],
                   "more_body": more or start + CHUNK < len(view)}
        try:
            await asyncio.wait_for(send(message), timeout)
        except TimeoutError:
            abort = (scope or {}).get("extensions", {}).get(ABORT)
            if abort is not None:
                abort()
            raise SlowReader(f"the client read nothing for {timeout:.0f} s (http_write_timeout)") from None


class PartsResponse(Response):
    """A body made of several buffers (a JSON header and multi-MB tensors), sent
    one after another with one Content-Length: no copy joins them."""

    def __init__(self, parts: Sequence[bytes], headers: Mapping[str, str], media_type: str,
                 background: BackgroundTask | None = None) -> None:
        super().__init__(b"", 200, dict(headers), media_type, background)
        self.parts = parts
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Sends the parts; the background task (releasing what the body holds, e.g.
        its share of the result budget) runs once they are sent, or when sending
        fails, times out or the call is cancelled."""
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            parts = [] if scope["method"] == "HEAD" else self.parts
            timeout = write_timeout(scope)
            for i, part in enumerate(parts):
                await send_body(send, part, i < len(parts) - 1, timeout, scope)
            if not parts:
                await send({"type": "http.response.body", "body": b""})
        finally:
            self.parts = []
            if self.background is not None:
                await self.background()


class LinesResponse(Response):
    """Newline-delimited JSON from an async iterator, each line sent within the write
    timeout; the iterator is closed however the response ends (a client that leaves
    gives back what its stream holds at once)."""

    def __init__(self, lines: AsyncIterator[bytes], media_type: str) -> None:
        # No body, so no Content-Length: uvicorn sends it chunked.
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(None)
        self.lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            timeout = write_timeout(scope)
            async for line in self.lines:
                await send_body(send, line, True, timeout, scope)
                del line
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.lines, "aclose", None)
            if aclose is not None:
                await aclose()
