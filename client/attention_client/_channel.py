"""Channel and call credentials for both clients (and attention-healthcheck):
TLS roots, a client certificate for mutual TLS, and a bearer token."""

from __future__ import annotations

import errno
import ipaddress
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import grpc

PemSource = bytes | str | os.PathLike[str]
"""PEM bytes, PEM text (a str starting with -----BEGIN), or the path of a PEM file."""

Metadata = tuple[tuple[str, str], ...]

TOKEN_ENV = "ATTENTION_TOKEN"
"""Environment variable the clients take the bearer token from when none is given."""

_PEM_MARKER = "-----BEGIN"


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client talks to the server.

    `credentials` is None for a plaintext channel. `metadata` is what every call must
    carry on top of the caller's: the authorization header when a token goes over
    plaintext (gRPC refuses call credentials on insecure channels), else nothing.
    """

    credentials: grpc.ChannelCredentials | None = None
    metadata: Metadata = ()

    def with_call_metadata(self, metadata: Metadata) -> Metadata:
        """The caller's metadata plus ours, unless the caller sets authorization itself."""
        if not self.metadata or any(key.lower() == "authorization" for key, _ in metadata):
            return metadata
        return self.metadata + metadata


def read_pem(source: PemSource | None, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text or a file path; errors name `what` and the file."""
    if source is None:
        return None
    if isinstance(source, bytes):
        data, origin = source, "the bytes given"
    elif isinstance(source, str) and source.lstrip().startswith(_PEM_MARKER):
        data, origin = source.encode("ascii"), "the text given"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{what}: no such file", str(path)) from None
        except IsADirectoryError:
            raise IsADirectoryError(errno.EISDIR, f"{what}: a directory, not a PEM file", str(path)) from None
        except PermissionError:
            raise PermissionError(errno.EACCES, f"{what}: permission denied", str(path)) from None
        origin = str(path)
    else:
        raise TypeError(f"{what}: expected bytes or a path, got {type(source).__name__}")
    if _PEM_MARKER.encode() not in data:
        raise ValueError(f"{what}: {origin} is not PEM (no '{_PEM_MARKER}' line)")
    return data


def resolve_token(token: str | None) -> str | None:
    """`token`, or $ATTENTION_TOKEN when `token` is None; '' means no token at all."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
        what = f"${TOKEN_ENV}"
    else:
        what = "token"
    token = token.strip()
    if not token:
        return None
    # Never put the token itself in an error message.
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{what}: a bearer token is printable ASCII without spaces")
    return token


def is_loopback(target: str) -> bool:
    """True for a gRPC target on this machine (localhost, 127.0.0.0/8, ::1, a unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):
        host = target[1:].split("]", 1)[0]
    elif target.count(":") == 1:
        host = target.split(":", 1)[0]
    else:
        host = target  # no port, or a bare IPv6 address
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_security(
    target: str,
    *,
    root_certificates: PemSource | None = None,
    certificate_chain: PemSource | None = None,
    private_key: PemSource | None = None,
    tls: bool = False,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> ChannelSecurity:
    """Build what AttentionClient and AsyncAttentionClient open their channel with.

    Any PEM argument, `tls=True` or `credentials` makes the channel TLS; a token then
    travels as gRPC call credentials. A token over plaintext is added as metadata
    instead (meant for local use: it warns when the target is not this machine).
    """
    pems = (root_certificates, certificate_chain, private_key)
    if credentials is not None and any(p is not None for p in pems):
        raise ValueError("credentials: give either credentials or root_certificates/certificate_chain/private_key")
    if (certificate_chain is None) != (private_key is None):
        given, missing = (
            ("certificate_chain", "private_key") if private_key is None else ("private_key", "certificate_chain"))
        raise ValueError(f"{given} given without {missing}: a client certificate needs both")
    bearer = resolve_token(token)
    if credentials is None and (tls or any(p is not None for p in pems)):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem(root_certificates, "root_certificates"),
            private_key=read_pem(private_key, "private_key"),
            certificate_chain=read_pem(certificate_chain, "certificate_chain"),
        )
    if credentials is None:
        if bearer is None:
            return ChannelSecurity()
        if not is_loopback(target):
            warnings.warn(
                f"sending a bearer token in cleartext to {target}: anyone on the path can read it; "
                "use TLS (tls=True or root_certificates=...)", stacklevel=3)
        return ChannelSecurity(metadata=(("authorization", f"Bearer {bearer}"),))
    if bearer is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(bearer))
    return ChannelSecurity(credentials)
