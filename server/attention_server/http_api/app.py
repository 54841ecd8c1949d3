"""The HTTP port's ASGI app: the routes of both protocols behind one middleware
that does for every request what the gRPC interceptors do for every call:

- a 503 for requests on connections over http_max_connections (marked OVER_LIMIT
  by the protocol, server.py), health excepted;
- a 403 for a request whose `Origin` is not the server's own (scheme://Host):
  browsers send it with every cross-origin POST, so no web page elsewhere can
  call this server from its visitors' browsers (unload a model, use their
  network position); clients other than browsers send no Origin;
- the request body read within `http_body_timeout` of the headers (408), and the
  connection closed after a reply sent before the body was read to its end (a
  413, a 404) rather than the rest of a declared body read and thrown away;
- `X-Content-Type-Options: nosniff` on every reply; the explorer page may not be
  framed and runs under a Content-Security-Policy (its own inline script and
  style, calls to this origin only);
- a request id (the caller's `x-request-id` when it is of a safe charset and
  length, else a new one), set for the log lines and echoed in the response;
- bearer tokens and roles (tokens.py; the repository and shared-memory routes need `admin`,
  health and the explorer page are open);
- every exception mapped to a status and `{"error": "..."}` (errors.py);
- calls in flight counted (the drain waits for them), per-code counts and latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Code, PermissionDenied, Unauthenticated, Unavailable, quote
from ..logs import caller_role, request_id
from ..metrics import Metrics
from ..services.attention import AttentionService
from ..services.inference import InferenceService
from ..tokens import TokenStore, bearer_token
from ..tracing import CallSpan, Tracing, carrier
from . import oip, v1
from .errors import NOSNIFF, STATUS, BodyTimeout, error_response, status_for

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
# The same rule as the gRPC interceptor's: anything else is replaced (it ends up in logs).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
EXPLORE = "/explore"
OPEN_PATHS = HEALTH_PATHS | {EXPLORE}
ADMIN_PREFIXES = ("/v2/repository/", "/v2/systemsharedmemory/")
# The ASGI scope extension server.py sets on requests of a connection opened over http_max_connections.
OVER_LIMIT = "attention.over_limit"
# The ASGI scope extension server.py sets with http_body_timeout: {"seconds": float}.
BODY_TIMEOUT = "attention.body_timeout"
# The explorer page: its inline script and style, fetches to its own origin, no framing, nothing else.
EXPLORE_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                  b"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                  b"frame-ancestors 'none'"),
]
DEFAULT_PORTS = {"http": ":80", "https": ":443"}
CODE_OF_STATUS = {status: code for code, status in reversed(list(STATUS.items()))} | {413: Code.RESOURCE_EXHAUSTED}


def _request_id(value: str | None) -> str:
    if value and len(value) <= 64 and value[0].isalnum() and set(value) <= _SAFE:
        return value
    return uuid.uuid4().hex[:16]


def _origin(scheme: str, host: str) -> str:
    """scheme://host[:port] as browsers write it in `Origin`: lowercase, no default port."""
    host = host.strip().lower()
    port = DEFAULT_PORTS.get(scheme)
    if port and host.endswith(port):
        host = host.removesuffix(port)
    return f"{scheme}://{host}"


def _check_origin(scope: Scope, headers: dict[bytes, bytes]) -> None:
    """PERMISSION_DENIED for a request a browser sent from a page of another origin."""
    given = headers.get(b"origin")
    if given is None:
        return
    own = _origin(scope.get("scheme", "http"), headers.get(b"host", b"").decode("latin-1"))
    text = given.decode("latin-1")
    scheme, sep, host = text.partition("://")
    if sep and _origin(scheme.lower(), host) == own:
        return
    raise PermissionDenied(f"cross-origin request refused: Origin {quote(text)} is not this server's own origin "
                           f"{quote(own)}; browsers may call this server only from the pages it serves")


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    return b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"", b"0"))


def _service_label(path: str) -> str:
    return "http:inference" if path.startswith("/v2") else "http:attention.v1" if path.startswith("/v1") else "http"


