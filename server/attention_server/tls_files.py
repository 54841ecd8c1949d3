"""TLS files shared by both ports' certificate rotation (grpc_api/tls.py,
http_api/tls.py): read as PEM with one-line errors, and a change stamp that
tells when they were replaced."""

from __future__ import annotations

from pathlib import Path


class TlsFileError(OSError):
    """A certificate or key file cannot be read (start-up failure, names the file)."""


def read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{path}: cannot read the {what} ({exc.strerror or exc}); check the path and "
                           "its permissions") from None
    if b"-----BEGIN" not in data:
        raise TlsFileError(f"{path}: the {what} is not PEM (no -----BEGIN line)")
    return data


def stamp(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            st = path.stat()
            stamps.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((0, 0))
    return tuple(stamps)
