"""TLS and mutual TLS for the gRPC port, with certificates that rotate without a
restart: gRPC asks for the current certificate on every new handshake, and the
files are read again when they changed (size or modification time), so
replacing them is enough. Connections already open keep their certificate."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..settings import Settings
from ..tls_files import TlsFileError, read_pem, stamp

log = logging.getLogger(__name__)


@dataclass
class _Files:
    cert: Path
    key: Path
    client_ca: Path | None

    def paths(self) -> list[Path]:
        return [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (read_pem(self.key, "TLS private key"), read_pem(self.cert, "TLS certificate chain"))
        roots = read_pem(self.client_ca, "client CA certificates") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)


class RotatingCredentials:
    """Server credentials whose certificate follows the files."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._files = _Files(cert, key, client_ca)
        self._lock = threading.Lock()
        self._stamp = stamp(self._files.paths())
        initial = self._files.configuration()  # fails at start, naming the file, when unreadable
        self.rotations = 0
        # gRPC's stubs say the fetcher returns a configuration; it may return None for "no change".
        self.credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=client_ca is not None)  # type: ignore[arg-type]

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC on each new handshake: a new configuration when the files changed."""
        with self._lock:
            current = stamp(self._files.paths())
            if current == self._stamp:
                return None
            try:
                configuration = self._files.configuration()
            except TlsFileError as exc:  # half-written files: keep serving the old certificate
                log.warning("TLS files changed but cannot be used yet: %s", exc)
                return None
            self._stamp = current
            self.rotations += 1
            log.info("TLS certificate reloaded from %s", self._files.cert)
            return configuration


def server_credentials(settings: Settings) -> RotatingCredentials | None:
    """The gRPC port's TLS credentials from the settings, or None for plaintext."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None and key is None:
        if settings.tls_client_ca_file is not None:
            raise TlsFileError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        return None
    if cert is None or key is None:
        raise TlsFileError("TLS needs both --tls-cert-file and --tls-key-file")
    return RotatingCredentials(cert, key, settings.tls_client_ca_file)
