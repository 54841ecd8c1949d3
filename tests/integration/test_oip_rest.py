"""The Open Inference Protocol's REST API with tritonclient.http in this process
(it registers no protos) and plain HTTP: health, metadata, configuration,
tensors as binary data or JSON both ways, parameters, compressed bodies, the
`timeout` parameter, errors, statistics and the repository, with and without
model control and tokens. Every number is compared with what the gRPC port
returns for the same request: they must be equal, not close."""

import gzip
import hashlib
import json
import struct
import zlib

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from attention_server._proto.inference import model_config_pb2 as mc
from tests.helpers import MODEL_DIR, ServerThread, place_model_file

MiB = 1 << 20
MODEL = "minilm-l6"
IDS = np.array([[101, 1996, 10938, 2121, 2944, 102, 0, 0], [101, 7592, 2088, 102, 0, 0, 0, 0]], dtype=np.int64)
TEXTS = np.array([b"The cat sat on the mat.", "naïve café, où?".encode()], dtype=object)
NUMPY = {"FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4"}
# Limits small enough to reach with small requests.
LIMITS = {"max_request_bytes": MiB, "max_response_bytes": MiB, "max_queue_tokens": 1000}


@pytest.fixture(scope="module")
def srv():
    with ServerThread(**LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def triton(srv):
    client = httpclient.InferenceServerClient(srv.http_url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel)


# -- the same request over gRPC ------------------------------------------------------------

def _parameter(value) -> kpb.InferParameter:
    if isinstance(value, bool):
        return kpb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return kpb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return kpb.InferParameter(double_param=value)
    return kpb.InferParameter(string_param=value)


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(b)) + b for b in array.ravel())
    return array.tobytes()


def over_grpc(stub, inputs: dict[str, np.ndarray], outputs=(), parameters=None) -> dict[str, np.ndarray]:
    """The gRPC port's outputs for the same tensors and parameters, as numpy arrays (BYTES as bytes)."""
    datatype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(object): "BYTES"}
    request = kpb.ModelInferRequest(
        model_name=MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(name=n, datatype=datatype[a.dtype],
                                                                            shape=a.shape) for n, a in inputs.items()],
        raw_input_contents=[_raw(a) for a in inputs.values()],
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
        parameters={k: _parameter(v) for k, v in (parameters or {}).items()})
    response = stub.ModelInfer(request, timeout=60)
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                (size,) = struct.unpack_from("<I", raw, pos)
                items.append(raw[pos + 4:pos + 4 + size])
                pos += 4 + size
            out[tensor.name] = np.array(items, dtype=object).reshape(list(tensor.shape))
        else:
            out[tensor.name] = np.frombuffer(raw, NUMPY[tensor.datatype]).reshape(list(tensor.shape))
    return out


def _inputs(arrays: dict[str, np.ndarray], binary: bool) -> list:
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "INT64")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def assert_same(result, expected: dict[str, np.ndarray]) -> None:
    """Every output equal to the gRPC port's: the same names in the same order, dtype, shape and values."""
    assert [o["name"] for o in result.get_response()["outputs"]] == list(expected)
    for name, want in expected.items():
        got = result.as_numpy(name)
        if want.dtype == object:  # JSON BYTES come as str
            got = np.array([g if isinstance(g, bytes) else g.encode() for g in got.ravel()],
                           dtype=object).reshape(got.shape)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name


# -- health and metadata -------------------------------------------------------------------

