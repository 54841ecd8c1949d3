"""Bearer tokens with roles, checked by one interceptor for every service on the
port (both protocols and reflection; health stays open).

The tokens file holds `ROLE:SHA256HEX` lines: the lowercase hex SHA-256 of each
token, never a usable token. It is read again when it changes (checked at most
once a second) or on SIGHUP (`reload()`), so a token is revoked without a
restart. The caller's role is set for the call's log lines; tokens and hashes
are never logged. Denials are raised as domain errors, which the observability
interceptor around this one maps to UNAUTHENTICATED / PERMISSION_DENIED and
counts like every other status.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from ..errors import PermissionDenied, Unauthenticated
from ..logs import caller_role

log = logging.getLogger(__name__)

ROLES = ("infer", "admin")
OPEN_SERVICES = ("grpc.health.v1.Health",)
# Methods only the admin role may call; everything else needs infer (or admin).
ADMIN_METHODS = frozenset({
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
})
CHECK_EVERY = 1.0  # seconds between looks at the file's modification time


class TokenFileError(ValueError):
    """The tokens file is unreadable or malformed (names the file and line)."""


def parse_tokens(text: str, path: Path) -> dict[str, str]:
    """{sha256 hex: role} from the file's text."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        role, sep, digest = line.partition(":")
        role, digest = role.strip(), digest.strip().lower()
        if not sep or role not in ROLES:
            raise TokenFileError(f"{path}:{number}: expected ROLE:SHA256HEX with ROLE one of {', '.join(ROLES)}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TokenFileError(f"{path}:{number}: {role}: not a SHA-256 in hex (64 characters 0-9a-f)")
        entries[digest] = role
    return entries


class TokenStore:
    """The tokens file, read again when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._entries = self._read()  # fails at start, naming the file and line
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def _read(self) -> dict[str, str]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise TokenFileError(f"{self.path}: cannot read the tokens file ({exc.strerror or exc})") from None
        return parse_tokens(text, self.path)

    def reload(self) -> None:
        """Read the file now; a broken file keeps the previous tokens (and is logged)."""
        with self._lock:
            self._checked = time.monotonic()
            self._stamp = self._file_stamp()
            try:
                self._entries = self._read()
            except TokenFileError as exc:
                log.error("tokens file not reloaded, the previous tokens stay in force: %s", exc)
                return
            log.info("tokens file reloaded: %d token(s)", len(self._entries))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY:
            return
        self._checked = now
        if self._file_stamp() != self._stamp:
            self.reload()

    def role_of(self, token: str) -> str | None:
        """The token's role, or None. Compares against every entry in constant time."""
        self._maybe_reload()
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for known, role in self._entries.items():
            if hmac.compare_digest(known, digest):
                found = role
        return found


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
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
