"""Triton's nv_inference_* metric families move with real calls and equal the Open
Inference Protocol's ModelStatistics; the metrics port answers at /metrics only;
every metric the Grafana dashboard queries exists in a real scrape."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from attention_client import AttentionClient, ResourceExhaustedError
from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.helpers import ROOT, ServerThread, wait_until

MODEL = "minilm-l6"
DASHBOARD = ROOT / "deploy" / "grafana" / "attention-service.json"
# Triton's per-model counters and their help texts (Triton's docs/user_guide/metrics.md and
# the server's own output), with the ModelStatistics value each one reports.
TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include cached requests)",
    "nv_inference_request_duration_us":
        "Cumulative inference request duration in microseconds (includes cached requests)",
    "nv_inference_queue_duration_us":
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
    "nv_inference_compute_input_duration_us":
        "Cumulative compute input duration in microseconds (does not include cached requests)",
    "nv_inference_compute_infer_duration_us":
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
    "nv_inference_compute_output_duration_us":
        "Cumulative inference compute output duration in microseconds (does not include cached requests)",
}
PENDING = "nv_inference_pending_request_count"
# 16 tokens fit in the queue; a longer sequence is refused once queued (RESOURCE_EXHAUSTED), a failed request.
QUEUE_TOKENS = 16
LONG_TEXT = "the transformer model processes all of the tokens in parallel with many heads of attention " * 2


def from_statistics(stats: kpb.ModelStatistics) -> dict[str, float]:
    """What each Triton counter must read, from one model's ModelStatistics."""
    inference = stats.inference_stats
    return {
        "nv_inference_request_success": inference.success.count,
        "nv_inference_request_failure": inference.fail.count,
        "nv_inference_count": stats.inference_count,
        "nv_inference_exec_count": stats.execution_count,
        "nv_inference_request_duration_us": inference.success.ns / 1000,
        "nv_inference_queue_duration_us": inference.queue.ns / 1000,
        "nv_inference_compute_input_duration_us": inference.compute_input.ns / 1000,
        "nv_inference_compute_infer_duration_us": inference.compute_infer.ns / 1000,
        "nv_inference_compute_output_duration_us": inference.compute_output.ns / 1000,
    }


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServerThread, kpb_grpc.GRPCInferenceServiceStub, AttentionClient]]:
    with (ServerThread(max_queue_tokens=QUEUE_TOKENS) as srv, grpc.insecure_channel(srv.target) as channel,
          AttentionClient(srv.target, timeout=60) as client):
        yield srv, kpb_grpc.GRPCInferenceServiceStub(channel), client


def get(port: int, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {},
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            status, headers, body = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        status, headers, body = err.code, dict(err.headers), err.read()
    if headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return status, headers, body.decode()


SAMPLE = re.compile(r'([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a plain-text exposition by its name as written: prometheus-client's
    parser renames a counter's samples to `<name>_total`, which Triton's do not have."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.fullmatch(line)
            assert match, line
            labels = tuple(sorted(LABEL.findall(match.group(2) or "")))
            out[(match.group(1), labels)] = float(match.group(3))
    return out


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, text = get(port)
    assert status == 200
    return samples(text)


def triton(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], model: str = MODEL) -> dict[str, float]:
    labels = (("model", model), ("version", "1"))
    return {name: values[(name, labels)] for name in TRITON_COUNTERS}


def statistics(stub: kpb_grpc.GRPCInferenceServiceStub) -> dict[str, kpb.ModelStatistics]:
    reply = stub.ModelStatistics(kpb.ModelStatisticsRequest(), timeout=30)
    return {s.name: s for s in reply.model_stats}


def settled(stub: kpb_grpc.GRPCInferenceServiceStub) -> dict[str, kpb.ModelStatistics]:
    """ModelStatistics once every runtime batch has finished its output phase: a caller
    has its results a moment before the batch's output time is added up."""
    def done() -> dict[str, kpb.ModelStatistics] | None:
        stats = statistics(stub)
        model = stats[MODEL]
        return stats if model.inference_stats.compute_output.count == model.execution_count else None
    return wait_until(done, timeout=10)  # type: ignore[return-value]


def infer_text(stub: kpb_grpc.GRPCInferenceServiceStub, *texts: str) -> None:
    tensor = kpb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(texts)],
        contents=kpb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))
    stub.ModelInfer(kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor], outputs=[
        kpb.ModelInferRequest.InferRequestedOutputTensor(name="sequence_length")]), timeout=60)


def test_triton_counters_move_by_the_calls_made_and_equal_model_statistics(served):
    srv, stub, client = served
    port = srv.server.metrics_port
    before_stats = settled(stub)[MODEL]
    before = triton(scrape(port))
    assert before == from_statistics(before_stats)

    infer_text(stub, "hello world")
    infer_text(stub, "The cat sat on the mat.", "hello")  # one request, two inferences
    client.analyze("one more")
    with pytest.raises(ResourceExhaustedError, match="max_queue_tokens"):
        client.analyze(LONG_TEXT)  # queued, then refused: a failed request

    after_stats = settled(stub)
    after = triton(scrape(port))
    assert after == from_statistics(after_stats[MODEL])  # exactly, not roughly
    moved = {name: after[name] - before[name] for name in TRITON_COUNTERS}
    assert moved["nv_inference_request_success"] == 3
    assert moved["nv_inference_request_failure"] == 1
    assert moved["nv_inference_count"] == 4
    # Two sequences of one request share a runtime batch or not, as the batcher sees fit.
    assert 3 <= moved["nv_inference_exec_count"] <= 4
    for name in TRITON_COUNTERS:
        if name.endswith("_duration_us"):
            assert moved[name] > 0, name
    # One series per loaded model, as ModelStatistics lists them, all version "1".
    values = scrape(port)
    series = {dict(labels)["model"] for name, labels in values if name == "nv_inference_count"}
    assert series == set(after_stats)
    assert {dict(labels)["version"] for name, labels in values if name.startswith("nv_")} == {"1"}
    for model in after_stats:
        assert triton(values, model) == from_statistics(after_stats[model])
    # Nothing waits now: the pending gauge reads the queue, as attention_queue_depth does.
    assert values[(PENDING, (("model", MODEL), ("version", "1")))] == 0
    assert values[("attention_queue_depth", (("model", MODEL),))] == 0


