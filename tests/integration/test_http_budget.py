"""The HTTP port keeps the result budget honest: a reply holds its share until its
bytes are really sent (a client that stops reading holds it at most
http_write_timeout, then is cut off), a stream's client that leaves gives its
window back at once, and binary replies are sized as binary."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.helpers import ServerThread, wait_until

WORDS = "the cat sat on the mat while the dog slept by the door and the bird sang "


@pytest.fixture(scope="module")
def srv():
    with ServerThread(http_write_timeout=3.0, instances=1) as server:
        yield server


def _held(srv: ServerThread) -> int:
    assert srv.server is not None
    return srv.server.engine.budget.held


def _post(srv: ServerThread, path: str, body: bytes) -> socket.socket:
    port = int(srv.http_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_stream_whose_client_leaves_gives_its_window_back(srv):
    body = json.dumps({"sequences": [{"text": WORDS * 10}] * 6}).encode()
    sock = _post(srv, "/v1/analyze_stream", body)
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    wait_until(lambda: _held(srv) > 0, 60)
    _reset(sock)
    wait_until(lambda: _held(srv) == 0, 30)


def test_a_reply_holds_its_budget_until_sent_and_a_reader_that_stops_is_cut_off(srv):
    ids = [101] + [2000 + i % 500 for i in range(510)] + [102]
    request = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 512], "data": ids}],
               "outputs": [{"name": "attentions", "parameters": {"binary_data": True}}]}
    assert srv.server is not None
    done = srv.server.engine.stats(srv.server.engine.repository.get("minilm-l6")).success.count
    sock = _post(srv, "/v2/models/minilm-l6/infer", json.dumps(request).encode())
    model = srv.server.engine.repository.get("minilm-l6")
    wait_until(lambda: srv.server.engine.stats(model).success.count > done, 60)  # computed and being sent
    # 75 MB of attention cannot fit in the socket buffers: what is not sent is still counted.
    assert _held(srv) >= 6 * 12 * 512 * 512 * 4
    # The reader never reads: after http_write_timeout the server drops it and the budget comes back.
    wait_until(lambda: _held(srv) == 0, 30)
    sock.settimeout(30)
    received = 0
    while chunk := sock.recv(1 << 16):
        received += len(chunk)
    assert 0 < received < 6 * 12 * 512 * 512 * 4  # cut off, not the whole reply
    sock.close()


def test_full_attention_of_512_tokens_comes_as_binary_data(srv):
    client = httpclient.InferenceServerClient(srv.http_url.removeprefix("http://"), network_timeout=120)
    ids = np.array([[101] + [2000 + i % 500 for i in range(510)] + [102]], dtype=np.int64)
    tensor = httpclient.InferInput("input_ids", ids.shape, "INT64")
    tensor.set_data_from_numpy(ids)
    result = client.infer("minilm-l6", [tensor], outputs=[httpclient.InferRequestedOutput("attentions")])
    assert result.as_numpy("attentions").shape == (1, 6, 12, 512, 512)
    client.close()


def test_http_calls_count_for_the_idle_heap_trim(srv):
    assert srv.server is not None
    before = srv.server.completed
    client = httpclient.InferenceServerClient(srv.http_url.removeprefix("http://"))
    client.get_model_metadata("minilm-l6")
    client.close()
    wait_until(lambda: srv.server.completed > before, 10)