def test_health_and_model_readiness(http, triton):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    for path in (f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"):
        reply = http.get(path)
        assert reply.status_code == 200 and reply.json() == {"name": MODEL, "ready": True}
    for path in ("/v2/models/no-such-model/ready", f"/v2/models/{MODEL}/versions/2/ready"):
        reply = http.get(path)
        assert reply.status_code == 404 and list(reply.json()) == ["error"], path
    assert "no-such-model" in http.get("/v2/models/no-such-model/ready").json()["error"]
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("no-such-model") and not triton.is_model_ready(MODEL, "2")


def test_metadata_and_config_are_the_grpc_messages_as_triton_json(http, stub):
    server = http.get("/v2").json()
    assert json_format.ParseDict(server, kpb.ServerMetadataResponse()) == stub.ServerMetadata(
        kpb.ServerMetadataRequest(), timeout=10)
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert meta["versions"] == ["1"] and meta["inputs"][0] == {"name": "input_ids", "datatype": "INT64",
                                                               "shape": [-1, -1]}  # numbers, not strings
    assert json_format.ParseDict(meta, kpb.ModelMetadataResponse()) == stub.ModelMetadata(
        kpb.ModelMetadataRequest(name=MODEL), timeout=10)
    config = http.get(f"/v2/models/{MODEL}/config").json()  # the config itself, as Triton's REST API
    assert config["max_batch_size"] == 64 and config["input"][0]["data_type"] == "TYPE_INT64"
    assert config["input"][0]["dims"] == [-1] and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert json_format.ParseDict(config, mc.ModelConfig()) == stub.ModelConfig(
        kpb.ModelConfigRequest(name=MODEL), timeout=10).config
    assert http.get(f"/v2/models/{MODEL}/versions/1/config").json() == config
    assert http.get("/v2/models/no-such-model/config").status_code == 404


# -- tensors ------------------------------------------------------------------------------

@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_id_tensors_as_binary_or_json_equal_the_grpc_numbers(triton, stub, binary_in, binary_out):
    arrays = {"input_ids": IDS, "attention_mask": (IDS != 0).astype(np.int64)}
    outputs = ["attentions", "last_hidden_state", "tokens", "sequence_length"]  # answered in the order asked
    result = triton.infer(MODEL, _inputs(arrays, binary_in), request_id="r-1",
                          outputs=[httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in outputs])
    assert result.get_response()["id"] == "r-1"
    assert_same(result, over_grpc(stub, arrays, outputs))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_text_as_binary_or_json_bytes_equals_the_grpc_numbers(triton, stub, binary):
    outputs = ["tokens", "sequence_length", "attentions_fp16"]
    result = triton.infer(MODEL, _inputs({"text": TEXTS}, binary),
                          outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs])
    expected = over_grpc(stub, {"text": TEXTS}, outputs)
    assert_same(result, expected)
    assert result.as_numpy("attentions_fp16").dtype == np.float16


def test_no_outputs_named_means_every_default_output_as_binary_data(triton, stub):
    result = triton.infer(MODEL, _inputs({"input_ids": IDS[:1, :6]}, True))  # binary_data_output: true
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])
    assert_same(result, over_grpc(stub, {"input_ids": IDS[:1, :6]}))


def test_plain_json_request_gets_a_plain_json_response(http, stub):
    """KServe's default: no binary data anywhere, one JSON document, flat row-major data."""
    reply = http.post(f"/v2/models/{MODEL}/infer", json={
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [[101, 7592, 2088, 102]]}],
        "outputs": [{"name": "sequence_length"}, {"name": "last_hidden_state"}]})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in reply.headers
    doc = reply.json()
    assert doc["model_name"] == MODEL and doc["model_version"] == "1"
    outputs = {o["name"]: o for o in doc["outputs"]}
    want = over_grpc(stub, {"input_ids": IDS[1:, :4]}, ["sequence_length", "last_hidden_state"])
    assert outputs["sequence_length"] == {"name": "sequence_length", "datatype": "INT64", "shape": [1], "data": [4]}
    hidden = outputs["last_hidden_state"]
    assert hidden["shape"] == [1, 4, 384] and len(hidden["data"]) == 4 * 384
    assert np.array_equal(np.array(hidden["data"], np.float32).reshape(1, 4, 384), want["last_hidden_state"])


PARAMETERS = [
    {"layers": "0,5", "heads": "2"},
    {"top_k": 3, "exclude_special_tokens": True},
    {"top_k": 2, "min_strength": 0.25, "layers": "1", "heads": "0, 11"},
]


@pytest.mark.parametrize("parameters", PARAMETERS, ids=["layers-heads", "top_k-special", "top_k-min_strength"])
def test_parameters_select_the_same_heads_and_pairs_as_over_grpc(triton, stub, parameters):
    result = triton.infer(MODEL, _inputs({"text": TEXTS}, True), parameters=parameters)
    expected = over_grpc(stub, {"text": TEXTS}, parameters=parameters)
    assert_same(result, expected)
    if "layers" in parameters:
        layers = len(parameters["layers"].split(","))
        heads = len(parameters.get("heads", "0,1,2,3,4,5,6,7,8,9,10,11").split(","))
        assert result.as_numpy("attentions").shape[1:3] == (layers, heads)
    if "top_k" in parameters:
        assert result.as_numpy("pair_strength").shape[-1] == parameters["top_k"]


