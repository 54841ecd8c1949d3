"""Random and damaged bytes as the request message of every method of both
services, sent on a raw channel (no serializer). Whatever arrives, the caller
gets a plain status (INVALID_ARGUMENT for what does not parse) and the server
keeps serving."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_server._proto.inference import grpc_service_pb2 as kpb
from tests.fuzz import strategies as s
from tests.fuzz.harness import ATTENTION, INFERENCE, FuzzServer, examples

# A valid request of each method, for the damaged-valid strategy.
VALID = {
    "Analyze": pb.AnalyzeRequest(sequences=[pb.Sequence(text="hello world"), pb.Sequence(
        token_ids=pb.TokenIds(ids=[101, 7592, 102]))], options=pb.AnalyzeOptions(top_k=2, word_level=True)),
    "AnalyzeStream": pb.AnalyzeRequest(sequences=[pb.Sequence(text="a b"), pb.Sequence(text="c")]),
    "ListModels": pb.ListModelsRequest(),
    "GetModel": pb.GetModelRequest(name=s.MODEL),
    "ModelInfer": kpb.ModelInferRequest(model_name=s.MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1])], raw_input_contents=[s.bytes_elements([b"hello world"])]),
    "ModelMetadata": kpb.ModelMetadataRequest(name=s.MODEL),
    "ModelConfig": kpb.ModelConfigRequest(name=s.MODEL),
    "ModelReady": kpb.ModelReadyRequest(name=s.MODEL, version="1"),
    "ModelStatistics": kpb.ModelStatisticsRequest(name=s.MODEL),
    "RepositoryIndex": kpb.RepositoryIndexRequest(ready=True),
    "ServerLive": kpb.ServerLiveRequest(),
    "ServerReady": kpb.ServerReadyRequest(),
    "ServerMetadata": kpb.ServerMetadataRequest(),
}
SERVICE = {name: ATTENTION if name in ("Analyze", "AnalyzeStream", "ListModels", "GetModel") else INFERENCE
           for name in VALID}
# Per method in the ci profile; the inference calls cost more than a lookup.
EXAMPLES = 40


def payloads(method: str) -> st.SearchStrategy[bytes]:
    valid = VALID[method].SerializeToString()
    return st.one_of(s.garbage(), s.corrupt(valid), st.just(valid))


@pytest.mark.parametrize("method", [m for m in VALID if m != "AnalyzeStream"])
@examples(EXAMPLES)
@given(data=st.data())
def test_unary(fuzz_server: FuzzServer, method: str, data: st.DataObject) -> None:
    payload = data.draw(payloads(method), label="payload")
    fuzz_server.check(fuzz_server.unary(SERVICE[method] + method, payload), payload)


@examples(EXAMPLES)
@given(payload=payloads("AnalyzeStream"))
def test_analyze_stream(fuzz_server: FuzzServer, payload: bytes) -> None:
    fuzz_server.check(fuzz_server.server_stream(ATTENTION + "AnalyzeStream", payload), payload)


@examples(EXAMPLES)
@given(items=st.lists(st.one_of(payloads("ModelInfer"), st.just(VALID["ModelInfer"].SerializeToString())),
                      min_size=1, max_size=6))
def test_model_stream_infer(fuzz_server: FuzzServer, items: list[bytes]) -> None:
    """Garbage anywhere in a stream: the stream is answered and ends."""
    fuzz_server.check(fuzz_server.bidi(INFERENCE + "ModelStreamInfer", items), items)


def test_server_healthy_at_end(fuzz_server: FuzzServer) -> None:
    """After every example above: RSS under idle + 1 GiB, no traceback logged."""
    fuzz_server.assert_healthy_at_end()
