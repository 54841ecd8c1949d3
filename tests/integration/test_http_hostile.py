"""Hostile callers of the HTTP port (the REST audit's findings), each answered at
once with a status naming what is wrong while the event loop keeps answering
health probes:

- counts (sequences, a tensor's batch, a tensor's elements) refused from what
  the request declares, before any element is converted;
- compressed bodies of many gzip members refused after a few;
- request bodies that do not arrive in time (408) and replies sent before the
  body was read, which close the connection rather than read the rest;
- cross-origin requests from browsers (403), redirects built from the Host
  header, and the headers that keep browsers from sniffing or framing replies;
- one connection pipelining requests without reading the replies;
- plain messages for `null` bodies, invalid UTF-8 and the repository's limit.

Before the fixes: 8.8-56 s per count, 12.6 s for 2 MB of empty gzip members, a
stalled body held its connection for good, a cross-origin form unloaded the
model, and one pipelining socket grew the server by 1.5 GB."""

from __future__ import annotations

import gzip
import json
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import MODEL_DIR, ServerProcess, ServerThread, read_until_closed, wait_until

MODEL = MODEL_DIR.name
INFER = f"/v2/models/{MODEL}/infer"
# Generous bounds for answers that take milliseconds to a few hundred (parsing a 16 MiB body).
FAST = 3.0
BODY_TIMEOUT = 2.0
SMALL_ANALYZE = {"sequences": [{"text": "The cat sat."}],
                 "options": {"topK": 1, "attention": False, "hiddenStates": False}}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    with ServerThread(http_body_timeout=BODY_TIMEOUT, model_control_mode="explicit") as server:
        yield server


@pytest.fixture(scope="module")
def http(srv: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http_url, timeout=60) as client:
        yield client


def _port(srv: ServerThread) -> int:
    return int(srv.http_url.rsplit(":", 1)[1])


