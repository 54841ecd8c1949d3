"""The one place where exceptions become gRPC statuses (used by the interceptor
around every call)."""

from __future__ import annotations

import logging
import uuid

import grpc

from ..errors import Code, ServiceError

log = logging.getLogger(__name__)

STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.CANCELLED: grpc.StatusCode.CANCELLED,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a caller gets for an exception; unexpected ones are
    logged with their traceback under an incident id, which is all the caller sees."""
    if isinstance(exc, ServiceError):
        log.info("-> %s: %s", exc.code.value, exc.message)
        return STATUS[exc.code], exc.message
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected failure (incident %s)", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the server log"


async def abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    """End the call with the status for `exc` (raises AbortError)."""
    code, message = status_for(exc)
    await context.abort(code, message)
