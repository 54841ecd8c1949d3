"""The gRPC server's transport limits, from the settings: message sizes, HTTP/2
streams per connection, metadata size, keepalive in both directions, idle
connections. Each one is a bound a hostile or careless client would otherwise
set for us. And a maximum connection age, so clients re-spread over replicas."""

from __future__ import annotations

from typing import Any

from ..settings import MiB, Settings


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    ms = 1000
    options: list[tuple[str, Any]] = [
        # Room for the largest unary response plus framing.
        ("grpc.max_send_message_length", settings.max_response_bytes + MiB),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_metadata_size", settings.max_metadata_kib * 1024),
        # The server pings idle connections to find peers that vanished (their calls and results go).
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * ms)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * ms)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping at most every min_client_ping_interval; more often is a strike, and
        # max_ping_strikes strikes close the connection with GOAWAY (too_many_pings).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(settings.min_client_ping_interval * ms)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_client_ping_interval * ms)),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
    ]
    if settings.max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.max_connection_idle * ms)))
    # A connection older than this gets GOAWAY: its client reconnects and re-resolves (a client behind an
    # L4 balancer lands on any replica, one on a headless Service sees replicas added since).
    if settings.max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age * ms)))
        if settings.max_connection_age_grace > 0:
            options.append(("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * ms)))
    return options