def test_timeout_parameter_bounds_the_wait_in_microseconds(triton, http):
    inputs = _inputs({"input_ids": IDS[:1, :6]}, True)
    out = [httpclient.InferRequestedOutput("sequence_length")]
    assert triton.infer(MODEL, inputs, outputs=out, timeout=60_000_000).as_numpy("sequence_length").tolist() == [6]
    with pytest.raises(InferenceServerException) as err:
        triton.infer(MODEL, inputs, outputs=out, timeout=1)  # 1 us: gone before the runtime takes it
    assert err.value.status() == "504" and "deadline" in err.value.message()
    for bad in ("soon", -5, 1.5):
        reply = http.post(f"/v2/models/{MODEL}/infer", json={"parameters": {"timeout": bad}, "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 102]}]})
        assert reply.status_code == 400 and reply.json()["error"].startswith("parameter 'timeout':"), bad


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies(triton, stub, http, algorithm):
    """tritonclient.http compresses the whole body (header and binary tensors); the
    response comes uncompressed, which Accept-Encoding allows."""
    arrays = {"input_ids": IDS, "attention_mask": (IDS != 0).astype(np.int64)}
    result = triton.infer(MODEL, _inputs(arrays, True), outputs=[httpclient.InferRequestedOutput("last_hidden_state")],
                          request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
    assert_same(result, over_grpc(stub, arrays, ["last_hidden_state"]))
    body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2],
                                   "data": [101, 102]}]}).encode()
    packed = gzip.compress(body) if algorithm == "gzip" else zlib.compress(body)
    for broken in (packed[:-6], b"\x1f\x8b not really" if algorithm == "gzip" else b"x\x9c nope"):
        reply = http.post(f"/v2/models/{MODEL}/infer", content=broken, headers={"content-encoding": algorithm})
        assert reply.status_code == 400 and reply.json()["error"].startswith("body:"), reply.text


def test_an_unknown_content_encoding_is_named(http):
    reply = http.post(f"/v2/models/{MODEL}/infer", content=b"{}", headers={"content-encoding": "br"})
    assert reply.status_code == 400 and reply.json()["error"].startswith("Content-Encoding: 'br' is not supported")


# -- errors ---------------------------------------------------------------------------------

def _ids_request(shape=(1, 2), data=(101, 102)) -> dict:
    return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(shape), "data": list(data)}]}


ERRORS = [
    # name, path, body, HTTP status, the gRPC code for the same request (None: REST only), words
    ("unknown model", "/v2/models/no-such-model/infer", _ids_request(), 404, "NOT_FOUND", "no-such-model"),
    ("bad shape", f"/v2/models/{MODEL}/infer", _ids_request((1, -2)), 400, None, "inputs[0].shape[1]"),
    ("wrong datatype", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "input_ids", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}, 400,
     "INVALID_ARGUMENT", "input 'input_ids'"),
    ("bad parameter", f"/v2/models/{MODEL}/infer", {**_ids_request(), "parameters": {"layers": "0,x"}}, 400,
     "INVALID_ARGUMENT", "parameter 'layers'"),
    ("response too large", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [16], "data": ["word " * 40] * 16}],
      "parameters": {"binary_data_output": True}}, 413,
     "RESOURCE_EXHAUSTED", "max_response_bytes"),
    ("more tokens than the queue", f"/v2/models/{MODEL}/infer",
     {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [40], "data": ["word " * 30] * 40}],
      "outputs": [{"name": "sequence_length"}]}, 413, "RESOURCE_EXHAUSTED", "max_queue_tokens"),
]


def _grpc_request(doc: dict, model: str) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, outputs=[
        kpb.ModelInferRequest.InferRequestedOutputTensor(name=o["name"]) for o in doc.get("outputs", [])],
        parameters={k: _parameter(v) for k, v in doc.get("parameters", {}).items()})
    for tensor in doc["inputs"]:
        entry = request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        field = {"INT64": "int64_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}[tensor["datatype"]]
        values = [v.encode() if isinstance(v, str) else v for v in tensor["data"]]
        getattr(entry.contents, field).extend(values)
    return request


@pytest.mark.parametrize(("path", "body", "status", "code", "words"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_are_a_status_and_an_error_body(http, stub, path, body, status, code, words):
    reply = http.post(path, json=body)
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json" and reply.headers["x-request-id"]
    assert list(reply.json()) == ["error"] and words in reply.json()["error"], reply.text
    assert ("retry-after" in reply.headers) == (status == 429)
    if code is not None:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_grpc_request(body, path.split("/")[3]), timeout=60)
        assert err.value.code().name == code
        assert err.value.details() == reply.json()["error"]  # one message, whichever the transport


def test_a_body_over_max_request_bytes_is_413(triton):
    text = httpclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"a" * (MiB + 1)], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        triton.infer(MODEL, [text])
    assert err.value.status() == "413" and "max_request_bytes" in err.value.message()
    assert triton.is_server_ready()


# -- statistics ---------------------------------------------------------------------------

def test_statistics_move_by_exactly_the_calls_made(triton, http):
    def stats() -> dict:
        return triton.get_inference_statistics(MODEL)["model_stats"][0]

    before = stats()
    out = [httpclient.InferRequestedOutput("sequence_length")]
    triton.infer(MODEL, _inputs({"text": TEXTS}, True), outputs=out)  # 2 rows
    triton.infer(MODEL, _inputs({"input_ids": IDS[:1, :6]}, False), outputs=out)  # 1 row
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, _inputs({"input_ids": IDS[:1, :6]}, True), outputs=out, timeout=1)  # fails queued
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, _inputs({"input_ids": IDS[:1, :6].astype(np.int64)}, True),
                     outputs=[httpclient.InferRequestedOutput("logits")])  # refused before the runtime
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 3
    moved = {k: after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"]
             for k in ("success", "fail")}
    assert moved == {"success": 2, "fail": 1}
    assert after["execution_count"] >= before["execution_count"] + 2
    assert after["last_inference"] > 0
    assert [m["name"] for m in triton.get_inference_statistics()["model_stats"]] == [MODEL]
    assert http.get(f"/v2/models/{MODEL}/versions/1/stats").json()["model_stats"][0]["name"] == MODEL
    assert http.get(f"/v2/models/{MODEL}/versions/2/stats").status_code == 404


