"""Assembles the gRPC server: attention.v1, the Open Inference Protocol, health and
reflection on one port; health follows the default model and the drain."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from ..http_api.app import Calls, build_app
from ..http_api.responses import quiet_slow_readers
from ..http_api.server import HttpServer
from ..http_api.tls import server_context
from ..metrics import Metrics
from ..runtime.batcher import BatchConfig, TraceHooks
from ..runtime.budget import ResultBudget
from ..runtime.engine import Engine, Limits
from ..runtime.repository import ModelRepository
from ..runtime.stats import BatchObserver
from ..services.attention import AttentionService
from ..services.inference import InferenceService
from ..services.response_size import ResponseSize
from ..services.shared_memory import SharedMemoryRegistry
from ..settings import MiB, Settings
from ..tokens import TokenStore
from ..tracing import Tracing
from .auth import AuthInterceptor
from .heap import trim_when_idle
from .interceptor import ObservabilityInterceptor
from .kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from .kserve import InferenceServicer
from .reflection import enable_reflection
from .servicer import SERVICE_NAME, AttentionServicer
from .tls import server_credentials
from .transport import server_options

log = logging.getLogger(__name__)


HEALTH_NAMES = ("", SERVICE_NAME, KSERVE_SERVICE_NAME)
# After the drain, health probes (untracked) and calls refused since get this long to finish.
CLOSING_GRACE = 1.0


class AttentionServer:
    """The gRPC server with its engine, health status and metrics. create_server
    binds it and attaches the engine; `start()` serves, `stop()` drains."""

    engine: Engine
    attention: AttentionService
    inference: InferenceService
    shared_memory: SharedMemoryRegistry

    def __init__(self, settings: Settings, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing or Tracing()  # off unless given; flushed by stop()
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        self.interceptor = ObservabilityInterceptor(metrics, self.tracing)
        # Tokens are checked inside the observability interceptor, which maps and counts their denials.
        self.tokens = TokenStore(settings.auth_tokens_file) if settings.auth_tokens_file else None
        self.tls = server_credentials(settings)
        self.http_tls = server_context(settings)
        self.http: HttpServer | None = None
        self.http_calls: Calls | None = None
        self._http_app: Any = None
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            interceptors=[self.interceptor, *([AuthInterceptor(self.tokens)] if self.tokens else [])],
            options=server_options(settings),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        enable_reflection(self.grpc, [SERVICE_NAME, KSERVE_SERVICE_NAME,
                                      health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
        self._draining = False
        self._stopping: asyncio.Future[None] | None = None
        self._health_status: int | None = None
        self._health_lock = asyncio.Lock()
        self._health_updates: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._trim: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Bind the gRPC port (0 picks a free one) and return it; raises OSError naming the address."""
        address = f"{self.settings.host}:{self.settings.port}"
        port = _add_port_quietly(self.grpc, address, self.tls.credentials if self.tls else None)
        if port == 0:
            raise OSError(f"cannot bind the gRPC port {address} (in use, or not an address of this machine); "
                          "stop what holds it or choose another --port (0 picks a free one) or --host")
        return port

    def bind_http(self) -> int | None:
        """Bind the HTTP port unless it is off (-1); returns its port. Raises OSError naming the port."""
        if self.settings.http_port >= 0:
            self.http = HttpServer(self.settings, self.http_tls)
            return self.http.port
        return None

    def serve_metrics(self) -> None:
        """Start the Prometheus endpoint unless it is off; raises OSError naming the port."""
        if self.settings.metrics_port >= 0:
            self._metrics_httpd, self.metrics_port = self.metrics.serve(self.metrics_host, self.settings.metrics_port)

    @property
    def metrics_host(self) -> str:
        """The metrics endpoint is plain HTTP: with TLS on it stays on loopback unless told otherwise."""
        if self.tls is not None and "metrics_host" not in self.settings.model_fields_set:
            return "127.0.0.1"
        return self.settings.metrics_host

    def reload_tokens(self) -> None:
        """Read the tokens file again now (SIGHUP); it is also re-read when it changes."""
        if self.tokens is not None:
            self.tokens.reload()

    def attach(self, engine: Engine) -> None:
        """Register attention.v1 and the Open Inference Protocol over `engine` (after bind, before start)."""
        self.engine = engine
        self.metrics.watch(engine)
        response_size = ResponseSize(self.settings.max_response_bytes)
        self.attention = AttentionService(engine, response_size)
        settings = self.settings
        self.shared_memory = SharedMemoryRegistry(settings.shared_memory, settings.max_shared_memory_regions,
                                                  settings.max_shared_memory_region_mib * MiB,
                                                  settings.max_shared_memory_total_mib * MiB)
        self.inference = InferenceService(engine, engine.repository.options.instances,
                                          int(self.settings.max_queue_delay_ms * 1000),
                                          self.settings.model_control_mode, response_size, self.shared_memory)
        self.grpc.add_generic_rpc_handlers((AttentionServicer(self.attention).handler(),))
        if self.http is not None:
            self._http_app, self.http_calls = build_app(self.attention, self.inference, self.metrics, self.tokens,
                                                        self.settings.max_request_bytes, self.tracing)
            self._http_app.state.write_timeout = self.settings.http_write_timeout
            quiet_slow_readers()
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.inference, self.settings.max_stream_inflight), self.grpc)

    async def start(self) -> None:
        await self.grpc.start()
        if self.http is not None:
            await self.http.start(self._http_app)
        loop = asyncio.get_running_loop()
        if self.settings.tune_malloc:  # the tuned heap keeps freed buffers: trim it when quiet
            self._trim = loop.create_task(trim_when_idle(self), name="trim-heap")
        self._unsubscribe = self.engine.repository.subscribe(
            lambda name, loaded: self._repository_changed(loop, name))
        await self._update_health()

    # -- health ---------------------------------------------------------------------

    def serving(self) -> bool:
        """What every health name reports: the default model is loaded and the server is not draining."""
        repository = self.engine.repository
        return not self._draining and repository.is_loaded(repository.default_model)

    def _repository_changed(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        # Runs on the thread that loaded or unloaded the model.
        if name != self.engine.repository.default_model:
            return
        try:
            loop.call_soon_threadsafe(self._schedule_health_update)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _schedule_health_update(self) -> None:
        task = asyncio.get_running_loop().create_task(self._update_health())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _update_health(self) -> None:
        # One update at a time, each reading the state when it runs: the last one leaves the truth.
        async with self._health_lock:
            serving = self.serving()
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            if self._health_status is not None and status != self._health_status:
                log.info("health: %s (default model %s %s)", health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                         self.engine.repository.default_model, "loaded" if serving else "not loaded")
            self._health_status = status
            for name in HEALTH_NAMES:
                await self.health.set(name, status)

    # -- shutdown -------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then close. Every health name turns NOT_SERVING (watchers are told), every
        gRPC connection gets GOAWAY and the gRPC listener closes, so clients send their next
        calls to other replicas; new work that still arrives gets UNAVAILABLE. Calls in flight
        finish, for up to `grace` seconds (the grace period by default), on their connections
        and on the HTTP port, which stays open until then; calls still running are cancelled.
        A second call waits for the first drain."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain_and_close(grace))
        await asyncio.shield(self._stopping)

    async def _drain_and_close(self, grace: float | None) -> None:
        grace = self.settings.grace_period if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._draining = True
        self.inference.draining = True  # before the first await: ready (both protocols) turns false with health
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.health.enter_graceful_shutdown()
        self.engine.stop_accepting()
        # GOAWAY now, not once the calls in flight are done: a client's next calls go to other replicas
        # at once (a connection that got GOAWAY and cannot reconnect leaves round_robin), where an open
        # listener would take its reconnect and refuse its calls for as long as the longest call runs.
        # grpc.aio closes the listener in the same step; calls in flight go on.
        grpc_stopped = asyncio.ensure_future(self.grpc.stop(grace))
        in_flight = self.active_calls
        if in_flight:
            log.info("draining: %d call(s) in flight, waiting up to %.1f s", in_flight, grace)
            if not (grace > 0 and await self.wait_idle(grace)):
                log.warning("grace period of %.1f s over with %d call(s) still in flight; cancelling them",
                            grace, self.active_calls)
        closing = min(max(deadline - loop.time(), 0.0), CLOSING_GRACE)
        # An HTTP reply the app has handed over may still be on its way to a slow reader:
        # uvicorn keeps such connections for what is left of the grace period.
        await asyncio.gather(self._grpc_closed(grpc_stopped, closing, deadline), *(
            [self.http.stop(max(deadline - loop.time(), closing))] if self.http is not None else []))
        await self.engine.close()
        self.shared_memory.close()  # every call has ended: the regions' descriptors close now
        for task in [*self._health_updates, *([self._trim] if self._trim else [])]:
            task.cancel()
        self.close_metrics()
        await asyncio.to_thread(self.tracing.close)  # every batch has ended: its spans go out too

    async def _grpc_closed(self, stopped: asyncio.Future[None], closing: float, deadline: float) -> None:
        """Wait for the gRPC server's stop; what is still open on it once the calls in flight are done
        (health watchers, a call that arrived as it stopped) gets `closing` seconds, then is cancelled.
        grpcio can crash when two stop(grace) calls time out together: the second one is stop(None)
        (cancel now), made only while the first still waits and well before its grace ends."""
        loop = asyncio.get_running_loop()
        if deadline - loop.time() > closing + CLOSING_GRACE:
            await asyncio.wait([stopped], timeout=closing)
            if not stopped.done():
                await self.grpc.stop(None)
        await stopped

    @property
    def active_calls(self) -> int:
        """Calls in flight on both ports, health checks excepted."""
        return self.interceptor.active_calls + (self.http_calls.active if self.http_calls is not None else 0)

    @property
    def completed(self) -> int:
        """Calls ended on both ports, health checks excepted, ever."""
        return self.interceptor.completed + (self.http_calls.completed if self.http_calls is not None else 0)

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call is in flight on either port; False on timeout."""
        waits = [self.interceptor.wait_idle(timeout),
                 *([self.http_calls.wait_idle(timeout)] if self.http_calls is not None else [])]
        return all(await asyncio.gather(*waits))

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def close_metrics(self) -> None:
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def _add_port_quietly(server: grpc.aio.Server, address: str,
                      credentials: grpc.ServerCredentials | None = None) -> int:
    """server.add_insecure_port(address) (add_secure_port with credentials), or 0 when it cannot bind. On a failed bind
    gRPC's C core writes its own log line straight to file descriptor 2; the caller
    reports the failure in one line of its own, so that output is held back and
    dropped (after a successful bind whatever was written meanwhile is passed on)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            port = (server.add_secure_port(address, credentials) if credentials is not None
                    else server.add_insecure_port(address))
        except RuntimeError:
            port = 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if port:
            held.seek(0)
            if written := held.read():
                os.write(2, written)
    return port


def build_engine(settings: Settings, observer: BatchObserver | None = None, trace: TraceHooks | None = None) -> Engine:
    repository = ModelRepository.load(
        settings.model_repository,
        settings.models,
        settings.default_model,
        intra_op_threads=settings.intra_op_threads,
        verify_checksums=settings.verify_checksums,
        instances=settings.instances or len(os.sched_getaffinity(0)),
        memory_arena=settings.ort_memory_arena,
    )
    limits = Limits(
        max_batch_size=settings.max_batch_size,
        max_chars_per_token=settings.max_chars_per_token,
        stream_window_bytes=settings.stream_window_mib * MiB,
    )
    budget = ResultBudget(settings.max_pending_result_mib * MiB, settings.pending_result_wait)
    batching = BatchConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_attention_bytes=settings.max_batch_attention_mib * MiB,
        max_queue_delay=settings.max_queue_delay_ms / 1000,
        max_queue_tokens=settings.max_queue_tokens,
    )
    return Engine(repository, limits, batching, observer, budget, trace)


def create_server(settings: Settings, engine: Engine | None = None,
                  tracing: Tracing | None = None) -> tuple[AttentionServer, int]:
    """Bind the gRPC port (0 picks a free one), then the metrics port, then load the
    models (unless `engine` is given): a busy port fails at once, not after a slow load.
    Returns the server and its gRPC port; call `await server.start()` from the event loop.
    Traces go through `tracing` (default: the OTEL_* variables; an `engine` given
    keeps the hooks it was built with: build_engine(..., trace=tracing)).
    Raises OSError (a port), ModelLoadError (a model file) or TracingConfigError (an
    OTEL_* variable) with a one-line message."""
    tracing = tracing if tracing is not None else Tracing.from_env()
    metrics = Metrics()
    server = AttentionServer(settings, metrics, tracing)
    try:
        port = server.bind()
        server.bind_http()
        server.serve_metrics()
        server.attach(engine or build_engine(settings, metrics, tracing if tracing.enabled else None))
    except BaseException:
        server.close_metrics()
        if server.http is not None:
            server.http.socket.close()
        tracing.close()
        raise
    return server, port
