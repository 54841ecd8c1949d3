"""Hostile REST inference bodies: each is answered at once with the right status
and `{"error": ...}` naming what is wrong (the JSON path of the value), and the
server goes on serving. Bodies over the size limit are refused before they are
read to the end, whether their length is declared or they come chunked."""

import gzip
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.helpers import ServerThread, wait_until

MiB = 1 << 20
MODEL = "minilm-l6"
INFER = f"/v2/models/{MODEL}/infer"
# Generous: these answers take milliseconds; a slow one means work the body should never cause.
FAST = 5.0


@pytest.fixture(scope="module")
def srv():
    with ServerThread(max_request_bytes=MiB) as server:
        yield server


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.http_url, timeout=30) as client:
        yield client


def _ids(**tensor) -> dict:
    return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 102], **tensor}]}


def _post(http, body: bytes | dict | list, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    started = time.monotonic()
    reply = http.post(INFER, content=content, headers=headers or {})
    assert time.monotonic() - started < FAST
    return reply


def _nested(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth


# name, body, the start of the error (its field path first)
WRONG_TYPES = [
    ("body a list", [], "body: must be a JSON object"),
    ("body a string", "inputs", "body: must be a JSON object"),
    ("inputs missing", {}, "inputs: must be a list"),
    ("inputs an object", {"inputs": {}}, "inputs: must be a list"),
    ("inputs empty", {"inputs": []}, "inputs: has 0 tensors"),
    ("inputs too many", {"inputs": [_ids()["inputs"][0]] * 17}, "inputs: has 17 tensors"),
    ("input a string", {"inputs": ["input_ids"]}, "inputs[0]: must be an object"),
    ("name a number", _ids(name=5), "inputs[0].name: must be a string"),
    ("name empty", _ids(name=""), "inputs[0].name: must have 1 to"),
    ("name huge", _ids(name="x" * 10_000), "inputs[0].name: must have 1 to 256"),
    ("datatype null", _ids(datatype=None), "inputs[0].datatype: must be a string"),
    ("shape a string", _ids(shape="1,2"), "inputs[0].shape: must be a list"),
    ("shape item a string", _ids(shape=[1, "2"]), "inputs[0].shape[1]: must be a non-negative integer"),
    ("shape item a bool", _ids(shape=[1, True]), "inputs[0].shape[1]: must be a non-negative integer"),
    ("shape item a float", _ids(shape=[1, 2.0]), "inputs[0].shape[1]: must be a non-negative integer"),
    ("shape negative", _ids(shape=[1, -2]), "inputs[0].shape[1]: must be a non-negative integer"),
    ("shape beyond int64", _ids(shape=[2**63, 1]), "inputs[0].shape[0]: must be a non-negative integer"),
    ("shape 9 dims", _ids(shape=[1] * 9), "inputs[0].shape: has 9 dimensions; at most 8"),
    ("data a string", _ids(data="101,102"), "inputs[0].data: must be a list"),
    ("data mixed", _ids(data=[101, "102"]), "inputs[0].data: must hold INT64 values"),
    ("data null", _ids(data=[101, None]), "inputs[0].data: must hold INT64 values"),
    ("data floats", _ids(data=[101.5, 102]), "inputs[0].data: must hold INT64 values"),
    ("data bools", _ids(data=[True, False]), "inputs[0].data: must hold INT64 values"),
    ("data ragged", _ids(data=[[101], [102, 103]]), "inputs[0].data: must be a (nested) list"),
    ("data out of range", _ids(shape=[1, 1], data=[2**63]), "inputs[0].data: has values outside the INT64 range"),
    ("data too few", _ids(shape=[1, 3]), "inputs[0].data: has 2 elements; shape [1, 3] needs 3"),
    ("data too many", _ids(shape=[1, 1]), "inputs[0].data: has 2 elements; shape [1, 1] needs 1"),
    # A shape is checked against the limits before its data is looked at.
    ("data huge shape", _ids(shape=[2**40, 2**40]), "input 'input_ids': shape [1099511627776, 1099511627776]: a "
                                                    "batch of 1099511627776 rows; this server takes 1 to 64"),
    ("bytes not strings", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 5]}]},
     "inputs[0].data: BYTES data must be strings"),
    ("bytes too many", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a", "b"]}]},
     "inputs[0].data: has more elements than its shape's 1"),
    ("bytes too few", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]},
     "inputs[0].data: has 1 elements; shape [2] needs 2"),
    ("bytes huge shape", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2**40], "data": ["a"]}]},
     "input 'text': shape [1099511627776]: a batch of 1099511627776 rows; this server takes 1 to 64"),
    ("unknown datatype", _ids(datatype="FP99"), "inputs[0].data: unknown datatype 'FP99'"),
    ("wrong datatype", _ids(datatype="FP32", data=[1.0, 2.0]), "input 'input_ids': datatype 'FP32' is not accepted"),
    ("no data", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2]}]},
     "inputs[0]: has neither data nor parameters.binary_data_size"),
    ("data and binary", _ids(parameters={"binary_data_size": 0}), "inputs[0]: has both data and"),
    ("input parameters a list", _ids(parameters=[]), "inputs[0].parameters: must be an object"),
    ("binary size a string", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2],
                                          "parameters": {"binary_data_size": "16"}}]},
     "inputs[0].parameters.binary_data_size: must be an integer"),
    ("shared memory", _ids(parameters={"shared_memory_region": "r"}),
     "inputs[0].parameters.shared_memory_region: shared memory is not offered"),
    ("parameters a number", {**_ids(), "parameters": 5}, "parameters: must be an object"),
    ("parameter an object", {**_ids(), "parameters": {"top_k": {"k": 1}}}, "parameters.top_k: must be a boolean"),
    ("parameter a list", {**_ids(), "parameters": {"layers": [0, 1]}}, "parameters.layers: must be a boolean"),
    ("too many parameters", {**_ids(), "parameters": {f"p{i}": i for i in range(65)}},
     "parameters: has 65 entries; at most 64"),
    ("binary output flag a string", {**_ids(), "parameters": {"binary_data_output": "yes"}},
     "parameters.binary_data_output: must be true or false"),
    ("timeout a float", {**_ids(), "parameters": {"timeout": 0.5}}, "parameter 'timeout': must be a non-negative"),
    ("id a number", {**_ids(), "id": 5}, "id: must be a string"),
    ("outputs an object", {**_ids(), "outputs": {"name": "tokens"}}, "outputs: must be a list"),
    ("output a string", {**_ids(), "outputs": ["tokens"]}, "outputs[0]: must be an object"),
    ("output name a number", {**_ids(), "outputs": [{"name": 1}]}, "outputs[0].name: must be a string"),
    ("output twice", {**_ids(), "outputs": [{"name": "tokens"}, {"name": "tokens"}]},
     "outputs[1].name: output 'tokens' is asked for twice"),
    ("too many outputs", {**_ids(), "outputs": [{"name": f"o{i}"} for i in range(17)]},
     "outputs: has 17 entries; at most 16"),
    ("output flag a number", {**_ids(), "outputs": [{"name": "tokens", "parameters": {"binary_data": 1}}]},
     "outputs[0].parameters.binary_data: must be true or false"),
    ("classification", {**_ids(), "outputs": [{"name": "tokens", "parameters": {"classification": 3}}]},
     "outputs[0].parameters.classification: the classification extension is not offered"),
    ("unknown output", {**_ids(), "outputs": [{"name": "logits"}]}, "output 'logits': unknown output"),
]


@pytest.mark.parametrize(("body", "error"), [c[1:] for c in WRONG_TYPES], ids=[c[0] for c in WRONG_TYPES])
def test_json_of_the_wrong_type_names_the_field(http, body, error):
    reply = _post(http, body)
    assert reply.status_code == 400 and list(reply.json()) == ["error"]
    assert reply.json()["error"].startswith(error), reply.json()["error"]


INVALID_JSON = [b"", b"{", b"[1, 2", b"nul", b"\xff\xfe{}", b'{"inputs": [}', b"{'inputs': []}",
                _nested(1100, "1").encode(), b"{} trailing"]


@pytest.mark.parametrize("body", INVALID_JSON, ids=range(len(INVALID_JSON)))
def test_invalid_json_is_400(http, body):
    reply = _post(http, body)
    assert reply.status_code == 400 and reply.json()["error"].startswith("body: is not valid JSON")


@pytest.mark.parametrize("datatype", ["BYTES", "INT64"])
def test_deeply_nested_data_is_refused_without_recursion(http, datatype):
    leaf = '"a"' if datatype == "BYTES" else "1"
    doc = f'{{"inputs": [{{"name": "text", "datatype": "{datatype}", "shape": [1], "data": {_nested(1000, leaf)}}}]}}'
    reply = _post(http, doc.encode())
    assert reply.status_code == 400 and reply.json()["error"].startswith("inputs[0].data: "), reply.text


# -- binary tensor data ----------------------------------------------------------------------

def _binary(header: dict, data: bytes, length: int | str | None = None) -> tuple[bytes, dict]:
    raw = json.dumps(header).encode()
    return raw + data, {"inference-header-content-length": str(len(raw) if length is None else length)}


def _binary_ids(size: int, shape=(1, 2), **tensor) -> dict:
    return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(shape),
                        "parameters": {"binary_data_size": size}, **tensor}]}


IDS_RAW = np.array([101, 102], "<i8").tobytes()
BINARY = [
    ("header beyond the body", _binary(_binary_ids(16), IDS_RAW, 10_000), "Inference-Header-Content-Length: must be"),
    ("header negative", _binary(_binary_ids(16), IDS_RAW, -1), "Inference-Header-Content-Length: must be"),
    ("header not a number", _binary(_binary_ids(16), IDS_RAW, "1e3"), "Inference-Header-Content-Length: must be"),
    ("header cuts the JSON", _binary(_binary_ids(16), IDS_RAW, 10), "body: is not valid JSON"),
    ("size beyond the body", _binary(_binary_ids(17), IDS_RAW),
     "inputs[0].parameters.binary_data_size: must be an integer within the 16 binary bytes left, got 17"),
    ("size negative", _binary(_binary_ids(-1), IDS_RAW), "inputs[0].parameters.binary_data_size: must be"),
    ("bytes left over", _binary(_binary_ids(16), IDS_RAW + b"\0" * 5),
     "body: 5 binary bytes after the inputs' binary_data_size total"),
    ("size against shape", _binary(_binary_ids(16, (1, 3)), IDS_RAW),
     "input 'input_ids': shape [1, 3] of INT64 needs 24 bytes, got 16"),
    ("huge shape", _binary(_binary_ids(16, (2**40, 2**40)), IDS_RAW), "input 'input_ids': shape [1099511627776, "),
    ("unknown datatype", _binary(_binary_ids(16, datatype="FP99"), IDS_RAW), "input 'input_ids': unknown datatype"),
    ("bytes prefix past the end", _binary({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                                       "parameters": {"binary_data_size": 6}}]},
                                          b"\xff\xff\xff\x7fab"), "input 'text': BYTES element of"),
    ("binary without a header length", (json.dumps(_binary_ids(16)).encode() + IDS_RAW, {}),
     "body: is not valid JSON"),
]


@pytest.mark.parametrize(("request_", "error"), [c[1:] for c in BINARY], ids=[c[0] for c in BINARY])
def test_binary_tensor_data_that_does_not_add_up(http, request_, error):
    body, headers = request_
    reply = _post(http, body, headers)
    assert reply.status_code == 400 and reply.json()["error"].startswith(error), reply.json()["error"]


# -- size limits -------------------------------------------------------------------------

def _raw_call(srv, head: bytes, body_parts: list[bytes]) -> tuple[int, bytes, float]:
    """Send the request line and headers, then the body parts on another thread (the server
    may answer, and stop reading, before they are all sent); the status and body of the reply."""
    sock = socket.create_connection(("127.0.0.1", srv.server.http_port), timeout=FAST)
    started = time.monotonic()
    sock.sendall(head)

    def send() -> None:
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and closed, or stopped reading: expected

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    reply = b""
    try:
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed without a reply: {reply!r}"
            reply += chunk
        head_end = reply.index(b"\r\n\r\n") + 4
        headers = reply[:head_end].decode("latin-1").lower()
        length = int(headers.split("content-length:")[1].split("\r\n")[0])
        while len(reply) < head_end + length:
            reply += sock.recv(65536)
        elapsed = time.monotonic() - started
        return int(reply.split(b" ")[1]), reply[head_end:head_end + length], elapsed
    finally:
        sock.close()
        sender.join(FAST)


def _head(path: str, *headers: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


def test_a_declared_length_over_the_limit_is_refused_before_the_body(srv, http):
    status, body, elapsed = _raw_call(srv, _head(INFER, "Content-Length: 100000000"), [b'{"inputs": ['])
    assert status == 413 and "100000000 bytes is over the 1048576 byte limit" in json.loads(body)["error"]
    assert elapsed < FAST
    status, body, _ = _raw_call(srv, _head("/v2/models/no-such-model/infer", "Content-Length: 100000000"), [b"{"])
    assert status == 404  # an unknown model is answered before the body is read at all


def test_a_chunked_body_over_the_limit_is_refused_once_it_passes_it(srv):
    chunk = b"[1," * 21845  # 64 KiB
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 40  # 2.5 MiB, never terminated
    status, body, elapsed = _raw_call(srv, _head(INFER, "Transfer-Encoding: chunked"), parts)
    assert status == 413 and "more than 1048576 bytes" in json.loads(body)["error"]
    assert elapsed < FAST


def test_a_compressed_body_is_bounded_once_inflated(http):
    bomb = gzip.compress(b" " * (8 * MiB))  # 8 KiB on the wire
    assert len(bomb) < 64 << 10
    reply = _post(http, bomb, {"content-encoding": "gzip"})
    assert reply.status_code == 413 and "once decompressed" in reply.json()["error"]


def test_a_body_just_over_the_limit_over_httpx(http):
    reply = _post(http, b" " * (MiB + 1))
    assert reply.status_code == 413 and "max_request_bytes" in reply.json()["error"]


def test_the_server_still_serves_after_all_that(http, srv):
    assert http.get("/v2/health/ready").json() == {"ready": True}
    reply = http.post(INFER, json={**_ids(), "outputs": [{"name": "sequence_length"}]})
    assert reply.status_code == 200 and reply.json()["outputs"][0]["data"] == [2]
    # Nothing is left in flight by the refused calls (the drain would wait for it).
    wait_until(lambda: srv.server.http_calls.active == 0, FAST)
