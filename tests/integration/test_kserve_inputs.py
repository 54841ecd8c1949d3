"""Open Inference Protocol inputs beyond what tritonclient sends: typed contents,
1-D BYTES, and the errors for malformed tensors (hand-built messages)."""

import struct

import grpc
import numpy as np
import pytest

from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc

Input = kpb.ModelInferRequest.InferInputTensor
IDS = [[101, 7592, 2088, 102], [101, 7592, 102, 0]]


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel)


def _array(response, name):
    index = [o.name for o in response.outputs].index(name)
    out = response.outputs[index]
    dtype = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "FP16": "<f2"}[out.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(out.shape))


def _bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def test_typed_contents_give_the_same_numbers_as_raw(stub):
    flat = [v for row in IDS for v in row]
    mask = [1 if v else 0 for v in flat]
    typed = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
        Input(name="input_ids", datatype="INT64", shape=[2, 4], contents=kpb.InferTensorContents(int64_contents=flat)),
        Input(name="attention_mask", datatype="INT32", shape=[2, 4],
              contents=kpb.InferTensorContents(int_contents=mask)),
    ], outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="last_hidden_state")])
    raw = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
        Input(name="input_ids", datatype="INT64", shape=[2, 4]),
        Input(name="attention_mask", datatype="INT64", shape=[2, 4]),
    ], raw_input_contents=[np.array(flat, "<i8").tobytes(), np.array(mask, "<i8").tobytes()],
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="last_hidden_state")])
    a = _array(stub.ModelInfer(typed, timeout=60), "last_hidden_state")
    b = _array(stub.ModelInfer(raw, timeout=60), "last_hidden_state")
    assert a.shape == (2, 4, 384)
    np.testing.assert_array_equal(a, b)
    assert not a[1, 3].any()  # the padded position of row 1


def test_one_dimensional_text_and_typed_bytes(stub, client):
    request = kpb.ModelInferRequest(model_name="minilm-l6", inputs=[
        Input(name="text", datatype="BYTES", shape=[2],
              contents=kpb.InferTensorContents(bytes_contents=[b"hello world", "naïve café".encode()])),
    ], outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="sequence_length"),
                kpb.ModelInferRequest.InferRequestedOutputTensor(name="tokens")])
    response = stub.ModelInfer(request, timeout=60)
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
def test_malformed_tensors_are_invalid_argument_naming_the_tensor(stub, inputs, raw, words):
    request = kpb.ModelInferRequest(model_name="minilm-l6", inputs=inputs, raw_input_contents=raw)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details(), err.value.details()
    assert stub.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
