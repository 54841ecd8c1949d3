"""The one interceptor around every call on the port (both protocols, health and
reflection included):

- parses the request itself (handlers are registered with their deserializer
  and the interceptor calls it), so an undecodable message is INVALID_ARGUMENT
  with a plain message and one WARNING line, never UNKNOWN with a class name;
- maps every exception a handler raises to a status (errors.status_for): domain
  errors keep their code, anything else is INTERNAL with an incident id;
- gives the call a request id (a caller's `x-request-id` when it is of a safe
  charset and length, else a new one), echoed in the trailing metadata;
- counts calls in flight (for the drain on SIGTERM), per-code counts, latency;
- with tracing on, gives each call a SERVER span (the caller's W3C traceparent
  is its parent), current while the handler runs (health checks excepted).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..errors import InvalidArgument
from ..logs import request_id
from ..metrics import Metrics
from ..tracing import CallSpan, Tracing, carrier
from .errors import abort_for

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
# What a caller's request id may look like; anything else is replaced (it ends up in logs).
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# Calls the drain does not wait for (probes keep answering while the server drains), and
# that get no span (probes every few seconds would outnumber every other trace).
UNTRACKED_SERVICES = ("grpc.health.v1.Health",)
# Status codes that mark a call's span failed: the server's fault (OpenTelemetry's gRPC
# conventions); the others are the caller's, and the call itself went right.
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
# Request messages larger than this are parsed in a worker thread, off the event loop.
INLINE_PARSE_BYTES = 1 << 20


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


def caller_request_id(metadata: Any) -> str | None:
    """The caller's x-request-id when it is safe to log and echo, else None."""
    for key, value in metadata or ():
        if key == REQUEST_ID:
            if isinstance(value, str) and SAFE_REQUEST_ID.fullmatch(value):
                return value
            return None
    return None


def _parser(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except (DecodeError, ValueError, TypeError, RuntimeError) as exc:
            log.warning("%s: malformed request message (%d bytes, %s)", method, len(raw), type(exc).__name__)
            raise InvalidArgument("request", f"not a valid {method} request message "
                                  f"({len(raw)} bytes could not be decoded)") from None

    return parse


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.tracing = tracing if tracing is not None and tracing.enabled else None  # None: off
        self._active = 0
        self.completed = 0  # calls ended (health checks excepted), ever
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active_calls(self) -> int:
        """Calls in flight, health checks excepted."""
        return self._active

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call (but health checks) is in flight; False on timeout."""
        if self._active == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        tracked = service not in UNTRACKED_SERVICES
        given = caller_request_id(details.invocation_metadata)
        parse = _parser(handler.request_deserializer, method)
        metrics = self.metrics
        tracing = self.tracing if tracked else None

        def begin(context: grpc.aio.ServicerContext) -> tuple[float, contextvars.Token[str], CallSpan | None]:
            rid = given or uuid.uuid4().hex[:16]
            token = request_id.set(rid)
            context.set_trailing_metadata(((REQUEST_ID, rid),))
            metrics.inflight.labels(service).inc()
            if tracked:
                self._active += 1
                self._idle.clear()
            span = None
            if tracing is not None:
                span = tracing.start_call(f"{service}/{method}", carrier(details.invocation_metadata or ()), {
                    "rpc.system.name": "grpc", "rpc.method": f"{service}/{method}", "attention.request_id": rid})
            return time.perf_counter(), token, span

        def end(context: grpc.aio.ServicerContext, started: float, token: Any, span: CallSpan | None,
                failed: BaseException | None) -> None:
            code = context.code()
            if isinstance(failed, asyncio.CancelledError):  # a caller hanging up is normal: one line
                log.info("%s: the caller went away before the reply was sent", method)
            if code is None:
                cancelled = isinstance(failed, asyncio.CancelledError)
                code = grpc.StatusCode.OK if failed is None else (
                    grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN)
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.requests.labels(service, method, name).inc()
            metrics.latency.labels(service, method).observe(time.perf_counter() - started)
            metrics.inflight.labels(service).dec()
            if span is not None:
                span.end({"rpc.response.status_code": name}, name if name in SERVER_ERRORS else None,
                         failed if name in ("INTERNAL", "UNKNOWN") else None)
            if tracked:
                self._active -= 1
                self.completed += 1
                if self._active == 0:
                    self._idle.set()
            with contextlib.suppress(ValueError):  # a call cancelled at stop ends in another context
                request_id.reset(token)

        async def parsed(raw: bytes) -> Any:
            if len(raw) <= INLINE_PARSE_BYTES:
                return parse(raw)
            return await asyncio.to_thread(parse, raw)  # a 16 MiB message takes tens of ms

        async def requests(raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for message in raw:
                yield await parsed(message)

        async def request_of(request: Any, streaming_in: bool) -> Any:
            return requests(request) if streaming_in else await parsed(request)

        def unary_out(inner: Callable[..., Awaitable[Any]], streaming_in: bool) -> Callable[..., Awaitable[Any]]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, token, span = begin(context)
                failed: BaseException | None = None
                try:
                    return await inner(await request_of(request, streaming_in), context)
                except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
                    failed = exc
                    raise
                except Exception as exc:
                    failed = exc
                    await abort_for(exc, context, method)
                    raise AssertionError("unreachable") from exc
                finally:
                    end(context, started, token, span, failed)

            return call

        def stream_out(inner: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, token, span = begin(context)
                failed: BaseException | None = None
                try:
                    responses = inner(await request_of(request, streaming_in), context)
                    if inspect.isawaitable(responses):  # a handler that writes with context.write (health Watch)
                        await responses
                    else:
                        async for item in responses:
                            yield item
                            del item  # a sent message is not kept while the next one is made
                except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
                    failed = exc
                    raise
                except Exception as exc:  # noqa: BLE001 - the one mapping point
                    failed = exc
                    await abort_for(exc, context, method)
                finally:
                    end(context, started, token, span, failed)

            return call

        # Handlers get raw bytes from grpc (no deserializer) and parsed messages from us.
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary_out(handler.unary_unary, False), None,
                                                       handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary_out(handler.stream_unary, True), None,
                                                        handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream_out(handler.unary_stream, False), None,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(stream_out(handler.stream_stream, True), None,
                                                         handler.response_serializer)
        return handler
