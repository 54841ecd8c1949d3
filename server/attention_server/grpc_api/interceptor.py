"""One interceptor for every call: request id (from `x-request-id` metadata or
new), in-flight gauge, per-code counts, latency, and the id echoed back in the
trailing metadata."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ..logs import request_id
from ..metrics import Metrics

REQUEST_ID = "x-request-id"


def _split(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        given = dict(details.invocation_metadata or ()).get(REQUEST_ID)
        metrics = self.metrics

        def begin(context: grpc.aio.ServicerContext) -> tuple[float, contextvars.Token[str]]:
            rid = given if isinstance(given, str) and given else uuid.uuid4().hex[:16]
            token = request_id.set(rid)
            context.set_trailing_metadata(((REQUEST_ID, rid),))
            metrics.inflight.labels(service).inc()
            return time.perf_counter(), token

        def end(context: grpc.aio.ServicerContext, started: float, token: Any, failed: BaseException | None) -> None:
            code = context.code()
            if code is None:
                cancelled = isinstance(failed, asyncio.CancelledError)
                code = grpc.StatusCode.OK if failed is None else (
                    grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN)
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.requests.labels(service, method, name).inc()
            metrics.latency.labels(service, method).observe(time.perf_counter() - started)
            metrics.inflight.labels(service).dec()
            request_id.reset(token)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, token = begin(context)
                failed = None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    end(context, started, token, failed)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)

        def streaming(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started, token = begin(context)
                failed = None
                try:
                    async for item in inner(request, context):
                        yield item
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    end(context, started, token, failed)

            return wrapper

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler

