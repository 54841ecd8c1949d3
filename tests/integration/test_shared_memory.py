"""Triton's system shared-memory extension against a real server: tritonclient
programs (triton/shm_client.py, in their own processes, with
tritonclient.utils.shared_memory and tritonclient.grpc or tritonclient.http
unchanged) register regions, read inputs from and get outputs written into them,
byte for byte what the wire returns; each hostile use gets its status and a
message naming the field and the limit; unregistering while calls use a region
is safe; the feature is off by default and needs the admin role with tokens; the
server closes every region at shutdown."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.docs_examples import Example, compare, read_blocks, run
from tests.helpers import ROOT, ServerThread

PROGRAM = Path(__file__).parent / "triton" / "shm_client.py"
MAX_REGIONS = 5
STATUS = {
    "grpc": {"invalid": "StatusCode.INVALID_ARGUMENT", "not_found": "StatusCode.NOT_FOUND",
             "exists": "StatusCode.ALREADY_EXISTS", "exhausted": "StatusCode.RESOURCE_EXHAUSTED",
             "precondition": "StatusCode.FAILED_PRECONDITION"},
    "http": {"invalid": "400", "not_found": "404", "exists": "409", "exhausted": "429", "precondition": "400"},
}
PROTOCOLS = ("grpc", "http")


def _run(url: str, protocol: str, scenario: str, prefix: str) -> dict:
    done = subprocess.run([sys.executable, str(PROGRAM), "--url", url, "--protocol", protocol, "--scenario",
                           scenario, "--prefix", prefix], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def srv():
    with ServerThread(shared_memory=True, max_shared_memory_regions=MAX_REGIONS) as server:
        yield server


def _url(srv: ServerThread, protocol: str) -> str:
    return srv.target if protocol == "grpc" else srv.http_url.removeprefix("http://")


def _scenario(srv: ServerThread, protocol: str, scenario: str) -> dict:
    result = _run(_url(srv, protocol), protocol, scenario, f"shmtest_{os.getpid()}_{protocol}_{scenario}")
    assert srv.server is not None
    srv.server.shared_memory.unregister()  # a scenario that failed half-way leaves nothing for the next
    return result


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tritonclient_reads_and_writes_through_shared_memory(srv, protocol):
    r = _scenario(srv, protocol, "roundtrip")
    assert "system_shared_memory" in r["extensions"]
    assert set(r["status"]) == {"in", "out"} and r["status"]["in"]["offset"] == 0
    assert r["status"]["in"]["byte_size"] == 64 + 2 * 2 * 8 * 8
    for name, out in r["outputs"].items():
        # The region holds exactly what the wire returns, raw little-endian, row-major (BYTES: Triton's encoding).
        assert out["equal"] and out["raw_is_little_endian_row_major"], name
        assert out["parameters"]["shared_memory_region"] == "out" and "data" not in out
    assert r["outputs"]["attentions"]["shape"] == [2, 6, 12, 8, 8]
    assert r["outputs"]["attentions"]["parameters"] == {"shared_memory_region": "out",
                                                        "shared_memory_byte_size": 2 * 6 * 12 * 8 * 8 * 4,
                                                        "shared_memory_offset": 128}
    assert r["pairs_equal"] == {"pair_from_index": True, "pair_strength": True}
    if protocol == "grpc":  # one empty raw entry per output, as Triton sends
        assert r["raw_output_contents"] == [0, 0, 0, 0]
        assert r["stream_equal"]  # ModelStreamInfer writes into regions too
    assert r["text"]["tokens"][0][:4] == ["[CLS]", "the", "cat", "sat"] and r["text"]["sequence_length"] == [9, 6]
    assert r["status_after_unregister"] == ["in", "out"] and r["status_after_unregister_all"] == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hostile_uses_get_their_status_and_a_message_naming_the_field(srv, protocol):
    r = _scenario(srv, protocol, "hostile")
    s = STATUS[protocol]
    expected = {
        "register twice": (s["exists"], "shared memory region 'in' is already registered"),
        "key traversal": (s["invalid"], "key: '/../../etc/passwd' is not a POSIX shared-memory name"),
        "key with a slash": (s["invalid"], "key: 'a/b' is not a POSIX shared-memory name"),
        "key dot-dot": (s["invalid"], "key: '..' is not a POSIX shared-memory name"),
        "key missing": (s["invalid"], "key: no shared-memory object"),
        "region past the object": (s["invalid"], "byte_size: offset 0 + byte_size 1048576 runs past the end of "
                                                 "shared-memory object"),
        "offset past the object": (s["invalid"], "byte_size: offset 1048576 + byte_size 16 runs past the end"),
        "byte size zero": (s["invalid"], "byte_size: 0 bytes; a region has 1 byte to 1024 MiB "
                                         "(max_shared_memory_region_mib)"),
        "status unknown": (s["not_found"], "no shared memory region 'nope' is registered"),
        "unregister unknown": (None, None),  # as Triton: nothing to do
        "infer unknown region": (s["invalid"], "input 'input_ids': parameter 'shared_memory_region': no region "
                                               "'nope' is registered"),
        "infer offset+size beyond region": (s["invalid"], "input 'attention_mask': parameters "
                                                          "'shared_memory_offset' 136 + 'shared_memory_byte_size' "
                                                          "128 run past the end of region 'in' (256 bytes)"),
        "infer byte size not the tensor's": (s["invalid"], "input 'input_ids': parameter 'shared_memory_byte_size' "
                                                           "120 does not match shape [2, 8] of INT64 (128 bytes)"),
        "output region smaller than the output": (s["invalid"], "output 'attentions': parameter "
                                                                "'shared_memory_byte_size' 1024 is smaller than the "
                                                                "output's 36864 bytes (FP32 [2, 6, 12, 8, 8])"),
        "output byte size smaller than the output": (s["invalid"], "output 'attentions': parameter "
                                                                   "'shared_memory_byte_size' 36860 is smaller"),
        "bytes output larger than its byte size": (s["invalid"], "output 'tokens': parameter "
                                                                 "'shared_memory_byte_size' 8 is smaller than the "
                                                                 "output's 115 bytes"),
        "output offset+size beyond region": (s["invalid"], "output 'sequence_length': parameters "
                                                           "'shared_memory_offset' 1020 + 'shared_memory_byte_size' "
                                                           "16 run past the end of region 'small' (1024 bytes)"),
    }
    for case, (status, message) in expected.items():
        got = r[case]
        assert got["status"] == status, (case, got)
        assert message is None or got["message"].startswith(message), (case, got)
    assert r["still serves"] == [6, 4]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_too_many_regions_are_refused(srv, protocol):
    r = _scenario(srv, protocol, "limits")
    assert [x["status"] for x in r["registers"]] == [None] * MAX_REGIONS + [STATUS[protocol]["exhausted"]] * 3
    assert r["registers"][-1]["message"] == (f"{MAX_REGIONS} shared memory regions are registered, the limit "
                                             "(max_shared_memory_regions); unregister one first")
    assert r["status"] == [f"r{i}" for i in range(MAX_REGIONS)]


def test_the_total_size_is_bounded(tmp_path):
    key = f"shmtest_{os.getpid()}_total"
    path = Path("/dev/shm") / key
    path.write_bytes(b"\0" * (2 << 20))
    try:
        with ServerThread(shared_memory=True, max_shared_memory_region_mib=1, max_shared_memory_total_mib=1) as srv:
            assert srv.server is not None
            registry = srv.server.shared_memory
            with grpc.insecure_channel(srv.target) as channel:
                stub = kpb_grpc.GRPCInferenceServiceStub(channel)
                register = kpb.SystemSharedMemoryRegisterRequest
                with pytest.raises(grpc.RpcError) as too_big:
                    stub.SystemSharedMemoryRegister(register(name="a", key=key, byte_size=(1 << 20) + 1))
                assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert too_big.value.details() == ("byte_size: 1048577 bytes; a region has 1 byte to 1 MiB "
                                                   "(max_shared_memory_region_mib)")
                stub.SystemSharedMemoryRegister(register(name="a", key=key, byte_size=1 << 19))
                with pytest.raises(grpc.RpcError) as over:
                    stub.SystemSharedMemoryRegister(register(name="b", key=key, offset=1 << 19,
                                                             byte_size=(1 << 19) + 1))
                assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "over the 1 MiB limit (max_shared_memory_total_mib)" in over.value.details()
                assert [r.name for r in registry.status()] == ["a"]
    finally:
        path.unlink()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unregistering_while_calls_use_a_region_is_safe(srv, protocol):
    r = _scenario(srv, protocol, "unregister")
    # Each call either used the region (it was held to its end) or found it gone; nothing else.
    assert set(r["seen"]) <= {"ok", f"{STATUS[protocol]['invalid']}: output 'attentions': parameter "
                                    "'shared_memory_region': no re",
                              f"{STATUS[protocol]['invalid']}: input 'input_ids': parameter "
                              "'shared_memory_region': no regi",
                              f"{STATUS[protocol]['invalid']}: input 'attention_mask': parameter "
                              "'shared_memory_region': no "}, r["seen"]
    assert r["seen"].get("ok", 0) > 0 and r["wrong"] == []
    assert srv.server is not None and srv.server.shared_memory.status() == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_object_truncated_under_its_region_fails_the_call_not_the_server(srv, protocol):
    r = _scenario(srv, protocol, "truncated")
    assert r["infer"]["status"] == STATUS[protocol]["precondition"]
    assert "its object" in r["infer"]["message"] and "is shorter than the region now" in r["infer"]["message"]
    assert r["still serves"] == [6, 4]


def _fds_to(key: str) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if key in target:
            out.append(target)
    return out


def test_regions_are_closed_at_shutdown():
    prefix = f"shmtest_{os.getpid()}_leave"
    with ServerThread(shared_memory=True) as srv:
        r = _run(srv.target, "grpc", "leave", prefix)  # exits without unregistering
        assert r["status"] == ["left"]
        assert _fds_to(prefix), "the server holds the region's object open"
    assert _fds_to(prefix) == []


def test_off_by_default(server):
    """The shared server of the suite runs with the defaults."""
    with grpc.insecure_channel(server.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert "system_shared_memory" not in stub.ServerMetadata(kpb.ServerMetadataRequest()).extensions
        for call, request in ((stub.SystemSharedMemoryRegister, kpb.SystemSharedMemoryRegisterRequest(
                                  name="a", key="/a", byte_size=16)),
                              (stub.SystemSharedMemoryStatus, kpb.SystemSharedMemoryStatusRequest()),
                              (stub.SystemSharedMemoryUnregister, kpb.SystemSharedMemoryUnregisterRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                call(request)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details().startswith("shared memory is off on this server; start it with "
                                                      "--shared-memory")
        infer = kpb.ModelInferRequest(model_name="minilm-l6")
        tensor = infer.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2])
        tensor.parameters["shared_memory_region"].string_param = "a"
        tensor.parameters["shared_memory_byte_size"].int64_param = 16
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = httpx.post(f"{server.http_url}/v2/systemsharedmemory/region/a/register",
                       json={"key": "/a", "byte_size": 16})
    assert reply.status_code == 400 and reply.json()["error"].startswith("shared memory is off on this server")


INFER_TOKEN, ADMIN_TOKEN = "infer-token-shm", "admin-token-shm"


def test_with_tokens_registering_needs_the_admin_role(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{role}:{hashlib.sha256(t.encode()).hexdigest()}\n"
                              for role, t in (("infer", INFER_TOKEN), ("admin", ADMIN_TOKEN))))
    with ServerThread(shared_memory=True, auth_tokens_file=tokens) as srv, \
            grpc.insecure_channel(srv.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(),
                                          metadata=[("authorization", f"Bearer {INFER_TOKEN}")])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.details() == "SystemSharedMemoryStatus needs the admin role; this token has infer"
        admin = stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(),
                                              metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")])
        assert list(admin.regions) == []
        url = f"{srv.http_url}/v2/systemsharedmemory/region/a/register"
        reply = httpx.post(url, json={"key": "/a", "byte_size": 16},
                           headers={"authorization": f"Bearer {INFER_TOKEN}"})
        assert reply.status_code == 403 and "needs the admin role" in reply.json()["error"]
        reply = httpx.get(f"{srv.http_url}/v2/systemsharedmemory/status",
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert reply.status_code == 200 and reply.json() == []


def test_the_docs_example_runs(srv, tmp_path):
    """docs/open-inference-protocol.md's shared-memory program, against a server started with
    --shared-memory (the docs suite's server runs with the defaults, so the block is skipped there)."""
    doc = ROOT / "docs" / "open-inference-protocol.md"
    blocks = read_blocks(doc)
    index = next(i for i, b in enumerate(blocks) if b.lang == "python" and b.skipped and "shared_memory" in b.text)
    program, shown = blocks[index], blocks[index + 1]
    assert shown.lang == "output"
    example = Example(doc, program.line, "python", program.text, shown.text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTENTION_")}
    actual = run(example, target=srv.target, metrics="-", cwd=tmp_path, env=env, python=sys.executable,
                 http=_url(srv, "http"))
    problems = compare(example.expected, actual)
    assert not problems, "\n".join(problems) + "\n--- real output ---\n" + actual


def test_rest_bodies_naming_a_region_and_sending_data_are_refused(srv):
    tensor = {"name": "input_ids", "datatype": "INT64", "shape": [1, 2],
              "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 16}}
    url = f"{srv.http_url}/v2/models/minilm-l6/infer"
    reply = httpx.post(url, json={"inputs": [{**tensor, "data": [101, 102]}]})
    assert reply.status_code == 400
    assert reply.json()["error"] == "inputs[0]: has parameters.shared_memory_region and also data; send one"
    reply = httpx.post(url, json={"inputs": [tensor]})  # no such region: named, after the shapes were checked
    assert reply.status_code == 400
    assert reply.json()["error"] == ("input 'input_ids': parameter 'shared_memory_region': no region 'r' is "
                                     "registered")
    register = f"{srv.http_url}/v2/systemsharedmemory/region/r/register"
    for body, error in (({"key": "/a"}, "byte_size: is required"),
                        ({"key": "/a", "byte_size": True}, "byte_size: must be a non-negative integer"),
                        ({"key": "/a", "byte_size": 16, "offset": -1}, "offset: must be a non-negative integer"),
                        ({"key": "/a", "byte_size": 16, "mode": "rw"}, "mode: is not supported")):
        reply = httpx.post(register, json=body)
        assert reply.status_code == 400 and reply.json()["error"].startswith(error), (body, reply.json())
