"""Open Inference Protocol inputs beyond what tritonclient sends: typed contents,
1-D BYTES, and the errors for malformed tensors (hand-built messages). Every
request runs over both transports: the gRPC message itself, and the same
message as a REST body (typed contents as JSON `data`, raw contents as binary
tensor data after the JSON header)."""

import struct

import grpc
import httpx
import numpy as np
import orjson
import pytest

from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc

Input = kpb.ModelInferRequest.InferInputTensor
Output = kpb.ModelInferRequest.InferRequestedOutputTensor
IDS = [[101, 7592, 2088, 102], [101, 7592, 102, 0]]
HTTP_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED"}


class CallError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _parameter(p: kpb.InferParameter):
    return getattr(p, p.WhichOneof("parameter_choice"))


def rest_body(request: kpb.ModelInferRequest) -> tuple[bytes, dict[str, str]]:
    """A ModelInferRequest as a REST body: typed contents as JSON data, raw contents as binary data."""
    inputs, binary = [], []
    for i, tensor in enumerate(request.inputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if request.raw_input_contents:
            entry["parameters"] = {"binary_data_size": len(request.raw_input_contents[i])}
            binary.append(request.raw_input_contents[i])
        else:
            field = tensor.contents.ListFields()[0][1] if tensor.contents.ListFields() else []
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in field]
        inputs.append(entry)
    doc = {"id": request.id, "inputs": inputs,
           "parameters": {k: _parameter(v) for k, v in request.parameters.items()} | {"binary_data_output": True}}
    if request.outputs:
        doc["outputs"] = [{"name": o.name} for o in request.outputs]
    header = orjson.dumps(doc)
    headers = {"inference-header-content-length": str(len(header))} if binary else {}
    return header + b"".join(binary), headers


def rest_response(response: httpx.Response) -> kpb.ModelInferResponse:
    """A REST inference response (binary outputs) as the ModelInferResponse gRPC would send."""
    if response.status_code != 200:
        raise CallError(HTTP_CODE.get(response.status_code, str(response.status_code)), response.json()["error"])
    n = int(response.headers.get("inference-header-content-length", len(response.content)))
    doc = orjson.loads(response.content[:n])
    out = kpb.ModelInferResponse(model_name=doc["model_name"], model_version=doc["model_version"],
                                 id=doc.get("id", ""))
    offset = n
    for tensor in doc["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        out.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        out.raw_output_contents.append(response.content[offset:offset + size])
        offset += size
    assert offset == len(response.content)
    return out


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


@pytest.fixture(params=["grpc", "rest"])
def infer(request, channel, http):
    """ModelInfer over one transport: a ModelInferRequest in, a ModelInferResponse out, CallError on failure."""
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)

    def over_grpc(message: kpb.ModelInferRequest) -> kpb.ModelInferResponse:
        try:
            return stub.ModelInfer(message, timeout=60)
        except grpc.RpcError as exc:
            raise CallError(exc.code().name, exc.details()) from None

    def over_rest(message: kpb.ModelInferRequest) -> kpb.ModelInferResponse:
        body, headers = rest_body(message)
        return rest_response(http.post(f"/v2/models/{message.model_name}/infer", content=body, headers=headers))

    return over_grpc if request.param == "grpc" else over_rest


def _array(response, name):
    index = [o.name for o in response.outputs].index(name)
    out = response.outputs[index]
    dtype = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "FP16": "<f2"}[out.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(out.shape))


