"""TLS and mutual TLS for the HTTP port from the same settings and files as the
gRPC port, rotating the same way: on every new handshake the files' change
stamp is compared, and a replaced certificate is served to new connections
(through the context's SNI callback, which OpenSSL runs for every ClientHello,
with or without a server name)."""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

from ..settings import Settings
from ..tls_files import TlsFileError, read_pem, stamp

log = logging.getLogger(__name__)


class RotatingContext:
    """The listening SSLContext; each handshake gets the newest certificate."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = stamp(self._paths())
        self._current = self._build()  # fails at start, naming the file, when unusable
        self.rotations = 0
        self.context = self._build()
        self.context.sni_callback = self._on_hello

    def _paths(self) -> list[Path]:
        return [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]

    def _build(self) -> ssl.SSLContext:
        for path, what in ((self.cert, "TLS certificate chain"), (self.key, "TLS private key")):
            read_pem(path, what)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise TlsFileError(f"{self.cert}, {self.key}: not a usable certificate and key ({exc.reason})") from None
        if self.client_ca is not None:
            read_pem(self.client_ca, "client CA certificates")
            try:
                context.load_verify_locations(self.client_ca)
            except ssl.SSLError as exc:
                raise TlsFileError(f"{self.client_ca}: not usable client CA certificates ({exc.reason})") from None
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _on_hello(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                  context: ssl.SSLContext) -> None:
        with self._lock:
            current = stamp(self._paths())
            if current != self._stamp:
                try:
                    fresh = self._build()
                except (TlsFileError, OSError) as exc:  # half-written files: keep serving the old certificate
                    log.warning("TLS files changed but cannot be used yet: %s", exc)
                else:
                    self._stamp, self._current = current, fresh
                    self.rotations += 1
                    log.info("TLS certificate reloaded from %s (HTTP port)", self.cert)
            connection.context = self._current


def server_context(settings: Settings) -> RotatingContext | None:
    """The HTTP port's TLS context (the gRPC port's files), or None for plaintext.
    Settings are checked by the gRPC side first (grpc_api/tls.py), which names the flags."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return RotatingContext(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
