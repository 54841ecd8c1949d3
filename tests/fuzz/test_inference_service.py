"""inference.GRPCInferenceService (Open Inference Protocol) under field-level
mutations of valid requests: shapes that overflow or lie about the contents,
BYTES tensors with bad length prefixes, unknown inputs, outputs and parameters,
and streams with garbage between valid messages. One test per RPC."""

from __future__ import annotations

import struct

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from attention_server._proto.inference import grpc_service_pb2 as kpb
from tests.fuzz import strategies as s
from tests.fuzz.harness import INFERENCE, FuzzServer, check_infer_response, examples, stream_errors

Input = kpb.ModelInferRequest.InferInputTensor
Output = kpb.ModelInferRequest.InferRequestedOutputTensor

OUTPUTS = ["last_hidden_state", "attentions", "attentions_fp16", "tokens", "sequence_length",
           "pair_from_index", "pair_to_index", "pair_strength"]
CHEAP_OUTPUTS = ["tokens", "sequence_length", "pair_from_index", "pair_to_index", "pair_strength"]
PARAMETERS = ["top_k", "min_strength", "exclude_special_tokens", "layers", "heads"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16", "", "int64", "STRING"]
HUGE_SHAPES = [[2**32, 2**32], [2**62, 4], [4, 2**62], [s.INT64_MAX], [s.INT64_MAX, s.INT64_MAX], [2**31, 2**31, 4],
               [-1, 4], [4, -1], [-(2**63), 1], [0, 4], [4, 0], [0], [], [1] * 40, [2**63 - 1, 0]]


@st.composite
def parameter(draw: st.DrawFn) -> kpb.InferParameter:
    kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
    value = {
        "bool_param": st.booleans(),
        "int64_param": st.one_of(st.integers(-3, 64), s.int64s()),
        "string_param": st.one_of(st.sampled_from(["1", "0,1,2", "-1", "5,5", "1e3", "99999999999999999999",
                                                   "0x10", " 1 , 2 ", ",,,", "nan", "", "١", "²"]), s.texts(40)),
        "double_param": s.floats64(),
        "uint64_param": st.one_of(st.integers(0, 64), st.integers(0, s.UINT64_MAX)),
    }[kind]
    return kpb.InferParameter(**{kind: draw(value)})


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(PARAMETERS), st.sampled_from(["", "TOP_K", "top_k ", "\x00", "é" * 300]),
                     st.text(max_size=16))


def parameters(max_size: int = 4) -> st.SearchStrategy[list[tuple[str, kpb.InferParameter]]]:
    """(name, value) pairs set one after the other (a repeated name: the last one wins)."""
    return st.lists(st.tuples(keys(), parameter()), max_size=max_size)


VALID_PARAMETERS = {
    "top_k": st.integers(1, 8).map(lambda k: kpb.InferParameter(int64_param=k)),
    "min_strength": st.sampled_from([0.0, 0.2, 1.0]).map(lambda v: kpb.InferParameter(double_param=v)),
    "exclude_special_tokens": st.booleans().map(lambda v: kpb.InferParameter(bool_param=v)),
    "layers": st.sampled_from(["0", "0,5", "1,2,3"]).map(lambda v: kpb.InferParameter(string_param=v)),
    "heads": st.sampled_from(["11", "0,1"]).map(lambda v: kpb.InferParameter(string_param=v)),
}


@st.composite
def id_inputs(draw: st.DrawFn, batch: int) -> tuple[list[Input], list[bytes]]:
    """Valid input_ids (+ attention_mask with right padding, token_type_ids), raw or typed."""
    length = draw(st.integers(2, 12))
    ids = np.array(draw(st.lists(st.integers(999, 30521), min_size=length, max_size=length)) * batch,
                   dtype=np.int64).reshape(batch, length)
    ids[:, 0], ids[:, -1] = 101, 102
    tensors = [("input_ids", ids)]
    if draw(st.booleans()):
        mask = np.ones_like(ids)
        mask[:, draw(st.integers(1, length)):] = 0
        tensors.append(("attention_mask", mask))
    if draw(st.booleans()):
        tensors.append(("token_type_ids", np.zeros_like(ids)))
    inputs, raws = [], []
    typed = draw(st.integers(0, 3)) == 0
    for name, value in tensors:
        datatype = draw(st.sampled_from(["INT64", "INT64", "INT32"]))
        tensor = Input(name=name, datatype=datatype, shape=list(value.shape))
        if typed:
            getattr(tensor.contents, "int64_contents" if datatype == "INT64" else "int_contents").extend(
                value.reshape(-1).tolist())
        else:
            raws.append(value.astype("<i8" if datatype == "INT64" else "<i4").tobytes())
        inputs.append(tensor)
    return inputs, raws


