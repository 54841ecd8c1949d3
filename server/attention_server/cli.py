"""`attention-server`: a thin CLI over Settings (flags or ATTENTION_* variables)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from .settings import Settings

log = logging.getLogger("attention_server")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting, drain within the grace period, exit."""
    from attention_client.memory import tune_malloc

    from .grpc_api.server import create_server

    if settings.tune_malloc and not tune_malloc():
        log.info("allocator settings not applied (not glibc)")
    server, port = create_server(settings)
    await server.start()
    # Tests and scripts read the bound port from this line (port 0 picks one).
    print(f"attention-server listening on {settings.host}:{port}", flush=True)
    if server.http_port is not None:
        scheme = "https" if server.http_tls else "http"
        # A second line for tests and scripts: the HTTP port (/v2, /v1, /explore).
        print(f"attention-server HTTP on {scheme}://{settings.http_host or settings.host}:{server.http_port}",
              flush=True)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", server.metrics_host, server.metrics_port)
    log.info("gRPC port %d: %s, %s, model control %s", port,
             "mutual TLS" if settings.tls_client_ca_file else "TLS" if server.tls else "plaintext",
             "bearer tokens" if server.tokens else "no tokens", settings.model_control_mode)
    log.info("serving models %s (default %s)", server.engine.repository.names(), settings.default_model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining for up to %.1f s", settings.grace_period)
    await server.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)  # type: ignore[call-arg]  # pydantic-settings CLI
    from .logs import configure

    configure(settings.log_level, settings.log_format)
    from .errors import ModelLoadError
    from .tokens import TokenFileError
    from .tracing import TracingConfigError

    try:
        asyncio.run(serve(settings))
    except (ModelLoadError, OSError, TokenFileError, TracingConfigError) as exc:
        # A start-up failure the operator fixes (a port, a model file): one line that
        # names it and what to do, no traceback. Anything else is a bug and keeps its traceback.
        log.error("cannot start: %s", " ".join(str(exc).split()))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