# -- repository ---------------------------------------------------------------------------

def test_repository_with_model_control_off(triton, http):
    assert triton.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert http.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": MODEL, "version": "1", "state": "READY"}]
    reply = http.post("/v2/repository/index", json={"ready": "yes"})
    assert reply.status_code == 400 and reply.json()["error"].startswith("ready:")
    for call in (lambda: triton.load_model(MODEL), lambda: triton.unload_model(MODEL)):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "400" and "--model-control-mode explicit" in err.value.message()
    reply = http.post(f"/v2/repository/models/{MODEL}/load", json={"parameters": {"config": "{}"}})
    assert reply.status_code == 400 and reply.json()["error"].startswith("parameters.config:")
    assert triton.is_model_ready(MODEL)


INFER_TOKEN, ADMIN_TOKEN = "infer-token-0123456789", "admin-token-0123456789"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Model control on, tokens on, and a second model in the repository (not loaded)."""
    folder = tmp_path_factory.mktemp("secured")
    repo = folder / "repository"
    for name in (MODEL, "second"):
        (repo / name).mkdir(parents=True)
        for path in MODEL_DIR.iterdir():
            if path.name != "model.json":
                place_model_file(path, repo / name / path.name)
        meta = json.loads((MODEL_DIR / "model.json").read_text())
        (repo / name / "model.json").write_text(json.dumps({**meta, "name": name}))
    tokens = folder / "tokens"
    tokens.write_text("".join(f"{role}:{hashlib.sha256(t.encode()).hexdigest()}\n"
                              for role, t in (("infer", INFER_TOKEN), ("admin", ADMIN_TOKEN))))
    with ServerThread(model_repository=repo, models=[MODEL], model_control_mode="explicit",
                      auth_tokens_file=tokens) as server:
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        yield server, client
        client.close()


def test_repository_calls_need_the_admin_role_with_tokens(secured):
    server, triton = secured
    user, admin = ({"Authorization": f"Bearer {t}"} for t in (INFER_TOKEN, ADMIN_TOKEN))
    assert triton.is_server_live() and triton.is_server_ready()  # health is open
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata(MODEL)
    assert err.value.status() == "401"
    assert triton.get_model_metadata(MODEL, headers=user)["name"] == MODEL
    for call in (lambda: triton.get_model_repository_index(headers=user),
                 lambda: triton.load_model("second", headers=user)):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "403" and "admin" in err.value.message()
    assert not triton.is_model_ready("second", headers=user)

    assert {"name": "second", "state": "UNAVAILABLE", "reason": "unloaded"} in triton.get_model_repository_index(
        headers=admin)
    triton.load_model("second", headers=admin)
    try:
        assert triton.is_model_ready("second", headers=user)
        inputs = _inputs({"input_ids": IDS[:1, :6]}, True)
        out = [httpclient.InferRequestedOutput("last_hidden_state")]
        second = triton.infer("second", inputs, outputs=out, headers=user).as_numpy("last_hidden_state")
        first = triton.infer(MODEL, inputs, outputs=out, headers=user).as_numpy("last_hidden_state")
        assert np.array_equal(first, second)  # the same files under another name
    finally:
        triton.unload_model("second", headers=admin)
    assert not triton.is_model_ready("second", headers=user)
    index = {m["name"]: m["state"] for m in triton.get_model_repository_index(headers=admin)}
    assert index == {MODEL: "READY", "second": "UNAVAILABLE"}
    reply = httpx.post(f"{server.http_url}/v2/repository/models/{MODEL}/unload", headers=admin,
                       json={"parameters": {"unload_dependents": "yes"}})
    assert reply.status_code == 400 and reply.json()["error"].startswith("parameters.unload_dependents:")
