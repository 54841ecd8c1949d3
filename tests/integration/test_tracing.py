"""OpenTelemetry traces with the real model and real clients: the span tree of a call
on both protocols, the caller's trace kept, one span per runtime batch linked to
every call in it, nothing at all with tracing off, and a real process printing
its spans with OTEL_TRACES_EXPORTER=console.

In-process servers record through a TracerProvider of the test's own (an
InMemorySpanExporter), given to create_server: never the process-global one."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from attention_client import AsyncAttentionClient, AttentionClient
from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from attention_server.grpc_api.server import AttentionServer, create_server
from attention_server.tracing import Tracing, TracingConfigError
from tests.helpers import ServerProcess, ServerThread, wait_until

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
ANALYZE = "attention.v1.AttentionService/Analyze"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
# Queue spans start at an enqueue time read from the monotonic clock: allow for the conversion.
SLACK_NS = 1_000_000


class TracedServer(ServerThread):
    """A ServerThread whose server records through `tracing` (None: create_server's default, the environment)."""

    def __init__(self, tracing: Tracing | None, **settings: object) -> None:
        super().__init__(**settings)
        self.tracing = tracing

    async def _start(self) -> tuple[AttentionServer, int]:
        server, port = create_server(self.settings, tracing=self.tracing)
        await server.start()
        return server, port


class Recorder:
    """A provider that keeps every ended span in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=DEFAULT_ON, resource=Resource.create({"service.name": "test"}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[TracedServer, Recorder]]:
    recorder = Recorder()
    with TracedServer(Tracing(recorder.provider)) as srv:
        yield srv, recorder
    recorder.provider.shutdown()


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    found = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}
    assert all(s.context.trace_id == parent.context.trace_id for s in found.values())
    return found


def _batch_of(recorder: Recorder, call: ReadableSpan) -> ReadableSpan:
    """The batch span linked to `call` (it ends in the compute thread, just after the results are handed over)."""
    def linked() -> ReadableSpan | None:
        for batch in recorder.named("batch"):
            if any(link.context.span_id == call.context.span_id for link in batch.links):
                return batch
        return None

    return wait_until(linked, timeout=10)  # type: ignore[return-value]


def _check_call(recorder: Recorder, name: str, request_id: str, tokens: int) -> ReadableSpan:
    """One call's span tree: the server span, tokenize, queue and encode under it, and its linked batch."""
    [call] = [s for s in recorder.named(name) if s.attributes.get("attention.request_id") == request_id]
    assert call.kind == SpanKind.SERVER
    assert call.attributes["rpc.system.name"] == "grpc" and call.attributes["rpc.method"] == name
    assert call.attributes["rpc.response.status_code"] == "OK" and call.status.is_ok
    spans = recorder.spans()
    children = _children(spans, call)
    assert set(children) == {"tokenize", "queue", "encode"}
    tokenize, queue, encode = children["tokenize"], children["queue"], children["encode"]
    assert tokenize.attributes["attention.model"] == "minilm-l6" and tokenize.attributes["attention.tokens"] == tokens
    assert call.start_time <= tokenize.start_time <= tokenize.end_time <= queue.start_time + SLACK_NS
    assert queue.start_time <= queue.end_time <= encode.start_time <= encode.end_time <= call.end_time
    batch = _batch_of(recorder, call)
    assert batch.parent is None and batch.kind == SpanKind.INTERNAL  # a root of its own, linked to the call
    assert batch.attributes["batch.size"] == 1 and batch.attributes["batch.tokens"] == tokens
    assert batch.start_time == queue.end_time  # the queue wait ends as the batch starts
    assert [link.context.span_id for link in queue.links] == [batch.context.span_id]
    return call


def test_span_tree_of_analyze_and_model_infer(traced):
    srv, recorder = traced
    recorder.exporter.clear()
    with AttentionClient(srv.target, timeout=60) as client:
        result = client.analyze("The cat sat on the mat.", top_k=1, metadata=[("x-request-id", "trace-analyze")])
    call = _check_call(recorder, ANALYZE, "trace-analyze", len(result.tokens))
    assert call.parent is None  # no traceparent: a new trace
    text = kpb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"hello world"]))
    with grpc.insecure_channel(srv.target) as channel:
        kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            kpb.ModelInferRequest(model_name="minilm-l6", inputs=[text]), timeout=60,
            metadata=[("x-request-id", "trace-infer")])
    _check_call(recorder, MODEL_INFER, "trace-infer", 4)  # [CLS] hello world [SEP]
    # Health checks get no span; every span of a call is in its trace.
    assert not [s for s in recorder.spans() if s.name.startswith("grpc.health")]


