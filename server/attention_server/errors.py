"""Domain errors. Each carries a transport-neutral status code; the gRPC layer
maps the code to a gRPC status in one place (grpc_api/errors.py)."""

from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


# Caller values quoted in messages and logs are cut to this many characters.
QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of a caller's value, cut to a short prefix: error replies and logs
    never echo unbounded input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class ServiceError(Exception):
    """Base of every error the service reports to its callers on purpose."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


FieldPath = tuple[str | int, ...]
"""Where in a request a value sits, e.g. ("sequences", 0, "token_ids", "ids", 3); each
protocol renders it in its own names (attention.v1: `sequences[0].token_ids.ids[3]`)."""


def render_path(path: FieldPath) -> str:
    """attention.v1's rendering: names joined by dots, indices in brackets."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class InvalidArgument(ServiceError):
    """The request is wrong; the message names the field and the limit."""

    code = Code.INVALID_ARGUMENT

    def __init__(self, field: FieldPath | str, problem: str) -> None:
        self.field: FieldPath = field if isinstance(field, tuple) else (field,)
        self.problem = problem
        super().__init__(f"{render_path(self.field)}: {problem}")


class ModelNotFound(ServiceError):
    code = Code.NOT_FOUND

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"model {quote(name)} not found; available: {', '.join(sorted(available)) or 'none'}")
        self.name = name


class ResourceExhausted(ServiceError):
    code = Code.RESOURCE_EXHAUSTED


class TooLarge(ResourceExhausted):
    """A size limit: the same call can never succeed (unlike a full queue, which a
    retry after a while may get through). HTTP answers 413 for it, not 429."""


class Unavailable(ServiceError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = Code.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    """The request is fine but the server's state refuses it (e.g. a model folder that cannot be loaded)."""

    code = Code.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = Code.PERMISSION_DENIED


class ModelLoadError(Exception):
    """A model folder in the repository cannot be loaded (start-up failure)."""
