"""attention.v1 as HTTP/JSON on the server's HTTP port: protobuf's JSON mapping of
the same messages, the same numbers as gRPC, errors as a status and a message,
and the explorer page served by the server itself."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from email.message import Message
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from attention_client.protocol import attention_pb2 as pb
from attention_client.protocol import attention_pb2_grpc as pb_grpc
from tests.integration.test_explorer import browser, check_explorer  # noqa: F401  (a fixture)

TEXT = "The transformer model processes all tokens in parallel."


def fetch(url: str, body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 256 << 20)]) as channel:
        yield pb_grpc.AttentionServiceStub(channel)


REQUEST = {"sequences": [{"text": TEXT}, {"text": "A short one.", "textPair": "And its pair."}],
           "options": {"layers": [0, 5], "heads": [2, 7], "topK": 3, "wordLevel": True, "headStatistics": True}}


def test_analyze_as_json_equals_the_grpc_reply(server, stub):
    status, headers, body = fetch(server.http_url + "/v1/analyze", REQUEST)
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    over_http = json_format.Parse(body, pb.AnalyzeResponse())
    over_grpc = stub.Analyze(json_format.ParseDict(REQUEST, pb.AnalyzeRequest()))
    assert over_http == over_grpc
    # The documented decoder: base64 of the raw little-endian bytes, with dtype and shape.
    doc = json.loads(body)
    tensor = doc["results"][0]["attention"]
    attention = np.frombuffer(base64.b64decode(tensor["data"]), "<f4").reshape([int(d) for d in tensor["shape"]])
    assert attention.shape == (2, 2, len(doc["results"][0]["tokens"]), len(doc["results"][0]["tokens"]))
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    # Fields at their default values are present (a token at offset 0 says so).
    assert doc["results"][0]["tokens"][1]["start"] == 0 and doc["results"][0]["layers"] == [0, 5]


def test_analyze_stream_is_one_json_result_a_line(server, stub):
    status, headers, body = fetch(server.http_url + "/v1/analyze_stream", REQUEST)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/x-ndjson")
    lines = body.decode().splitlines()
    over_grpc = list(stub.AnalyzeStream(json_format.ParseDict(REQUEST, pb.AnalyzeRequest())))
    assert [json_format.Parse(line, pb.SequenceResult()) for line in lines] == over_grpc


def test_models_as_json(server, stub):
    status, _, body = fetch(server.http_url + "/v1/models")
    assert status == 200
    assert json_format.Parse(body, pb.ListModelsResponse()) == stub.ListModels(pb.ListModelsRequest())
    status, _, body = fetch(server.http_url + "/v1/models/minilm-l6")
    assert status == 200
    assert json_format.Parse(body, pb.ModelInfo()) == stub.GetModel(pb.GetModelRequest(name="minilm-l6"))


@pytest.mark.parametrize(("path", "body", "raw", "status", "message"), [
    ("/v1/analyze", None, b"{not json", 400, "body: not a valid AnalyzeRequest"),
    ("/v1/analyze", {"sequences": [{"text": "x"}], "nope": 1}, None, 400, "nope"),
    ("/v1/analyze", {"sequences": [{"text": "x"}], "options": {"topK": "many"}}, None, 400, "topK"),
    ("/v1/analyze", {"sequences": []}, None, 400, "sequences"),
    ("/v1/analyze", {"sequences": [{"text": "word " * 9000}]}, None, 400, "sequences[0].text"),
    ("/v1/analyze", {"model": "nope", "sequences": [{"text": "x"}]}, None, 404, "model 'nope' not found"),
    ("/v1/models/nope", None, None, 404, "model 'nope' not found"),
    ("/v1/nothing", None, None, 404, "no such path"),
])
def test_errors_are_a_status_and_a_json_message(server, path, body, raw, status, message):
    got, headers, data = fetch(server.http_url + path, body, raw)
    assert got == status, data
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(data)["error"]
    assert headers.get("x-request-id")


def test_a_body_over_the_request_limit_is_413_before_it_is_sent(server):
    # Only the headers go out: the declared length alone is refused, the body is never read.
    port = int(server.http_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/v1/analyze")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(server.settings.max_request_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "max_request_bytes" in json.loads(response.read())["error"]
    connection.close()
    assert fetch(server.http_url + "/v1/models")[0] == 200  # still serving


def test_the_server_serves_the_explorer_page(server, browser, client):  # noqa: F811  (the fixture)
    status, headers, page = fetch(server.http_url + "/explore")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in page.lower()
    check_explorer(browser, server.http_url + "/", client)
