"""The one place where exceptions become HTTP statuses: a JSON body
`{"error": "..."}` with the status that matches the gRPC code."""

from __future__ import annotations

import logging
import uuid

from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..errors import Code, ServiceError, TooLarge
from .responses import dumps, json_response

log = logging.getLogger(__name__)

STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
# Seconds a caller told to come back (429, 503) should wait first.
RETRY_AFTER = "1"
# Every response: browsers take a reply for what its Content-Type says, never sniff it.
NOSNIFF = (b"x-content-type-options", b"nosniff")


class BodyTimeout(ServiceError):
    """The request's body did not arrive within http_body_timeout of its headers: 408,
    and the connection is closed (what is left of the body is never read)."""

    code = Code.DEADLINE_EXCEEDED

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout:g} s of its headers "
                         "(http_body_timeout); send it at once, or split it")


def status_for(exc: BaseException) -> tuple[int, Code, str]:
    """The HTTP status, the matching code and the message for an exception;
    unexpected ones are logged with their traceback under an incident id, which
    is all the caller sees."""
    if isinstance(exc, ServiceError):
        log.info("-> %s: %s", exc.code.value, exc.message)
        status = 413 if isinstance(exc, TooLarge) else 408 if isinstance(exc, BodyTimeout) else STATUS[exc.code]
        return status, exc.code, exc.message
    if isinstance(exc, ClientDisconnect):  # the caller left while its body was read: nothing to answer
        log.info("-> CANCELLED: the caller went away while its request body was read")
        return 499, Code.CANCELLED, "the caller went away before its request body arrived"
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected failure (incident %s)", incident, exc_info=exc)
    return 500, Code.INTERNAL, f"internal error (incident {incident}); see the server log"


def error_response(status: int, message: str, close: bool = False) -> Response:
    """The JSON error reply; `close` ends the connection after it (Connection: close)."""
    headers = {}
    if status in (429, 503):
        headers["retry-after"] = RETRY_AFTER
    elif status == 401:
        headers["www-authenticate"] = "Bearer"
    if close:
        headers["connection"] = "close"
    return json_response({"error": message}, status, headers)


def head_too_large(limit: int) -> bytes:
    """A whole HTTP/1.1 431 reply, written by the protocol itself: the request never reaches the app."""
    body = dumps({"error": f"request line and headers over the {limit} byte limit (max_metadata_kib)"})
    head = (f"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            f"x-content-type-options: nosniff\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body