def test_the_callers_trace_is_kept(traced):
    srv, recorder = traced
    recorder.exporter.clear()
    with AttentionClient(srv.target, timeout=60) as client:
        client.analyze("hello world", metadata=[("traceparent", TRACEPARENT), ("tracestate", "vendor=v1"),
                                                ("x-request-id", "trace-kept")])
        # A caller that is not sampled: nothing is recorded, and its batch gets no span.
        client.analyze("hello world", metadata=[("traceparent", TRACEPARENT[:-2] + "00"),
                                                ("x-request-id", "trace-unsampled")])
        client.analyze("hello world", metadata=[("traceparent", "00-not-a-trace-01"),
                                                ("x-request-id", "trace-malformed")])
    [call] = [s for s in recorder.named(ANALYZE) if s.attributes["attention.request_id"] == "trace-kept"]
    assert call.context.trace_id == TRACE_ID
    assert call.parent is not None and call.parent.span_id == CALLER_SPAN_ID and call.parent.is_remote
    assert call.context.trace_state.get("vendor") == "v1"
    assert set(_children(recorder.spans(), call)) == {"tokenize", "queue", "encode"}
    assert _batch_of(recorder, call).context.trace_id != TRACE_ID  # linked, in a trace of its own
    [fresh] = [s for s in recorder.named(ANALYZE) if s.attributes["attention.request_id"] == "trace-malformed"]
    assert fresh.parent is None and fresh.context.trace_id != TRACE_ID
    _batch_of(recorder, fresh)  # the unsampled call's batch would have been started (and recorded) before
    assert len(recorder.named(ANALYZE)) == 2 and len(recorder.named("batch")) == 2
    assert len(recorder.named("tokenize")) == 2 and len(recorder.named("queue")) == 2


async def test_one_batch_span_is_linked_to_every_call_in_it():
    # One compute slot; a lone sequence waits up to a minute for company until max_batch_size (3)
    # are queued: the three calls below share one runtime batch on any machine.
    recorder = Recorder()
    with TracedServer(Tracing(recorder.provider), instances=1, max_batch_size=3, max_queue_delay_ms=60_000) as srv:
        async with AsyncAttentionClient(srv.target, timeout=60) as client:
            texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the trees"]
            results = await asyncio.gather(*(
                client.analyze(text, metadata=[("x-request-id", f"together-{i}")]) for i, text in enumerate(texts)))
        calls = recorder.named(ANALYZE)
        assert len(calls) == 3
        batch = _batch_of(recorder, calls[0])
    recorder.provider.shutdown()
    assert len(recorder.named("batch")) == 1
    assert batch.attributes["batch.size"] == 3
    assert batch.attributes["batch.tokens"] == sum(len(r.tokens) for r in results)
    assert batch.attributes["batch.padded_tokens"] == 3 * max(len(r.tokens) for r in results)
    assert {link.context.span_id for link in batch.links} == {c.context.span_id for c in calls}
    assert all(link.attributes["attention.sequences"] == 1 for link in batch.links)
    for call in calls:  # each call's own queue span links back to the shared batch
        queue = _children(recorder.spans(), call)["queue"]
        assert [link.context.span_id for link in queue.links] == [batch.context.span_id]
        assert queue.end_time == batch.start_time


