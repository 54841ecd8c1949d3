"""`attention-healthcheck`: exit 0 when the server answers SERVING on grpc.health.v1
(for container health checks; no extra binary needed). Health needs no token.

TLS works without flags inside the server's own container: each TLS option is
taken from its flag, else from ATTENTION_HEALTHCHECK_*, else from the server's
own ATTENTION_TLS_* settings:

  --ca-file    $ATTENTION_HEALTHCHECK_CA_FILE, else $ATTENTION_TLS_CERT_FILE: the
               server's own certificate is the only one trusted (pinned), so any
               CA works; the certificate must name the target host (see --server-name)
  --cert-file  $ATTENTION_HEALTHCHECK_CERT_FILE, else, when the server requires
  --key-file   client certificates ($ATTENTION_TLS_CLIENT_CA_FILE), the server's own
               $ATTENTION_TLS_CERT_FILE and $ATTENTION_TLS_KEY_FILE (valid when that CA
               signed the server's certificate for client use too; else set these)
  --tls        $ATTENTION_HEALTHCHECK_TLS=1: TLS with gRPC's default roots
  --server-name  $ATTENTION_HEALTHCHECK_SERVER_NAME

A server given its files as flags rather than environment variables needs them
passed here too. Exit codes: 0 SERVING, 1 anything else (Docker reserves 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_client.security import channel_security, read_pem

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class TlsFiles:
    """The TLS options the check uses, after flags and the environment."""

    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls or any((self.ca_file, self.cert_file, self.key_file))


def tls_files(args: argparse.Namespace, env: Mapping[str, str]) -> TlsFiles:
    """Flags first, then ATTENTION_HEALTHCHECK_*, then the server's ATTENTION_TLS_* (see the module doc)."""
    def get(name: str) -> str | None:
        return env.get(name) or None

    server_cert, server_key = get("ATTENTION_TLS_CERT_FILE"), get("ATTENTION_TLS_KEY_FILE")
    mutual = get("ATTENTION_TLS_CLIENT_CA_FILE") is not None
    ca = args.ca_file or get("ATTENTION_HEALTHCHECK_CA_FILE") or server_cert
    if args.cert_file or args.key_file:
        cert, key = args.cert_file, args.key_file
    elif get("ATTENTION_HEALTHCHECK_CERT_FILE") or get("ATTENTION_HEALTHCHECK_KEY_FILE"):
        cert, key = get("ATTENTION_HEALTHCHECK_CERT_FILE"), get("ATTENTION_HEALTHCHECK_KEY_FILE")
    elif mutual and server_cert and server_key:
        cert, key = server_cert, server_key
    else:
        cert = key = None
    tls = args.tls or (get("ATTENTION_HEALTHCHECK_TLS") or "").lower() in _TRUE
    return TlsFiles(tls, ca, cert, key, args.server_name or get("ATTENTION_HEALTHCHECK_SERVER_NAME"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--service", default="", help="service name; '' is the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls", action="store_true", help="TLS with gRPC's default root certificates")
    parser.add_argument("--ca-file", metavar="PEM", help="CA (or the server's own certificate) to trust; implies TLS")
    parser.add_argument("--cert-file", metavar="PEM", help="client certificate, for a server that requires mTLS")
    parser.add_argument("--key-file", metavar="PEM", help="private key of --cert-file")
    parser.add_argument("--server-name", metavar="NAME",
                        help="name to check the server's certificate against, when the target's host is not in it")
    return parser


def _channel(target: str, files: TlsFiles) -> grpc.Channel:
    if not files.secure:
        return grpc.insecure_channel(target)
    if (files.cert_file is None) != (files.key_file is None):
        raise ValueError("--cert-file and --key-file go together (a client certificate and its key)")
    security = channel_security(
        target, root_certificates=read_pem(files.ca_file, "--ca-file"),
        certificate_chain=read_pem(files.cert_file, "--cert-file"),
        private_key=read_pem(files.key_file, "--key-file"), tls=True, token="")
    options = [("grpc.ssl_target_name_override", files.server_name)] if files.server_name else []
    assert security.credentials is not None
    return grpc.secure_channel(target, security.credentials, options)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        channel = _channel(args.target, tls_files(args, os.environ))
    except (OSError, ValueError) as exc:
        detail = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        print(f"unhealthy: {detail}", file=sys.stderr)
        return 1
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