@st.composite
def text_inputs(draw: st.DrawFn, batch: int) -> tuple[list[Input], list[bytes]]:
    """A BYTES `text` tensor of edge-case unicode, raw or typed."""
    items = draw(st.lists(st.one_of(st.sampled_from([b"hello world", "naïve café".encode()]),
                                    s.texts(80).map(str.encode)), min_size=batch, max_size=batch))
    shape = draw(st.sampled_from([[batch], [batch, 1]]))
    if draw(st.integers(0, 3)) == 0:
        return [Input(name="text", datatype="BYTES", shape=shape,
                      contents=kpb.InferTensorContents(bytes_contents=items))], []
    return [Input(name="text", datatype="BYTES", shape=shape)], [s.bytes_elements(items)]


@st.composite
def bad_bytes_contents(draw: st.DrawFn) -> bytes:
    """BYTES raw contents whose 4-byte length prefixes lie, or that are not UTF-8."""
    good = s.bytes_elements([b"hello", b"world"])
    return draw(st.sampled_from([
        b"\x05", b"\x05\x00", b"\x05\x00\x00",  # ends inside a prefix
        struct.pack("<I", 6) + b"hello",  # runs past the end
        struct.pack("<I", 0xFFFFFFFF) + b"hello",
        struct.pack("<I", 0x7FFFFFFF),
        good + b"\x01",
        good[:-1],
        struct.pack("<I", 0) * 3,  # empty texts
        struct.pack("<i", -1) + b"x",
    ]) | st.lists(s.bad_utf8(), min_size=1, max_size=2).map(s.bytes_elements) | st.binary(max_size=64))


@st.composite
def infer_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """A valid ModelInferRequest, then 0-3 mutations of its fields."""
    batch = draw(st.integers(1, 3))
    inputs, raws = draw(id_inputs(batch) if draw(st.booleans()) else text_inputs(batch))
    request = kpb.ModelInferRequest(model_name=s.MODEL, model_version=draw(st.sampled_from(["", "1"])),
                                    id=draw(st.one_of(st.just(""), st.text(max_size=12))),
                                    inputs=inputs, raw_input_contents=raws)
    for name in draw(st.lists(st.sampled_from(PARAMETERS), unique=True, max_size=3)):
        request.parameters[name].CopyFrom(draw(VALID_PARAMETERS[name]))
    outputs = OUTPUTS if "top_k" in request.parameters else [o for o in OUTPUTS if not o.startswith("pair_")]
    names = draw(st.lists(st.sampled_from(outputs), unique=True, max_size=3))
    if "attentions" in names and "attentions_fp16" in names:
        names.remove("attentions")
    request.outputs.extend([Output(name=n) for n in names])
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        mutate(draw, request)
    if any(d > 64 for t in request.inputs for d in t.shape[1:2]) and not request.outputs:
        request.outputs.add(name="sequence_length")  # the padded axis decides the reply's size
    return request


