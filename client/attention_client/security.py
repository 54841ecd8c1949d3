"""Channel security, public: how the SDK turns PEM arguments (bytes, text or a
path), `tls=True` and a bearer token into gRPC credentials. Other programs that
open their own channels to the service (the server's `attention-healthcheck`
among them) use these instead of re-implementing them."""

from __future__ import annotations

from ._channel import ChannelSecurity, PemSource, channel_security, read_pem, resolve_token

__all__ = ["ChannelSecurity", "PemSource", "channel_security", "read_pem", "resolve_token"]