def test_tracing_off_creates_no_spans(monkeypatch):
    """With no exporter in the environment (create_server's default) no span object is
    made and no trace context read, on either protocol, callers' traceparent or not."""
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    made: list[str] = []

    def recorded(name, original):
        def call(*args, **kwargs):
            made.append(name)
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(SdkTracer, "start_span", recorded("span", SdkTracer.start_span))
    monkeypatch.setattr(TraceContextTextMapPropagator, "extract",
                        recorded("extract", TraceContextTextMapPropagator.extract))
    with TracedServer(tracing=None) as srv:
        assert not srv.server.tracing.enabled and srv.server.engine.trace is None
        with AttentionClient(srv.target, timeout=60) as client:
            client.analyze("hello world", metadata=[("traceparent", TRACEPARENT)])
            list(client.analyze_stream(["hello", "world"], metadata=[("traceparent", TRACEPARENT)]))
        text = kpb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"hello"]))
        with grpc.insecure_channel(srv.target) as channel:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                kpb.ModelInferRequest(model_name="minilm-l6", inputs=[text]), timeout=60,
                metadata=[("traceparent", TRACEPARENT)])
    assert made == []


@pytest.mark.parametrize("env, enabled", [
    ({}, False),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "attention-a"}, True),
])
def test_the_otel_variables_turn_tracing_on_and_off(monkeypatch, env, enabled):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracing = Tracing.from_env()
    assert tracing.enabled == enabled
    if enabled:
        assert tracing.provider is not None and tracing.provider.resource.attributes["service.name"] == "attention-a"
    tracing.close()


def test_an_exporter_that_is_not_installed_fails_at_start(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json")
    with pytest.raises(TracingConfigError, match=r"no span exporter named 'zipkin_json'.*installed: .*console"):
        Tracing.from_env()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(TracingConfigError, match="OTLP protocol 'carrier-pigeon' is not supported"):
        Tracing.from_env()


def _printed_spans(text: str) -> list[dict]:
    """The JSON objects ConsoleSpanExporter wrote (one indented object per span), other lines skipped."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    text = "\n" + text  # the first span may start the text (the line before it was read already)
    while (at := text.find("\n{", at)) >= 0:
        span, end = decoder.raw_decode(text, at + 1)
        spans.append(span)
        at = end
    return spans


def test_a_real_process_prints_its_spans_with_the_console_exporter():
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "attention-console-test"}
    with ServerProcess(env=env) as proc:
        with AttentionClient(proc.target, timeout=60) as client:
            client.analyze("hello world", metadata=[("traceparent", TRACEPARENT)])
        proc.proc.terminate()  # spans are flushed on the way out
        assert proc.proc.wait(60) == 0, proc.stderr()[-2000:]
        out = proc.proc.stdout.read()
    spans = _printed_spans(out)
    mine = {s["name"]: s for s in spans if s["context"]["trace_id"] == f"0x{TRACE_ID:032x}"}
    assert {ANALYZE, "tokenize", "queue"} <= set(mine)
    call = mine[ANALYZE]
    assert call["kind"] == "SpanKind.SERVER" and call["parent_id"] == f"0x{CALLER_SPAN_ID:016x}"
    assert call["attributes"]["rpc.response.status_code"] == "OK"
    assert call["resource"]["attributes"]["service.name"] == "attention-console-test"
    assert mine["tokenize"]["parent_id"] == call["context"]["span_id"]
    [batch] = [s for s in spans if s["name"] == "batch"]
    assert [link["context"]["span_id"] for link in batch["links"]] == [call["context"]["span_id"]]


def test_an_http_call_keeps_the_callers_trace(traced):
    srv, recorder = traced
    recorder.exporter.clear()
    body = json.dumps({"sequences": [{"text": "hello world"}], "options": {"topK": 1}}).encode()
    request = urllib.request.Request(srv.http_url + "/v1/analyze", body, headers={
        "Content-Type": "application/json", "traceparent": TRACEPARENT, "x-request-id": "trace-http"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
    # The server span ends after the last byte of the reply went out: wait for it.
    [call] = wait_until(lambda: [s for s in recorder.spans()
                                 if s.attributes.get("attention.request_id") == "trace-http"], 30)
    assert call.name == "POST /v1/analyze" and call.kind == SpanKind.SERVER
    assert call.attributes["http.route"] == "/v1/analyze" and call.attributes["http.response.status_code"] == 200
    assert call.context.trace_id == TRACE_ID and call.parent is not None and call.parent.span_id == CALLER_SPAN_ID
    assert set(_children(recorder.spans(), call)) == {"tokenize", "queue", "encode"}
    _batch_of(recorder, call)