def mutate(draw: st.DrawFn, request: kpb.ModelInferRequest) -> None:
    """One hostile change: to the request (model, version, id, parameters, outputs,
    batch) or to one input tensor (shape, datatype, name, contents)."""
    how = draw(st.sampled_from(["model", "version", "id", "parameters", "parameters", "outputs", "batch", "ids",
                                "mask", "shape", "huge_shape", "datatype", "name", "raw", "bytes_prefix",
                                "raw_count", "typed_field", "extra_input", "tensor_parameters", "huge_text"]))
    if how == "model":
        request.model_name = draw(s.names())
        return
    if how == "version":
        request.model_version = draw(st.one_of(st.sampled_from(["2", "0", "01", "1.0", "-1"]), s.names()))
        return
    if how == "id":
        request.id = draw(st.one_of(s.texts(32), s.huge_strings()))
        return
    if how == "parameters":
        for key, value in draw(parameters()):
            request.parameters[key].CopyFrom(value)
        return
    if how == "outputs":
        for name in draw(st.lists(st.one_of(st.sampled_from(OUTPUTS), s.texts(16)), min_size=1, max_size=4)):
            out = request.outputs.add(name=name)
            for key, value in draw(parameters(2)):
                out.parameters[key].CopyFrom(value)
        return
    if how == "huge_text":
        text = draw(st.one_of(s.huge_strings(), st.sampled_from(["word " * 600, "a " * 511, "é" * 513])))
        del request.inputs[:]
        request.ClearField("raw_input_contents")
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(s.bytes_elements([text.encode()]))
        return
    if how == "batch":
        # Around max_batch_size (64), and a padded axis past 512 positions.
        rows, length = draw(st.sampled_from([(0, 4), (64, 4), (65, 4), (1, 512), (1, 513), (2, 600)]))
        ids = np.full((rows, length), 2000, dtype="<i8")
        if rows:
            ids[:, 0], ids[:, -1] = 101, 102
        del request.inputs[:]
        request.ClearField("raw_input_contents")
        request.inputs.add(name="input_ids", datatype="INT64", shape=[rows, length])
        request.raw_input_contents.append(ids.tobytes())
        return
    if how == "ids":
        # Token ids outside the vocabulary, or token type ids of any value.
        name = draw(st.sampled_from(["input_ids", "token_type_ids"]))
        values = draw(st.lists(s.int64s(), min_size=1, max_size=6))
        _replace_int64_input(request, name, values)
        return
    if how == "mask":
        values = draw(st.lists(st.integers(-2, 2) | s.int64s(), min_size=1, max_size=6))
        _replace_int64_input(request, "attention_mask", values)
        return
    if not request.inputs:
        return
    i = draw(st.integers(0, len(request.inputs) - 1))
    tensor = request.inputs[i]
    if how == "shape":
        tensor.ClearField("shape")
        tensor.shape.extend(draw(st.lists(st.one_of(st.integers(-2, 70), s.int64s()), max_size=6)))
    elif how == "huge_shape":
        tensor.ClearField("shape")
        tensor.shape.extend(draw(st.sampled_from(HUGE_SHAPES)))
    elif how == "datatype":
        tensor.datatype = draw(st.one_of(st.sampled_from(DATATYPES), s.texts(12)))
    elif how == "name":
        tensor.name = draw(st.one_of(st.sampled_from(["input_ids", "attention_mask", "token_type_ids", "text",
                                                      "", "INPUT_IDS"]), s.texts(24)))
    elif how == "raw" and request.raw_input_contents:
        j = min(i, len(request.raw_input_contents) - 1)
        raw = request.raw_input_contents[j]
        request.raw_input_contents[j] = draw(st.one_of(
            st.integers(0, len(raw)).map(lambda cut: raw[:cut]),
            st.binary(min_size=1, max_size=9).map(lambda tail: raw + tail),
            st.binary(max_size=64)))
    elif how == "bytes_prefix":
        tensor.datatype = "BYTES"
        request.ClearField("raw_input_contents")
        request.raw_input_contents.extend([draw(bad_bytes_contents()) for _ in request.inputs])
    elif how == "raw_count":
        if draw(st.booleans()) and request.raw_input_contents:
            del request.raw_input_contents[-1]
        else:
            request.raw_input_contents.append(draw(st.binary(max_size=32)))
    elif how == "typed_field":
        request.ClearField("raw_input_contents")
        field = draw(st.sampled_from(["bool_contents", "int_contents", "int64_contents", "uint_contents",
                                      "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"]))
        values = {
            "bool_contents": st.booleans(), "int_contents": s.int32s(), "int64_contents": s.int64s(),
            "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": st.integers(0, s.UINT64_MAX),
            "fp32_contents": s.floats32(), "fp64_contents": s.floats64(), "bytes_contents": st.binary(max_size=16),
        }[field]
        tensor.contents.Clear()
        getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=40)))
    elif how == "extra_input":
        extra = request.inputs.add(name=draw(st.sampled_from(["input_ids", "attention_mask", "token_type_ids",
                                                              "text", "pixel_values"])),
                                   datatype=draw(st.sampled_from(DATATYPES)),
                                   shape=draw(st.lists(st.integers(0, 4), max_size=3)))
        if request.raw_input_contents:
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            extra.contents.int64_contents.extend(draw(st.lists(s.int64s(), max_size=16)))
    elif how == "tensor_parameters":
        for key, value in draw(parameters()):
            tensor.parameters[key].CopyFrom(value)


def _replace_int64_input(request: kpb.ModelInferRequest, name: str, values: list[int]) -> None:
    """Make the inputs one row of INT64 ids with `values` as tensor `name` (input_ids,
    attention_mask or token_type_ids; the others valid), raw or typed as before."""
    n = len(values)
    tensors = {"input_ids": [101] + [2000] * (n - 2) + [102] if n > 1 else [101], name: values}
    raw = bool(request.raw_input_contents)
    del request.inputs[:]
    request.ClearField("raw_input_contents")
    for tensor_name, data in tensors.items():
        tensor = request.inputs.add(name=tensor_name, datatype="INT64", shape=[1, n])
        if raw:
            request.raw_input_contents.append(np.array(data, dtype="<i8").tobytes())
        else:
            tensor.contents.int64_contents.extend(data)


@st.composite
def infer_payloads(draw: st.DrawFn) -> bytes:
    data = draw(infer_requests()).SerializeToString()
    extra = draw(st.sampled_from(["none", "none", "none", "none", "bad_utf8", "unknown", "corrupt"]))
    if extra == "bad_utf8":
        # model_name (1), model_version (2), id (3), or an input's name (5.1) / datatype (5.2).
        where = draw(st.sampled_from([1, 2, 3, 51, 52]))
        payload = draw(s.bad_utf8())
        data += s.ld(where, payload) if where < 10 else s.ld(5, s.ld(where - 50, payload))
    elif extra == "unknown":
        data += draw(s.unknown_fields())
    elif extra == "corrupt":
        data = draw(s.corrupt(data))
    return data


