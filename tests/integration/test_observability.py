"""Prometheus metrics move with real calls; logs are JSON lines with the call's id."""

import json
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from attention_client import AttentionClient, AttentionError
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._proto.attention.v1 import attention_pb2_grpc as pb_grpc
from tests.helpers import ServerProcess, ServerThread


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _get(values, name, **labels):
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_real_calls():
    with ServerThread() as srv, AttentionClient(srv.target, timeout=60) as client:
        port = srv.server.metrics_port
        assert port
        before = _scrape(port)
        results = client.analyze_batch(["hello world", "The transformer model processes all tokens."], top_k=1)
        client.analyze("one more")
        with pytest.raises(AttentionError):
            client.analyze("x", layers=[99])
        # The status reaches the caller a moment before the server's bookkeeping ends.
        deadline = time.monotonic() + 5
        while True:
            after = _scrape(port)
            if _get(after, "attention_inflight_requests", service="attention.v1.AttentionService") == 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    svc = "attention.v1.AttentionService"
    ok = _get(after, "attention_requests_total", service=svc, method="Analyze", code="OK") - _get(
        before, "attention_requests_total", service=svc, method="Analyze", code="OK")
    bad = _get(after, "attention_requests_total", service=svc, method="Analyze", code="INVALID_ARGUMENT")
    assert ok == 2 and bad == 1
    tokens = sum(len(r.tokens) for r in results) + 4
    assert _get(after, "attention_tokens_total", model="minilm-l6") - _get(
        before, "attention_tokens_total", model="minilm-l6") == tokens
    assert _get(after, "attention_sequences_total", model="minilm-l6") - _get(
        before, "attention_sequences_total", model="minilm-l6") == 3
    assert _get(after, "attention_batch_size_count", model="minilm-l6") >= 2
    assert _get(after, "attention_queue_duration_seconds_count", model="minilm-l6") >= 3
    assert _get(after, "attention_compute_duration_seconds_count", model="minilm-l6") >= 2
    assert _get(after, "attention_request_duration_seconds_count", service=svc, method="Analyze") >= 3
    assert _get(after, "attention_inflight_requests", service=svc) == 0
    assert ("attention_queue_depth", (("model", "minilm-l6"),)) in after
    assert _get(after, "attention_pending_result_bytes") == 0  # every reservation was given back
    assert _get(after, "attention_pending_result_budget_bytes") == 512 << 20


def test_json_logs_carry_the_request_id_which_is_echoed_back():
    with ServerProcess("--log-format", "json") as proc:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.AttentionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Analyze(pb.AnalyzeRequest(), metadata=[("x-request-id", "req-42")], timeout=30)
            assert ("x-request-id", "req-42") in tuple(err.value.trailing_metadata())
            _, call = stub.Analyze.with_call(pb.AnalyzeRequest(sequences=[pb.Sequence(text="hi")]), timeout=30)
            echoed = dict(call.trailing_metadata())["x-request-id"]
            assert len(echoed) == 16  # a fresh id when the caller sends none
        proc.proc.terminate()
        proc.proc.wait(30)
        records = [json.loads(line) for line in proc.stderr().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    mine = [r for r in records if r["request_id"] == "req-42"]
    assert mine and "INVALID_ARGUMENT" in mine[0]["message"] and "sequences" in mine[0]["message"]
