"""Bearer tokens with roles (tokens.py), checked by one interceptor for every
service on the gRPC port (both protocols and reflection; health stays open).
The caller's role is set for the call's log lines. Denials are raised as domain errors, which the observability
interceptor around this one maps to UNAUTHENTICATED / PERMISSION_DENIED and
counts like every other status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ..errors import PermissionDenied, Unauthenticated
from ..logs import caller_role
from ..tokens import TokenStore, bearer_token

OPEN_SERVICES = ("grpc.health.v1.Health",)
# Methods only the admin role may call; everything else needs infer (or admin).
ADMIN_METHODS = frozenset({
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
    # A caller who registers a region has the server open, read and write a file of its choosing.
    "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
    "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
})


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


def _denying(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind that fails with `error` (mapped to a status outside)."""
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error
        yield  # an async generator

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, des, ser)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        if handler is None or service in OPEN_SERVICES:
            return handler
        token = _bearer(details.invocation_metadata)
        role = None if token is None else self.store.role_of(token)
        if role is None:
            what = "no bearer token" if token is None else "unknown bearer token"
            return _denying(handler, Unauthenticated(f"{what}; send metadata 'authorization: Bearer <token>'"))
        # Set in the call's own task: its log lines name the role.
        caller_role.set(role)
        if method in ADMIN_METHODS and role != "admin":
            return _denying(handler, PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs the admin role; "
                                                      f"this token has {role}"))
        return handler
