"""Prometheus metrics on their own HTTP port (prometheus-client), one registry
per server so that several servers can share a process (tests)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .runtime.stats import BatchObserver

if TYPE_CHECKING:
    from .runtime.engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _QueueCollector(Collector):
    """Queue depth and queued tokens per model and the pending-result budget, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily("attention_queue_depth", "Sequences waiting for a runtime batch", labels=["model"])
        tokens = GaugeMetricFamily("attention_queue_tokens", "Tokens waiting for a runtime batch", labels=["model"])
        for batcher in self.engine.batchers():
            depth.add_metric([batcher.model.name], batcher.queue_depth)
            tokens.add_metric([batcher.model.name], batcher.queued_tokens)
        yield depth
        yield tokens
        budget = self.engine.budget
        yield GaugeMetricFamily("attention_pending_result_bytes",
                                "Bytes of results reserved: computed or being computed, not yet sent",
                                value=budget.held)
        yield GaugeMetricFamily("attention_pending_result_budget_bytes",
                                "The pending-result budget (max_pending_result_mib)", value=budget.capacity)
        yield CounterMetricFamily("attention_pending_result_waits", "Calls that waited for room in the budget",
                                  value=budget.waited)
        yield CounterMetricFamily("attention_pending_result_refusals",
                                  "Calls refused (RESOURCE_EXHAUSTED) after waiting for room in the budget",
                                  value=budget.refused)


class Metrics(BatchObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("attention_requests", "gRPC calls by service, method and status code",
                                ["service", "method", "code"], registry=r)
        self.latency = Histogram("attention_request_duration_seconds", "gRPC call duration, end to end in the server",
                                 ["service", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("attention_inflight_requests", "gRPC calls being served", ["service"], registry=r)
        self.queue = Histogram("attention_queue_duration_seconds", "Time a sequence waits for its runtime batch",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("attention_compute_duration_seconds", "ONNX Runtime time per runtime batch",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.output = Histogram("attention_output_duration_seconds",
                                "Cutting, pair extraction and encoding per runtime batch", ["model"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("attention_batch_size", "Sequences per runtime batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter("attention_tokens", "Tokens run through the model (padding excluded)", ["model"],
                              registry=r)
        self.sequences = Counter("attention_sequences", "Sequences run through the model", ["model"], registry=r)

    def watch(self, engine: Engine) -> None:
        self.registry.register(_QueueCollector(engine))

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the HTTP endpoint (a daemon thread); returns the server and its port.
        Raises OSError with a one-line message naming the port and the setting when it cannot bind."""
        try:
            httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"metrics port {host}:{port} is already in use; free it or choose another "
                              "--metrics-port (0 picks a free one, -1 turns the endpoint off)") from None
            raise OSError(f"cannot bind the metrics port {host}:{port} ({exc.strerror or exc}); check "
                          "--metrics-host and --metrics-port (-1 turns the endpoint off)") from None
        return httpd, int(httpd.server_port)

    # BatchObserver
    def queued(self, model: str, seconds: float) -> None:
        self.queue.labels(model).observe(seconds)

    def ran(self, model: str, size: int, tokens: int, input_seconds: float, infer_seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.compute.labels(model).observe(input_seconds + infer_seconds)
        self.tokens.labels(model).inc(tokens)
        self.sequences.labels(model).inc(size)

    def delivered(self, model: str, seconds: float) -> None:
        self.output.labels(model).observe(seconds)