class _LoopProbe:
    """/v2/health/live on its own connection every 50 ms while a hostile request runs: the
    slowest answer is how long the event loop was held."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                ok = client.get("/v2/health/live").status_code == 200
                self.worst = max(self.worst, time.monotonic() - started if ok else float("inf"))
                self._stop.wait(0.05)

    def __enter__(self) -> _LoopProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def _timed(srv: ServerThread, call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float, float]:
    """The reply, the seconds it took and the longest health probe meanwhile."""
    with _LoopProbe(srv.http_url) as probe:
        started = time.monotonic()
        reply = call()
        elapsed = time.monotonic() - started
    return reply, elapsed, probe.worst


def _bytes_tensor(count: int) -> bytes:
    return b"\0\0\0\0" * count  # `count` empty strings, each a 4-byte length


# -- counts before conversion (finding A) -------------------------------------------------------

def _v2_json_texts(rows: int, data: int) -> tuple[bytes, dict[str, str]]:
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [rows, 1], "data": [""] * data}]}
    return json.dumps(doc, separators=(",", ":")).encode(), {}


def _v2_binary_texts(rows: int, data: int) -> tuple[bytes, dict[str, str]]:
    raw = _bytes_tensor(data)
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [rows, 1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"inference-header-content-length": str(len(header))}


COUNTS = [
    # Before: 8.75 s (3 M strings as JSON), 10.8 s (4 M as binary data), the loop held for seconds.
    ("v2 json batch", INFER, lambda: _v2_json_texts(3_000_000, 3_000_000),
     "input 'text': shape [3000000, 1]: a batch of 3000000 rows; this server takes 1 to 64"),
    ("v2 binary batch", INFER, lambda: _v2_binary_texts(4_000_000, 4_000_000),
     "input 'text': shape [4000000, 1]: a batch of 4000000 rows; this server takes 1 to 64"),
    # A small shape with millions of elements: refused once past the shape, none converted.
    ("v2 json elements", INFER, lambda: _v2_json_texts(1, 3_000_000), "inputs[0].data: has more than 1025"),
    ("v2 binary elements", INFER, lambda: _v2_binary_texts(1, 4_000_000),
     "input 'text': BYTES contents hold more than the shape's 1 elements"),
    ("v2 json ids", INFER, lambda: (json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2],
                                                           "data": [7] * 8_000_000}]}, separators=(",", ":")).encode(),
                                    {}), "inputs[0].data: has more than 1026"),
    # Before: 56 s for 5.5 M; json_format converted every sequence before the engine counted them.
    ("v1 sequences", "/v1/analyze", lambda: (b'{"sequences":[' + b",".join([b"{}"] * 5_500_000) + b"]}", {}),
     "sequences: 5500000 sequences exceed the limit of 64 per request"),
    ("v1 token ids", "/v1/analyze", lambda: (b'{"sequences":[{"tokenIds":{"ids":[' + b",".join([b"7"] * 8_000_000)
                                             + b"]}}]}", {}),
     "sequences[0].token_ids.ids: 8000000 token ids exceed the model's 512 positions"),
    ("v1 layers", "/v1/analyze", lambda: (b'{"sequences":[{"text":"a"}],"options":{"layers":['
                                          + b",".join([b"1"] * 4_000_000) + b"]}}", {}),
     "options.layers: lists 4000000 layers; model 'minilm-l6' has 6"),
]


@pytest.mark.parametrize(("path", "make", "error"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS])
def test_counts_are_refused_before_any_element_is_converted(srv, http, path, make, error):
    body, headers = make()
    assert len(body) <= srv.settings.max_request_bytes
    reply, elapsed, worst = _timed(srv, lambda: http.post(path, content=body, headers=headers))
    assert reply.status_code == 400 and reply.json()["error"].startswith(error), reply.text
    assert elapsed < FAST, elapsed
    assert worst < FAST, worst
    assert http.post("/v1/analyze", json=SMALL_ANALYZE).status_code == 200


# -- compressed bodies (findings B and D) ---------------------------------------------------------

def test_a_gzip_body_of_many_members_is_refused_after_a_few(srv, http):
    # Before: 100,000 empty members (2 MB) took 15 s of a worker thread (a copy of the rest a member).
    body = gzip.compress(b"") * 100_000
    reply, elapsed, worst = _timed(srv, lambda: http.post(INFER, content=body, headers={"content-encoding": "gzip"}))
    assert reply.status_code == 400 and "more than 4 members" in reply.json()["error"], reply.text
    assert elapsed < FAST and worst < FAST, (elapsed, worst)
    # A few members are still one body, as gzip defines it.
    doc = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["The cat sat."]}],
                      "outputs": [{"name": "sequence_length"}]}).encode()
    two = gzip.compress(doc[:20]) + gzip.compress(doc[20:])
    reply = http.post(INFER, content=two, headers={"content-encoding": "gzip"})
    assert reply.status_code == 200 and reply.json()["outputs"][0]["data"] == [6], reply.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_v1_takes_compressed_bodies_like_v2(http, encoding):
    # Before: 400 "'utf-8' codec can't decode byte 0x8b".
    plain = json.dumps(SMALL_ANALYZE).encode()
    body = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    reply = http.post("/v1/analyze", content=body, headers={"content-encoding": encoding})
    assert reply.status_code == 200, reply.text
    assert reply.json() == http.post("/v1/analyze", content=plain).json()


def test_a_compressed_v1_body_is_bounded_once_inflated(srv, http):
    bomb = gzip.compress(b" " * (srv.settings.max_request_bytes + 1))
    reply = http.post("/v1/analyze", content=bomb, headers={"content-encoding": "gzip"})
    assert reply.status_code == 413 and "once decompressed" in reply.json()["error"]


# -- bodies that do not arrive, replies before the body (finding C) -------------------------------

def _head(path: str, length: int, *headers: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n"
            + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


@pytest.mark.parametrize("path", ["/v1/analyze", INFER, "/v2/repository/index"])
def test_a_body_that_stops_coming_gets_408_and_the_connection_closes(srv, path):
    # Before: the connection stayed open as long as the client kept it (a few such held every slot).
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=BODY_TIMEOUT + 10) as sock:
        started = time.monotonic()
        sock.sendall(_head(path, 1000) + b'{"sequences": [')
        reply = read_until_closed(sock)
        elapsed = time.monotonic() - started
    head = reply.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 408") and "connection: close" in head, reply
    assert "http_body_timeout" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert BODY_TIMEOUT - 0.5 < elapsed < BODY_TIMEOUT + FAST, elapsed


def test_a_body_dripping_in_is_cut_off_at_the_timeout(srv):
    # Before: one byte a second held a connection for as long as the client liked (90 s seen).
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=BODY_TIMEOUT + 10) as sock:
        sock.sendall(_head(INFER, 10_000))
        started = time.monotonic()
        reply = b""
        try:
            while not reply and time.monotonic() - started < BODY_TIMEOUT + FAST:
                sock.sendall(b" ")
                sock.settimeout(0.2)
                try:
                    reply = sock.recv(65536)
                except TimeoutError:
                    continue
        except OSError:
            pass  # the server closed first
        sock.settimeout(10)
        reply += read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert elapsed < BODY_TIMEOUT + FAST, elapsed


def test_a_declared_body_over_the_limit_gets_413_and_the_connection_closes(srv, http):
    # Before: the connection stayed open and the server read (and dropped) the whole declared body.
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=30) as sock:
        sock.sendall(_head("/v1/analyze", 99_000_000_000))
        started = time.monotonic()
        reply = read_until_closed(sock)
        assert time.monotonic() - started < FAST + 5  # at most the lingering close
    head = reply.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 413") and "connection: close" in head, reply
    assert "max_request_bytes" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    # A client that sends its body anyway still reads the 413 (the server drops what comes, then closes).
    reply = http.post("/v1/analyze", content=b" " * (srv.settings.max_request_bytes + 1))
    assert reply.status_code == 413 and reply.headers["connection"] == "close"


def test_bodies_that_arrive_slowly_but_in_time_are_served(srv):
    body = json.dumps(SMALL_ANALYZE).encode()
    with socket.create_connection(("127.0.0.1", _port(srv)), timeout=30) as sock:
        sock.sendall(_head("/v1/analyze", len(body)))
        for i in range(0, len(body), len(body) // 4 + 1):
            sock.sendall(body[i:i + len(body) // 4 + 1])
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200"), reply


# -- browsers (finding E) ----------------------------------------------------------------------

def test_a_cross_origin_request_is_refused_and_changes_nothing(srv, http):
    # Before: a form on any web page (text/plain, no preflight) unloaded the model: 200.
    headers = {"origin": "http://evil.example", "content-type": "text/plain"}
    for path in (f"/v2/repository/models/{MODEL}/unload", "/v1/analyze"):
        reply = http.post(path, content=b"", headers=headers)
        assert reply.status_code == 403, reply.text
        assert "cross-origin" in reply.json()["error"] and "evil.example" in reply.json()["error"]
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200
    # `Origin: null` (a sandboxed frame, a file) is not this server's origin either.
    assert http.post("/v1/analyze", json=SMALL_ANALYZE, headers={"origin": "null"}).status_code == 403


def test_same_origin_and_non_browser_requests_are_served(srv, http):
    # The explorer page's own calls, with the port or with default-port spelling differences.
    assert http.post("/v1/analyze", json=SMALL_ANALYZE, headers={"origin": srv.http_url}).status_code == 200
    assert http.post("/v1/analyze", json=SMALL_ANALYZE,
                     headers={"origin": "http://example.test", "host": "example.test:80"}).status_code == 200
    # curl -d '{...}': no Origin, a form content type (the docs rely on it).
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert http.post("/v1/analyze", content=json.dumps(SMALL_ANALYZE), headers=form).status_code == 200


def test_a_trailing_slash_is_404_not_a_redirect_built_from_host(http):
    # Before: 307 with Location: http://evil.example/v2.
    reply = http.get("/v2/", headers={"host": "evil.example"})
    assert reply.status_code == 404 and "location" not in reply.headers
    assert http.get("/v1/models/").status_code == 200  # the default model: a route of its own


def test_replies_carry_nosniff_and_the_explorer_page_cannot_be_framed(http):
    for reply in (http.get("/v2"), http.get("/nowhere"), http.post("/v1/analyze", content=b"{")):
        assert reply.headers["x-content-type-options"] == "nosniff", reply.url
    page = http.get("/explore")
    assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy


# -- plain messages (finding G) -----------------------------------------------------------------

@pytest.mark.parametrize("path", [INFER, "/v2/repository/index", f"/v2/repository/models/{MODEL}/load",
                                  f"/v2/repository/models/{MODEL}/unload"])
def test_a_null_body_is_a_plain_400(http, path):
    reply = http.post(path, content=b"null")
    assert reply.status_code == 400 and reply.json()["error"] == "body: must be a JSON object, got None"


@pytest.mark.parametrize("path", [INFER, "/v2/repository/index"])
def test_invalid_utf8_json_says_so(http, path):
    reply = http.post(path, content=b'{"inputs": "\xed\xa0\x80"}')
    assert reply.status_code == 400
    assert reply.json()["error"] == "body: is not valid JSON (it is not UTF-8: byte 0xed at position 12)"


def test_the_repository_limit_is_named_for_what_it_is(http):
    reply = http.post("/v2/repository/index", content=b" " * 70_000)
    assert reply.status_code == 413
    assert reply.json()["error"] == ("request body of 70000 bytes is over the 65536 byte limit (fixed for the "
                                     "repository routes)")


def test_the_server_still_serves_after_all_that(srv, http):
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.post("/v1/analyze", json=SMALL_ANALYZE).status_code == 200
    wait_until(lambda: srv.server.http_calls.active == 0, FAST)


# -- pipelining (finding F) ---------------------------------------------------------------------

def _rss_mib(pid: int) -> float:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match
    return int(match.group(1)) / 1024


def test_one_connection_pipelining_without_reading_holds_a_bounded_queue():
    # Before: 378,000 `GET /v1/models` in 20 s on one socket that read nothing grew the server by 613 MiB
    # (841,000: +1.5 GB), every request parsed and queued. Now the server stops reading the socket.
    request = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"
    with ServerProcess() as proc:
        assert proc.proc is not None and proc.http_port is not None
        with socket.create_connection(("127.0.0.1", proc.http_port), timeout=30) as sock:
            base = _rss_mib(proc.proc.pid)
            sock.settimeout(1.0)
            sent, started = 0, time.monotonic()
            batch = request * 1000
            while sent < 400_000 and time.monotonic() - started < 20:
                try:
                    sock.sendall(batch)
                except TimeoutError:
                    break  # the server has stopped reading: the kernel's buffers are full
                sent += 1000
            growth = _rss_mib(proc.proc.pid) - base
            assert sent < 400_000, "the server read every request sent without the replies being read"
            assert growth < 64, growth
            # The replies come, in order, once the client reads them.
            sock.settimeout(30)
            replies = b""
            while replies.count(b"HTTP/1.1 200 OK") < 50:
                chunk = sock.recv(1 << 16)
                assert chunk
                replies += chunk
            assert replies.startswith(b"HTTP/1.1 200 OK")
        assert httpx.get(f"http://127.0.0.1:{proc.http_port}/v2/health/ready", timeout=30).status_code == 200