def test_families_have_tritons_names_types_help_and_labels(served):
    srv, _, client = served
    client.analyze("hello")
    status, headers, text = get(srv.server.metrics_port)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = text.splitlines()
    for name, help_text in TRITON_COUNTERS.items():
        assert f"# HELP {name} {help_text}" in lines
        assert f"# TYPE {name} counter" in lines
        samples = [line for line in lines if line.startswith(f"{name}{{")]
        assert samples and all(line.startswith(f'{name}{{model="') and ',version="1"} ' in line
                               for line in samples), samples
        assert not any(line.startswith((f"{name}_total", f"{name}_created")) for line in lines)
    assert "# TYPE nv_inference_pending_request_count gauge" in lines
    assert ("# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting "
            "execution per-model.") in lines
    families = {f.name: f for f in text_string_to_metric_families(text)}  # a parser takes it
    for name in TRITON_COUNTERS:
        assert families[name].type == "counter"
        assert {tuple(sorted(s.labels)) for s in families[name].samples} == {("model", "version")}

    # OpenMetrics has no counter without the _total suffix: the names stay Triton's there too.
    status, headers, text = get(srv.server.metrics_port, headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(text)}  # a strict parser: the output is valid
    for name in TRITON_COUNTERS:
        assert families[name].type == "unknown"
        assert {s.name for s in families[name].samples} == {name}
    assert families[PENDING].type == "gauge"


def test_metrics_are_served_at_metrics_only(served):
    srv, _, _ = served
    port = srv.server.metrics_port
    for path in ("/", "/v2/health/ready", "/v2/health/live", f"/v2/models/{MODEL}/ready", "/v2/models/nope/ready",
                 "/metrics/", "/favicon.ico"):
        status, _, body = get(port, path)
        assert status == 404, path
        assert "nv_inference" not in body and "/metrics" in body
    status, headers, body = get(port, "/metrics?name[]=nv_inference_count")
    assert status == 200 and "nv_inference_count{" in body
    status, headers, body = get(port, "/metrics", method="HEAD")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 0
    status, headers, _ = get(port, "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert "# TYPE nv_inference_count counter" in body.splitlines()


@pytest.mark.skipif(importlib.util.find_spec("gevent") is None or importlib.util.find_spec("geventhttpclient") is None,
                    reason="tritonclient's HTTP client is not installed (tritonclient[http])")
def test_a_triton_http_client_on_the_metrics_port_finds_nothing_ready(served):
    srv, _, _ = served
    # In its own process: tritonclient registers the same protobuf names as the server's stubs.
    program = ("import json, sys, tritonclient.http as h; c = h.InferenceServerClient(sys.argv[1]); "
               "print(json.dumps([c.is_server_live(), c.is_server_ready(), c.is_model_ready('nope'), "
               f"c.is_model_ready('{MODEL}')]))")
    done = subprocess.run([sys.executable, "-c", program, f"127.0.0.1:{srv.server.metrics_port}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, False, False, False]


# PromQL words that are not metric names.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: label matchers, ranges, strings,
    grouping labels, functions and keywords left out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not match.group(2) and match.group(1) not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def test_metric_names_are_parsed_from_promql():
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{model=~"$model"}[$__rate_interval])))'
                        ) == {"a_bucket"}
    assert metric_names("sum by (model) (rate(x_total[5m])) / sum without (code) (y) > bool 0") == {"x_total", "y"}


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            queries.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert inner, variable["query"]
            queries.append(inner.group(1))
    return queries


def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(served):
    srv, stub, client = served
    client.analyze("The transformer model processes all tokens in parallel.")
    infer_text(stub, "hello world")
    settled(stub)
    status, _, text = get(srv.server.metrics_port)
    assert status == 200
    scraped = {name for name, _ in samples(text)}

    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    used = set().union(*(metric_names(q) for q in queries))
    assert {"attention_requests_total", "attention_request_duration_seconds_bucket", "attention_queue_depth",
            "attention_pending_result_budget_bytes", "nv_inference_request_success"} <= used  # the parser works
    assert sorted(used - scraped) == []
    # Latency as quantiles from the histograms, and the Triton families in a row of their own.
    assert any(q.startswith("histogram_quantile(0.99,") for q in queries)
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert any("nv_inference" in title for title in rows)
    # Imports anywhere: the data source is an input, chosen on import.
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    sources = [p["datasource"] for p in dashboard["panels"] if p["type"] != "row"]
    sources += [t["datasource"] for p in dashboard["panels"] for t in p.get("targets", [])]
    sources += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert sources and all(s == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for s in sources)
