"""Throwaway certificates for tests (trustme): a CA, a server certificate for
localhost / 127.0.0.1, and client certificates, written to files as the server
and the CLI read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path
    client_key_file: Path
    ca: trustme.CA

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()

    @property
    def client_cert_pem(self) -> bytes:
        return self.client_cert_file.read_bytes()

    @property
    def client_key_pem(self) -> bytes:
        return self.client_key_file.read_bytes()


def make_pki(folder: Path, ca: trustme.CA | None = None) -> Pki:
    """A CA (new unless given), a server certificate and a client certificate, as PEM files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = ca or trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client@example.test")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": b"".join(blob.bytes() for blob in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key", ca)
