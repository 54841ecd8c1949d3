"""Assembles the gRPC server: attention.v1, health and reflection on one port."""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from ..metrics import Metrics
from ..runtime.batcher import BatchConfig
from ..runtime.engine import Engine, Limits
from ..runtime.repository import ModelRepository
from ..runtime.stats import BatchObserver
from ..settings import MiB, Settings
from .interceptor import ObservabilityInterceptor
from .kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from .kserve import InferenceServicer
from .servicer import SERVICE_NAME, AttentionServicer

log = logging.getLogger(__name__)


class AttentionServer:
    """A bound (not yet started) server with its engine, health status and metrics."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        metrics.watch(engine)
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            interceptors=[ObservabilityInterceptor(metrics)],
            options=[
                # Room for the largest unary response plus framing.
                ("grpc.max_send_message_length", settings.max_response_bytes + MiB),
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.grpc.add_generic_rpc_handlers((AttentionServicer(engine).handler(),))
        self.kserve = InferenceServicer(engine, engine.repository.options.instances,
                                        int(settings.max_queue_delay_ms * 1000))
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(self.kserve, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, KSERVE_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.grpc,
        )

    async def start(self) -> None:
        await self.grpc.start()
        if self.settings.metrics_port >= 0:
            self._metrics_httpd, self.metrics_port = self.metrics.serve(self.settings.metrics_host,
                                                                        self.settings.metrics_port)
        for service in ("", SERVICE_NAME, KSERVE_SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (load balancers stop sending), then drain, then close."""
        await self.health.enter_graceful_shutdown()
        self.kserve.ready = False
        self.engine.stop_accepting()
        await self.grpc.stop(self.settings.grace_period if grace is None else grace)
        await self.engine.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def build_engine(settings: Settings, observer: BatchObserver | None = None) -> Engine:
    repository = ModelRepository.load(
        settings.model_repository,
        settings.models,
        settings.default_model,
        intra_op_threads=settings.intra_op_threads,
        verify_checksums=settings.verify_checksums,
        instances=settings.instances or len(os.sched_getaffinity(0)),
    )
    limits = Limits(
        max_batch_size=settings.max_batch_size,
        max_response_bytes=settings.max_response_bytes,
    )
    batching = BatchConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_attention_bytes=settings.max_batch_attention_mib * MiB,
        max_queue_delay=settings.max_queue_delay_ms / 1000,
        max_queue_tokens=settings.max_queue_tokens,
    )
    return Engine(repository, limits, batching, observer)


def create_server(settings: Settings, engine: Engine | None = None) -> tuple[AttentionServer, int]:
    """Load the models and bind the port (0 picks a free one); returns the server
    and the port it is bound to. Call `await server.start()` from the event loop."""
    metrics = Metrics()
    server = AttentionServer(settings, engine or build_engine(settings, metrics), metrics)
    port = server.grpc.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    return server, port
