"""A stand-in for an OpenTelemetry collector on localhost: an OTLP/gRPC trace
endpoint that decodes every export and counts its spans, then drops them.

The tracing benchmark points the traced server at it, so the server does all
of a real deployment's work (spans recorded, batched, encoded to OTLP protobuf
and sent over gRPC by the batch processor's thread) while the receiving end
costs little and does no disk or network I/O. Prints `otlp-sink on HOST:PORT`,
then answers each line read from stdin with `SPANS EXPORTS CPU_SECONDS` (its own
CPU); exits at end of input."""

from __future__ import annotations

import resource
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _Counter(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans = 0
        self.exports = 0

    def Export(self, request: Any, context: Any) -> Any:
        spans = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with self.lock:
            self.spans += spans
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    counter = _Counter()
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"otlp-sink on 127.0.0.1:{port}", flush=True)
    for _ in sys.stdin:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with counter.lock:
            print(counter.spans, counter.exports, usage.ru_utime + usage.ru_stime, flush=True)
    server.stop(0)


if __name__ == "__main__":
    main()