@examples(250)
@given(payload=infer_payloads())
def test_model_infer(fuzz_server: FuzzServer, payload: bytes) -> None:
    reply = fuzz_server.unary(INFERENCE + "ModelInfer", payload)
    fuzz_server.check(reply, payload)
    if reply.code == grpc.StatusCode.OK:
        check_infer_response(kpb.ModelInferResponse.FromString(reply.messages[0]),
                             kpb.ModelInferRequest.FromString(payload))


@examples(60)
@given(items=st.lists(st.one_of(infer_payloads(), s.garbage(256)), min_size=1, max_size=4),
       garbage=st.one_of(st.none(), s.garbage(256)), at=st.integers(0, 4))
def test_model_stream_infer(fuzz_server: FuzzServer, items: list[bytes], garbage: bytes | None, at: int) -> None:
    """A stream of requests with (maybe) an undecodable message in the middle: it is
    answered and ends, never hangs; every error_message is held to the reply rules."""
    items = list(items)
    if garbage is not None:
        items.insert(min(at, len(items)), garbage)
    reply = fuzz_server.bidi(INFERENCE + "ModelStreamInfer", items)
    errors = stream_errors(reply.messages)
    fuzz_server.check(reply, items, texts=errors)
    assert len(reply.messages) <= len(items), f"{len(reply.messages)} responses to {len(items)} requests"
    requests: list[kpb.ModelInferRequest] = []
    for item in items:
        try:
            requests.append(kpb.ModelInferRequest.FromString(item))
        except DecodeError:  # the garbage in the stream
            continue
    ids = [r.id for r in requests]
    by_id = {r.id: r for r in requests if ids.count(r.id) == 1}  # responses carry the request's id
    for message in reply.messages:
        response = kpb.ModelStreamInferResponse.FromString(message)
        if not response.error_message and response.infer_response.id in by_id:
            check_infer_response(response.infer_response, by_id[response.infer_response.id])


@st.composite
def name_version_requests(draw: st.DrawFn) -> bytes:
    """ModelMetadataRequest, ModelConfigRequest, ModelReadyRequest and
    ModelStatisticsRequest share the wire layout: name = 1, version = 2."""
    data = kpb.ModelMetadataRequest(
        name=draw(st.one_of(st.just(s.MODEL), s.names())),
        version=draw(st.one_of(st.sampled_from(["", "1"]), st.sampled_from(["2", "-1", "01", "1.0"]), s.names())),
    ).SerializeToString()
    extra = draw(st.sampled_from(["none", "bad_utf8", "unknown", "corrupt"]))
    if extra == "bad_utf8":
        data += s.ld(draw(st.sampled_from([1, 2])), draw(s.bad_utf8()))
    elif extra == "unknown":
        data += draw(s.unknown_fields())
    elif extra == "corrupt":
        data = draw(s.corrupt(data))
    return data


@examples(100)
@given(payload=name_version_requests())
def test_model_metadata(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.unary(INFERENCE + "ModelMetadata", payload), payload)


@examples(100)
@given(payload=name_version_requests())
def test_model_config(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.unary(INFERENCE + "ModelConfig", payload), payload)


@examples(100)
@given(payload=name_version_requests())
def test_model_ready(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.unary(INFERENCE + "ModelReady", payload), payload)


@examples(100)
@given(payload=name_version_requests())
def test_model_statistics(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.unary(INFERENCE + "ModelStatistics", payload), payload)


@st.composite
def repository_index_requests(draw: st.DrawFn) -> bytes:
    data = kpb.RepositoryIndexRequest(repository_name=draw(s.names()), ready=draw(st.booleans())).SerializeToString()
    extra = draw(st.sampled_from(["none", "bad_utf8", "unknown", "corrupt", "ready_varint"]))
    if extra == "bad_utf8":
        data += s.ld(1, draw(s.bad_utf8()))
    elif extra == "unknown":
        data += draw(s.unknown_fields())
    elif extra == "corrupt":
        data = draw(s.corrupt(data))
    elif extra == "ready_varint":
        data += s.tag(2, 0) + s.varint(draw(s.int64s()))  # a bool as any 64-bit varint
    return data


@examples(80)
@given(payload=repository_index_requests())
def test_repository_index(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.unary(INFERENCE + "RepositoryIndex", payload), payload)


def test_server_healthy_at_end(fuzz_server: FuzzServer) -> None:
    """After every example above: RSS under idle + 1 GiB, no traceback logged."""
    fuzz_server.assert_healthy_at_end()
