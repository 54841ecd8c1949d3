"""Prometheus metrics on their own HTTP port (prometheus-client), one registry
per server so that several servers can share a process (tests). Besides the
service's own `attention_*` families, Triton's per-model `nv_inference_*`
families, read from the statistics the Open Inference Protocol reports."""

from __future__ import annotations

import errno
import gzip
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, UnknownMetricFamily
from prometheus_client.exposition import gzip_accepted
from prometheus_client.registry import Collector

from .errors import ModelNotFound
from .runtime.stats import BatcherStats, BatchObserver

if TYPE_CHECKING:
    from .runtime.engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
METRICS_PATH = "/metrics"

# The Open Inference Protocol serves every model as version "1" (grpc_api/kserve.py).
TRITON_VERSION = "1"
# Triton's per-model counters with Triton's names and help texts, each read from
# the statistic ModelStatistics reports for it (durations from ns to us).
TRITON_COUNTERS: tuple[tuple[str, str, Callable[[BatcherStats], float]], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)",
     lambda s: s.sequences),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     lambda s: s.batches),
    ("nv_inference_request_duration_us",
     "Cumulative inference request duration in microseconds (includes cached requests)",
     lambda s: s.success.ns / 1000),
    ("nv_inference_queue_duration_us",
     "Cumulative inference queuing duration in microseconds (includes cached requests)",
     lambda s: s.queue.ns / 1000),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds (does not include cached requests)",
     lambda s: s.compute_input.ns / 1000),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds (does not include cached requests)",
     lambda s: s.compute_infer.ns / 1000),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds (does not include cached requests)",
     lambda s: s.compute_output.ns / 1000),
)
TRITON_PENDING = ("nv_inference_pending_request_count",
                  "Instantaneous number of pending requests awaiting execution per-model.")


class _QueueCollector(Collector):
    """Queue depth and queued tokens per model and the pending-result budget, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        """The families, so that /metrics?name[]=... can select them (read once, at registration)."""
        return list(self.collect())

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


class _TritonCollector(Collector):
    """Triton's per-model families for every loaded model, read at scrape time from
    the statistics ModelStatistics reports (engine.stats), so both always agree.

    prometheus-client writes every counter as `<name>_total` (OpenMetrics requires
    the suffix) and Triton's counters have none, so they are collected untyped:
    their names stay Triton's in every format. The plain-text format, the only one
    Triton serves, types them `counter` as Triton does (_MetricsApp); OpenMetrics,
    which cannot have a counter without the suffix, keeps them `unknown`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _families() -> tuple[list[UnknownMetricFamily], GaugeMetricFamily]:
        counters = [UnknownMetricFamily(name, text, labels=["model", "version"]) for name, text, _ in TRITON_COUNTERS]
        return counters, GaugeMetricFamily(*TRITON_PENDING, labels=["model", "version"])

    def describe(self) -> list[UnknownMetricFamily | GaugeMetricFamily]:
        """The families, without values (so that /metrics?name[]=... can select them)."""
        counters, pending = self._families()
        return [*counters, pending]

    def collect(self) -> Iterator[UnknownMetricFamily | GaugeMetricFamily]:
        counters, pending = self._families()
        for name, stats, queued in self._models():
            for family, (_, _, value) in zip(counters, TRITON_COUNTERS, strict=True):
                family.add_metric([name, TRITON_VERSION], value(stats))
            pending.add_metric([name, TRITON_VERSION], queued)
        yield from counters
        yield pending

    def _models(self) -> list[tuple[str, BatcherStats, int]]:
        """(name, statistics, sequences queued) of every loaded model: what engine.stats
        gives, without creating a batcher here (a model not called yet has zeros)."""
        repository = self.engine.repository
        batchers = self.engine.batchers()
        out = []
        for name in repository.names():
            try:
                model = repository.get(name)
            except ModelNotFound:  # unloaded since names() was read
                continue
            batcher = next((b for b in batchers if b.model is model), None)
            if batcher is None:
                out.append((name, BatcherStats(), 0))
            else:
                out.append((name, batcher.stats, batcher.queue_depth))
        return out


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# The plain-text TYPE line of each Triton counter as prometheus-client writes it, and as Triton does.
_COUNTER_TYPE_LINES = tuple((f"# TYPE {name} untyped\n".encode(), f"# TYPE {name} counter\n".encode())
                            for name, _, _ in TRITON_COUNTERS)


class _MetricsApp:
    """prometheus-client's WSGI app at /metrics only: any other path is 404 (so a
    Triton client pointed at this port finds no model ready), a method other than
    GET or HEAD is 405."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.prometheus: WSGIApp = make_wsgi_app(registry, disable_compression=True)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            return _text(start_response, "404 Not Found", f"not found: the metrics are at {METRICS_PATH}\n")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed", f"method {method} not allowed: use GET\n",
                         [("Allow", "GET, HEAD")])
        reply: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            reply.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(self.prometheus({**environ, "REQUEST_METHOD": "GET"}, keep))
        headers: list[tuple[str, str]] = list(reply["headers"])
        if dict(headers).get("Content-Type", "").startswith("text/plain"):
            for untyped, counter in _COUNTER_TYPE_LINES:
                body = body.replace(untyped, counter, 1)
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response(reply["status"], headers)
        return [b"" if method == "HEAD" else body]


def _text(start_response: Callable[..., Any], status: str, text: str,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *(headers or [])])
    return [body]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, none of them keeping the process alive."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log line per scrape."""


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
        self.registry.register(_TritonCollector(engine))

    def serve(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Serve /metrics on a daemon thread (a thread per scrape; never the event loop);
        returns the server and its port. Raises OSError with a one-line message naming
        the port and the setting when it cannot bind."""
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
            server_class = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
            httpd: WSGIServer = make_server(str(address[0]), port, _MetricsApp(self.registry), server_class,
                                            _QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"metrics port {host}:{port} is already in use; free it or choose another "
                              "--metrics-port (0 picks a free one, -1 turns the endpoint off)") from None
            raise OSError(f"cannot bind the metrics port {host}:{port} ({exc.strerror or exc}); check "
                          "--metrics-host and --metrics-port (-1 turns the endpoint off)") from None
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
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
