"""Bearer tokens with roles, shared by both transports (grpc_api/auth.py,
http_api/app.py).

The tokens file holds `ROLE:SHA256HEX` lines: the lowercase hex SHA-256 of each
token, never a usable token. It is read again when it changes (checked at most
once a second) or on SIGHUP (`reload()`), so a token is revoked without a
restart. Tokens and hashes are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROLES = ("infer", "admin")
CHECK_EVERY = 1.0  # seconds between looks at the file's modification time


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


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