class Calls:
    """Requests in flight on the HTTP port (the open ones excepted), for the drain."""

    def __init__(self) -> None:
        self.active = 0
        self.completed = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.active += 1
        self._idle.clear()

    def end(self) -> None:
        self.active -= 1
        self.completed += 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request (but the open ones: health, the page) is in flight; False on timeout."""
        if self.active == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True



class CallMiddleware:
    """Inside Starlette's own error layer: what a route raises reaches this first."""

    def __init__(self, app: ASGIApp, calls: Calls, metrics: Metrics, tokens: TokenStore | None,
                 tracing: Tracing | None = None, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes
        self.calls = calls
        self.metrics = metrics
        self.tokens = tokens
        self.tracing = tracing if tracing is not None and tracing.enabled else None  # None: off

    def _authorize(self, scope: Scope, path: str) -> None:
        if self.tokens is None or path in OPEN_PATHS:
            return
        headers = dict(scope["headers"])
        raw = headers.get(b"authorization")
        token = bearer_token(raw.decode("latin-1")) if raw else None
        role = None if token is None else self.tokens.role_of(token)
        if role is None:
            what = "no bearer token" if token is None else "unknown bearer token"
            raise Unauthenticated(f"{what}; send the header 'Authorization: Bearer <token>'")
        caller_role.set(role)
        if path.startswith(ADMIN_PREFIXES) and role != "admin":
            raise PermissionDenied(f"{path} needs the admin role; this token has {role}")

    def _method(self, scope: Scope) -> str:
        """The route's name for the metrics; for a request turned away before routing (a token,
        the connection limit), the name of the route it asked for."""
        name = getattr(scope.get("route"), "name", None)
        if name:
            return str(name)
        for route in self.routes:
            if isinstance(route, Route) and route.matches(scope)[0] is Match.FULL:
                return route.name
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        tracked = path not in OPEN_PATHS
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID.encode())
        rid = _request_id(given.decode("latin-1") if given else None)
        token = request_id.set(rid)
        service = _service_label(path)
        started = time.perf_counter()
        status = 500
        code: Code | None = None
        response_started = False
        extensions = scope.get("extensions") or {}
        over_limit = OVER_LIMIT in extensions and path not in HEALTH_PATHS
        body_pending = _has_body(headers)  # until its last part is received
        body_timeout: float | None = extensions.get(BODY_TIMEOUT, {}).get("seconds")
        # From the start of the call: a pipelined request's body is not read while it waits its turn.
        body_deadline = None if body_timeout is None else asyncio.get_running_loop().time() + body_timeout

        async def receive_within() -> Message:
            nonlocal body_pending
            if not body_pending:
                return await receive()
            if body_deadline is None or body_timeout is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(body_deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(body_timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_pending = False
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                extra = [(REQUEST_ID.encode(), rid.encode()), NOSNIFF]
                if path == EXPLORE:
                    extra += EXPLORE_HEADERS
                if body_pending:  # answered before the body was read to its end: the rest is not read
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        self.metrics.inflight.labels(service).inc()
        if tracked:
            self.calls.begin()
        span: CallSpan | None = None
        if self.tracing is not None and tracked:
            headers_text = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
            span = self.tracing.start_call(f"{scope['method']} {path}", carrier(headers_text), {
                "http.request.method": scope["method"], "url.path": path, "attention.request_id": rid})
        failure: BaseException | None = None
        try:
            if over_limit:
                raise Unavailable("the server has as many HTTP connections open as it serves at once "
                                  "(http_max_connections); retry")
            _check_origin(scope, headers)
            self._authorize(scope, path)
            await self.app(scope, receive_within, send_with_id)
        except asyncio.CancelledError:
            code = Code.CANCELLED
            log.info("%s: the caller went away before the reply was sent", path)
            raise
        except Exception as exc:  # the one mapping point
            failure = exc
            status, code, message = status_for(exc)
            if response_started:  # a stream broke after its status went out: the connection ends
                log.warning("%s: failed after the response started: %s", path, message)
                raise
            await error_response(status, message, close=over_limit)(scope, receive_within, send_with_id)
        finally:
            method = self._method(scope)
            if code is None and status >= 400:
                code = CODE_OF_STATUS.get(status, Code.INTERNAL)
            self.metrics.requests.labels(service, method, code.value if code else "OK").inc()
            self.metrics.latency.labels(service, method).observe(time.perf_counter() - started)
            self.metrics.inflight.labels(service).dec()
            if span is not None:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    span.span.update_name(f"{scope['method']} {route}")
                    span.span.set_attribute("http.route", route)
                outcome = {"http.response.status_code": status,
                           "rpc.response.status_code": code.value if code else "OK"}
                span.end(outcome, str(status) if status >= 500 else None, failure if code is Code.INTERNAL else None)
            if tracked:
                self.calls.end()
            request_id.reset(token)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no such path {request.url.path!r}; see /v2 (Open Inference Protocol), /v1 (attention.v1 "
                    "as JSON), /explore", 405: f"method {request.method} not allowed on {request.url.path!r}"}
    return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)))


def build_app(attention: AttentionService, inference: InferenceService, metrics: Metrics,
              tokens: TokenStore | None, max_request_bytes: int,
              tracing: Tracing | None = None) -> tuple[Starlette, Calls]:
    """The ASGI app to serve, and its count of requests in flight (for the drain)."""
    calls = Calls()
    routes = [*oip.routes(inference, max_request_bytes), *v1.routes(attention, max_request_bytes)]
    app = Starlette(routes=routes,
                    middleware=[Middleware(CallMiddleware, calls=calls, metrics=metrics, tokens=tokens,
                                           tracing=tracing, routes=routes)],
                    exception_handlers={HTTPException: _http_error})
    # A path with a trailing slash is a 404 like any other unknown path, not a redirect to a
    # URL built from the request's Host header.
    app.router.redirect_slashes = False
    return app, calls
