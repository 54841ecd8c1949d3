"""The SDK's exceptions: one class per gRPC status, all under AttentionError.

Every failure the SDK raises for a bad call or a failed RPC is an AttentionError:
catch the base for "the call failed", a subclass for one cause. Each carries

- `code`: the gRPC status code (`grpc.StatusCode.INVALID_ARGUMENT`, ...);
- `details`: the message, naming the field and the limit for bad input
  (`options.top_k: must be at least 1 when set ...`);
- `request_id`: the server's `x-request-id` for this call (also in its log), or
  None when the call never reached a server (the SDK refused it first);
- `retryable`: whether the same call may succeed later, retried with backoff.

An RPC failure is raised `from` the grpc.RpcError, so the original stays in
`__cause__`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import grpc

REQUEST_ID = "x-request-id"
"""Trailing metadata key the server echoes its request id in."""

# RESOURCE_EXHAUSTED for a size limit comes back the same for the same call; the
# server's other RESOURCE_EXHAUSTED (a full queue or result budget) pass.
_SIZE_LIMITS = ("max_response_bytes", "larger than max", "more than the whole queue holds")


class AttentionError(Exception):
    """A failed call: `code`, `details`, `request_id`, `retryable` (see the module docstring)."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    """The status this class stands for (the base class: any status without a class of its own)."""

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, request_id: str | None = None) -> None:
        super().__init__(details)
        self.code: grpc.StatusCode = self.status if code is None else code
        self.details = details
        self.request_id = request_id

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.code.name}: {self.details}{suffix}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments are not in self.args: pickle (multiprocessing,
        # concurrent.futures) rebuilds from the details and restores the rest.
        return (type(self), (self.details,), self.__dict__.copy())

    @property
    def retryable(self) -> bool:
        """True when retrying the same call later (with backoff) may succeed: UNAVAILABLE
        (server down, restarting or draining), and RESOURCE_EXHAUSTED for a full queue or
        result budget, but not for a response or message over a size limit. Never for
        INVALID_ARGUMENT, DEADLINE_EXCEEDED (the work did not fit the deadline: give more
        time or ask for less) or the other statuses."""
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return True
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return not any(marker in self.details for marker in _SIZE_LIMITS)
        return False

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> AttentionError:
        """The AttentionError subclass for a failed call's status, with its details and request id."""
        code = _call(error, "code")
        details = _call(error, "details")
        status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
        text = details if isinstance(details, str) else str(error)
        return error_for(status, text, request_id=_request_id(_call(error, "trailing_metadata")))


class CallCancelledError(AttentionError):
    """CANCELLED: the call was cancelled (by this client, or the connection went away)."""

    status = grpc.StatusCode.CANCELLED


class UnknownError(AttentionError):
    """UNKNOWN: a failure without a status (e.g. a server or proxy that is not this service)."""

    status = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(AttentionError, ValueError):
    """INVALID_ARGUMENT: bad input; `details` names the field and the limit. Raised by the
    SDK before the call for values it can check itself, by the server for the rest (e.g.
    limits of the model). Also a ValueError. Not retryable: fix the call."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(AttentionError):
    """DEADLINE_EXCEEDED: the call's timeout passed (possibly while waiting in the server's
    queue). Not retryable as is: give a longer timeout or ask for less."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(AttentionError):
    """NOT_FOUND: e.g. an unknown model name."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(AttentionError):
    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(AttentionError):
    """PERMISSION_DENIED: the token is valid but its role may not make this call."""

    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(AttentionError):
    """RESOURCE_EXHAUSTED: a full queue or result budget (retryable with backoff), or a
    response over the server's size limit (not retryable: use analyze_stream, float16,
    fewer layers/heads or top_k only). `retryable` tells which."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(AttentionError):
    """FAILED_PRECONDITION: e.g. a model that cannot be loaded on the server."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(AttentionError):
    status = grpc.StatusCode.ABORTED


class OutOfRangeError(AttentionError):
    status = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(AttentionError):
    """UNIMPLEMENTED: the server does not have this method (an older server, or another service)."""

    status = grpc.StatusCode.UNIMPLEMENTED


class InternalError(AttentionError):
    """INTERNAL: an unexpected failure on the server (the details hold an incident id that is
    also in the server log), or a response this SDK could not decode."""

    status = grpc.StatusCode.INTERNAL


class UnavailableError(AttentionError):
    """UNAVAILABLE: no connection (server down, TLS refused), or the server is shutting down.
    Retryable with backoff."""

    status = grpc.StatusCode.UNAVAILABLE


class DataLossError(AttentionError):
    status = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(AttentionError):
    """UNAUTHENTICATED: no bearer token, or one the server does not know."""

    status = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[AttentionError]] = {
    c.status: c for c in (
        CallCancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError, NotFoundError,
        AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError, FailedPreconditionError, AbortedError,
        OutOfRangeError, UnimplementedError, InternalError, UnavailableError, DataLossError, UnauthenticatedError,
    )
}


def error_for(code: grpc.StatusCode, details: str, *, request_id: str | None = None) -> AttentionError:
    """The exception for a status: its subclass (AttentionError itself for a code without one)."""
    return _BY_CODE.get(code, AttentionError)(details, code=code, request_id=request_id)


def _call(error: object, name: str) -> object:
    method = getattr(error, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # noqa: BLE001 - an RpcError that cannot tell: treat as unknown
        return None


def _request_id(metadata: object) -> str | None:
    if not isinstance(metadata, Iterable):
        return None
    for item in metadata:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if key == REQUEST_ID:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None