def _bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def test_typed_contents_give_the_same_numbers_as_raw(infer):
    flat = [v for row in IDS for v in row]
    mask = [1 if v else 0 for v in flat]
    typed = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
        Input(name="input_ids", datatype="INT64", shape=[2, 4], contents=kpb.InferTensorContents(int64_contents=flat)),
        Input(name="attention_mask", datatype="INT32", shape=[2, 4],
              contents=kpb.InferTensorContents(int_contents=mask)),
    ], outputs=[Output(name="last_hidden_state")])
    raw = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
        Input(name="input_ids", datatype="INT64", shape=[2, 4]),
        Input(name="attention_mask", datatype="INT64", shape=[2, 4]),
    ], raw_input_contents=[np.array(flat, "<i8").tobytes(), np.array(mask, "<i8").tobytes()],
        outputs=[Output(name="last_hidden_state")])
    a = _array(infer(typed), "last_hidden_state")
    b = _array(infer(raw), "last_hidden_state")
    assert a.shape == (2, 4, 384)
    np.testing.assert_array_equal(a, b)
    assert not a[1, 3].any()  # the padded position of row 1


def test_both_transports_give_the_same_response(channel, http):
    """Byte for byte: the same outputs, shapes and raw contents whichever port computed them."""
    request = kpb.ModelInferRequest(model_name="minilm-l6", id="same", inputs=[
        Input(name="input_ids", datatype="INT64", shape=[2, 4]),
    ], raw_input_contents=[np.array(IDS, "<i8").tobytes()], parameters={"top_k": kpb.InferParameter(int64_param=3)})
    over_grpc = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    body, headers = rest_body(request)
    over_rest = rest_response(http.post("/v2/models/minilm-l6/infer", content=body, headers=headers))
    assert over_rest == over_grpc
    assert [o.name for o in over_rest.outputs][-3:] == ["pair_from_index", "pair_to_index", "pair_strength"]


def test_one_dimensional_text_and_typed_bytes(infer, client):
    request = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
        Input(name="text", datatype="BYTES", shape=[2],
              contents=kpb.InferTensorContents(bytes_contents=[b"hello world", "naïve café".encode()])),
    ], outputs=[Output(name="sequence_length"), Output(name="tokens")])
    response = infer(request)
    expected = [len(r.tokens) for r in client.analyze_batch(["hello world", "naïve café"])]
    assert _array(response, "sequence_length").tolist() == expected
    assert [o.name for o in response.outputs] == ["sequence_length", "tokens"]  # the order asked


BAD = [
    ("count", [Input(name="input_ids", datatype="INT64", shape=[1, 3])], [np.zeros(2, "<i8").tobytes()],
     "input 'input_ids'"),
    ("bytes", [Input(name="text", datatype="BYTES", shape=[1])], [b"\x05\x00\x00\x00ab"], "input 'text'"),
    ("mask", [Input(name="input_ids", datatype="INT64", shape=[1, 3]),
              Input(name="attention_mask", datatype="INT64", shape=[1, 3])],
     [np.array([101, 7592, 102], "<i8").tobytes(), np.array([1, 0, 1], "<i8").tobytes()], "attention_mask"),
    ("both", [Input(name="input_ids", datatype="INT64", shape=[1, 2]), Input(name="text", datatype="BYTES", shape=[1])],
     [np.array([101, 102], "<i8").tobytes(), _bytes(b"hi")], "either"),
    ("unknown", [Input(name="pixels", datatype="FP32", shape=[1])], [b"\0" * 4], "input 'pixels'"),
    ("vocab", [Input(name="input_ids", datatype="INT64", shape=[1, 2])], [np.array([101, 999999], "<i8").tobytes()],
     "vocabulary"),
    ("batch", [Input(name="text", datatype="BYTES", shape=[65])], [_bytes(*[b"x"] * 65)], "1 to 64"),
]


@pytest.mark.parametrize(("inputs", "raw", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_tensors_are_invalid_argument_naming_the_tensor(infer, channel, inputs, raw, words):
    request = kpb.ModelInferRequest(model_name="minilm-l6", inputs=inputs, raw_input_contents=raw)
    with pytest.raises(CallError) as err:
        infer(request)
    assert err.value.code == "INVALID_ARGUMENT"
    assert words in err.value.message, err.value.message
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
