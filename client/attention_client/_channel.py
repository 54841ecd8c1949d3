"""Channel and call credentials for both clients (and attention-healthcheck):
TLS roots, a client certificate for mutual TLS, and a bearer token. And the
channel options both clients open their channel with: message sizes and the
service config that balances calls over every address of the target and retries
the idempotent calls a replica going away failed."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._proto.attention.v1 import attention_pb2 as pb

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
    """True for a gRPC target on this machine (localhost, 127.0.0.0/8, ::1, a unix socket);
    for a list of addresses (`ipv4:a:1,b:2`), when every one is."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("ipv4:", "ipv6:")):
        return all(_is_loopback_address(address) for address in target[5:].split(","))
    if target.startswith("dns://"):  # dns:///name:port, or dns://resolver/name:port
        target = target[len("dns://"):].split("/", 1)[-1]
    elif target.startswith("dns:"):
        target = target[len("dns:"):]
    return _is_loopback_address(target)


def _is_loopback_address(target: str) -> bool:
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


# -- channel options ----------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["AttentionService"].full_name

RETRIED_METHODS = ("Analyze", "AnalyzeStream", "ListModels", "GetModel")
"""Every attention.v1 method: each only reads, so sending it again is safe."""

RETRY_POLICY: dict[str, Any] = {
    # gRPC caps attempts at 5. Between attempts it waits a random time up to 0.1, 0.2, 0.4, 0.8 s.
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    # UNAVAILABLE: the replica is down, restarting, or refused the call while draining. CANCELLED
    # from the server: gRPC cancels calls that reach a server in the instant it shuts down
    # (grpc/grpc#41785). A call this process cancels, or whose deadline passed, is never retried;
    # nor INVALID_ARGUMENT, RESOURCE_EXHAUSTED or any other status.
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
"""gRPC's retry policy for RETRIED_METHODS. It applies until the server has answered: a unary
call until its reply, a stream until its first result (then the call is committed)."""

MAX_RETRIED_REQUEST_BYTES = 16 << 20
"""A request up to this size is kept for a retry (the server's default --max-request-bytes);
gRPC's own default keeps 256 KiB and sends a larger request once."""

DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Responses carry full attention matrices: lift gRPC's 4 MB receive default.
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.per_rpc_retry_buffer_size", MAX_RETRIED_REQUEST_BYTES),
    # An address that refuses connections is tried again after a backoff that gRPC grows to 120 s;
    # 5 s here, so a replica back on its address gets calls within seconds however long it was down.
    ("grpc.max_reconnect_backoff_ms", 5000),
)


def service_config(*, round_robin: bool = True) -> dict[str, Any]:
    """The gRPC service config the clients set by default (as the `grpc.service_config` channel
    option): `round_robin` over every address the target resolves to (`dns:///` a headless
    Service's pods, `ipv4:a:1,b:2` each address; one address is one connection, as before),
    and RETRY_POLICY for RETRIED_METHODS. A target's resolver may bring its own config
    (a DNS TXT record), which then wins."""
    config: dict[str, Any] = {
        "methodConfig": [{
            "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
            "retryPolicy": RETRY_POLICY,
        }],
    }
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return config


def channel_options(options: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """The caller's channel options, then the SDK's for every key the caller did not set (gRPC
    takes the first of a repeated key). A caller's `grpc.service_config` replaces the SDK's
    whole; a caller's `grpc.lb_policy_name` keeps the SDK's retries but not its round_robin (a
    service config's balancing would outrank the option); `("grpc.enable_retries", 0)` turns
    retries off."""
    given = list(options or [])
    keys = {key for key, _ in given}
    ours = [*DEFAULT_OPTIONS, ("grpc.service_config",
                               json.dumps(service_config(round_robin="grpc.lb_policy_name" not in keys)))]
    return [*given, *((key, value) for key, value in ours if key not in keys)]
