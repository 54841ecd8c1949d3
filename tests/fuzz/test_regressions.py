"""What the fuzz suite found, as plain requests with the status they must get.

Each case is the shrunk example hypothesis reported when the suite ran against
the server before the fixes for issue 8 (commit f4ddc48); all failed there.
"""

from __future__ import annotations

import grpc

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_server._proto.inference import grpc_service_pb2 as kpb
from tests.fuzz.harness import ATTENTION, INFERENCE, MAX_DETAILS, FuzzServer, stream_errors


def test_undecodable_analyze_is_invalid_argument(fuzz_server: FuzzServer) -> None:
    """Was UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ..." and a logged traceback."""
    reply = fuzz_server.unary(ATTENTION + "Analyze", b"\xb1\xa0")
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, reply
    assert "DecodeError" not in reply.details and "<class" not in reply.details
    fuzz_server.assert_no_new_traceback(after="an undecodable Analyze")


def test_lone_surrogate_in_a_string_field_is_invalid_argument(fuzz_server: FuzzServer) -> None:
    """GetModelRequest.name = b"\\xed\\xa0\\x80" (U+D800 as UTF-8 bytes): was UNKNOWN with DecodeError."""
    reply = fuzz_server.unary(ATTENTION + "GetModel", b"\n\x03\xed\xa0\x80")
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, reply
    fuzz_server.assert_no_new_traceback(after="a GetModel with a lone surrogate")


def test_undecodable_message_ends_model_stream_infer(fuzz_server: FuzzServer) -> None:
    """A stream whose only message is b"\\x00": was still open at the client's deadline."""
    reply = fuzz_server.bidi(INFERENCE + "ModelStreamInfer", [b"\x00"])
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, reply
    assert reply.seconds < 5


def test_long_model_name_is_not_echoed_whole_by_model_config(fuzz_server: FuzzServer) -> None:
    """A 65,536-character name: was NOT_FOUND with a 65,576-character message."""
    reply = fuzz_server.unary(INFERENCE + "ModelConfig", kpb.ModelConfigRequest(name="x" * 65536).SerializeToString())
    assert reply.code == grpc.StatusCode.NOT_FOUND, reply
    assert len(reply.details) <= MAX_DETAILS


def test_long_model_name_in_a_stream_error_message_is_cut(fuzz_server: FuzzServer) -> None:
    """The same name in ModelStreamInfer: the error_message was 65,576 characters."""
    request = kpb.ModelInferRequest(model_name="x" * 65536).SerializeToString()
    reply = fuzz_server.bidi(INFERENCE + "ModelStreamInfer", [request])
    assert reply.code == grpc.StatusCode.OK, reply
    errors = stream_errors(reply.messages)
    assert len(errors) == 1 and 0 < len(errors[0]) <= MAX_DETAILS


def test_very_long_model_name_stays_not_found(fuzz_server: FuzzServer) -> None:
    """A 104,346-character name in Analyze: the echo overflowed the client's metadata limit,
    so the caller saw RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"."""
    request = pb.AnalyzeRequest(model="x" * 104346, sequences=[pb.Sequence(text="hi")]).SerializeToString()
    reply = fuzz_server.unary(ATTENTION + "Analyze", request)
    assert reply.code == grpc.StatusCode.NOT_FOUND, reply
    assert len(reply.details) <= MAX_DETAILS


def test_long_version_is_not_echoed_whole(fuzz_server: FuzzServer) -> None:
    """ModelStatistics for minilm-l6 at a 4,096-character version: was a 4,164-character NOT_FOUND."""
    request = kpb.ModelStatisticsRequest(name="minilm-l6", version="é" * 4096).SerializeToString()
    reply = fuzz_server.unary(INFERENCE + "ModelStatistics", request)
    assert reply.code == grpc.StatusCode.NOT_FOUND, reply
    assert len(reply.details) <= MAX_DETAILS


def test_server_healthy_at_end(fuzz_server: FuzzServer) -> None:
    fuzz_server.assert_healthy_at_end()
