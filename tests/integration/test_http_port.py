"""The HTTP port in production: the same process, engine, TLS files and tokens as
the gRPC port. Real clients over real sockets: https with the test CA, mutual
TLS, certificate rotation (with and without SNI), bearer tokens and roles,
readiness through unload, load and a SIGTERM drain, request ids, metrics, the
connection limit, and clients that never finish their request head."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attention_client import AttentionClient
from attention_server.grpc_api.server import CLOSING_GRACE
from tests.helpers import MODEL_DIR, ServerProcess, ServerThread, read_until_closed, wait_until
from tests.tls import Pki, make_pki

DEFAULT = MODEL_DIR.name
INFER_TOKEN = "http-infer-" + "c" * 24
ADMIN_TOKEN = "http-admin-" + "d" * 24
INFER_BODY = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["hello there"]}],
              "outputs": [{"name": "sequence_length"}]}
ANALYZE_BODY = {"sequences": [{"text": "hello there"}], "options": {"attention": False, "hiddenStates": False}}
# Failures a refused TLS client sees, depending on when the server drops it.
REFUSED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _metric(server: ServerThread, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry these labels (whatever their others); 0 when none."""
    text = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).text
    total = 0.0
    for found in re.finditer(rf"^{re.escape(name)}{{(.*)}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(found.group(2))
    return total


def _raw(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if data:
        sock.sendall(data)
    return sock


def _reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 reply with a Content-Length read off a raw socket."""
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader.read(int(headers.get("content-length", "0")))


# -- plaintext: health, readiness, request ids, metrics ---------------------------------------

@pytest.fixture(scope="module")
def plain() -> Iterator[ServerThread]:
    with ServerThread() as srv:
        yield srv


def test_health_and_readiness_when_serving(plain):
    url = plain.http_url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2/models/{DEFAULT}/ready").json() == {"name": DEFAULT, "ready": True}
    assert httpx.get(f"{url}/v2/models/{DEFAULT}/versions/1/ready").status_code == 200


def test_an_unknown_model_is_not_ready_404(plain):
    for path in ("/v2/models/no-such-model/ready", f"/v2/models/{DEFAULT}/versions/7/ready"):
        reply = httpx.get(plain.http_url + path)
        assert reply.status_code == 404, path
        assert "not found" in reply.json()["error"]


def test_a_safe_request_id_is_echoed_an_unsafe_one_replaced(plain):
    safe = "req-7.a:b_C"
    assert httpx.get(f"{plain.http_url}/v2/health/ready", headers={"x-request-id": safe}).headers["x-request-id"] \
        == safe
    for unsafe in (b"two words", b"<script>", b"x" * 65, "caf\u00e9".encode(), b"-leading-dash"):
        reply = httpx.get(f"{plain.http_url}/v2/health/ready", headers={b"x-request-id": unsafe})
        echoed = reply.headers["x-request-id"]
        assert echoed.encode() != unsafe and re.fullmatch(r"[0-9a-f]{16}", echoed), unsafe
    # Errors carry one too, new for each call.
    ids = {httpx.get(f"{plain.http_url}/v2/models/nope/ready").headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2


def test_metrics_count_http_calls_by_service_method_and_code(plain):
    counted = {
        "infer": {"service": "http:inference", "method": "ModelInfer", "code": "OK"},
        "unknown": {"service": "http:inference", "method": "ModelReady", "code": "NOT_FOUND"},
        "analyze": {"service": "http:attention.v1", "method": "Analyze", "code": "OK"},
    }
    before = {what: _metric(plain, "attention_requests_total", **labels) for what, labels in counted.items()}
    inferences = _metric(plain, "nv_inference_request_success", model=DEFAULT)
    for _ in range(2):
        assert httpx.post(f"{plain.http_url}/v2/models/{DEFAULT}/infer", json=INFER_BODY, timeout=60).json()[
            "outputs"][0]["data"] == [4]
    assert httpx.get(f"{plain.http_url}/v2/models/nope/ready").status_code == 404
    assert httpx.post(f"{plain.http_url}/v1/analyze", json=ANALYZE_BODY, timeout=60).status_code == 200
    after = {what: _metric(plain, "attention_requests_total", **labels) for what, labels in counted.items()}
    assert after == {"infer": before["infer"] + 2, "unknown": before["unknown"] + 1, "analyze": before["analyze"] + 1}
    # The engine's statistics are the gRPC port's: both HTTP calls that reached the model are in them.
    assert _metric(plain, "nv_inference_request_success", model=DEFAULT) == inferences + 3
    assert _metric(plain, "attention_request_duration_seconds_count", service="http:inference",
                   method="ModelInfer") >= 2


def test_the_http_port_can_be_turned_off():
    with ServerProcess("--http-port", "-1") as proc:
        assert proc.http_port is None
        with AttentionClient(proc.target, timeout=60) as client:
            assert client.analyze("still served over gRPC", top_k=1).tokens
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
        assert "HTTP" not in proc.proc.stdout.read()


# -- TLS ---------------------------------------------------------------------------------------

def _https(pki: Pki, client_cert: Pki | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if client_cert is not None:
        context.load_cert_chain(client_cert.client_cert_file, client_cert.client_key_file)
    return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("http-pki"))


@pytest.fixture(scope="module")
def mtls(pki) -> Iterator[ServerThread]:
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file,
                      tls_client_ca_file=pki.ca_file) as srv:
        yield srv


def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(mtls, pki):
    assert mtls.http_url.startswith("https://")
    with httpx.Client(base_url=mtls.http_url, verify=_https(pki, pki), timeout=60) as client:
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.post(f"/v2/models/{DEFAULT}/infer", json=INFER_BODY).status_code == 200
    # The gRPC port takes the same client certificate.
    creds = grpc.ssl_channel_credentials(pki.ca_pem, pki.client_key_pem, pki.client_cert_pem)
    with grpc.secure_channel(f"localhost:{mtls.port}", creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_refuses_clients_without_a_good_certificate(mtls, pki, tmp_path):
    other = make_pki(tmp_path / "other")
    for verify in (_https(pki), _https(pki, other)):  # no certificate; one from another CA
        with pytest.raises(REFUSED):
            httpx.get(f"{mtls.http_url}/v2/health/ready", verify=verify, timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a server it does not trust
        httpx.get(f"{mtls.http_url}/v2/health/ready", verify=_https(other, pki), timeout=10)
    # Plaintext HTTP to the TLS port gets no reply.
    with pytest.raises(REFUSED):
        httpx.get(mtls.http_url.replace("https://", "http://") + "/v2/health/ready", timeout=10)
    assert httpx.get(f"{mtls.http_url}/v2/health/ready", verify=_https(pki, pki), timeout=10).status_code == 200


def _served(port: int, ca: Path, server_hostname: str | None) -> bytes:
    """The certificate (DER) a new connection gets, verified against `ca`; no SNI when
    server_hostname is None (nor for an IP address: Python sends none)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = server_hostname is not None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=server_hostname) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(cert_file: Path) -> bytes:
    """The first certificate of a PEM chain file, as DER."""
    pem = cert_file.read_text()
    return ssl.PEM_cert_to_DER_cert(pem[:pem.index("-----END CERTIFICATE-----") + 25])


def _replace(source: Path, target: Path) -> None:
    """Write aside, rename over: the way a secret mount or cert-manager replaces a file."""
    aside = target.with_suffix(".tmp")
    aside.write_bytes(source.read_bytes())
    os.replace(aside, target)


def test_tls_without_client_certificates_and_rotation_with_and_without_sni(tmp_path):
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    _replace(old.server_cert_file, cert)
    _replace(old.server_key_file, key)
    with ServerThread(tls_cert_file=cert, tls_key_file=key) as srv:
        port = srv.server.http_port
        # TLS only: no client certificate needed; plaintext refused.
        assert httpx.get(f"{srv.http_url}/v2/health/ready", verify=_https(old), timeout=10).status_code == 200
        with pytest.raises(REFUSED):
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
        assert _served(port, old.ca_file, None) == _der(old.server_cert_file)

        _replace(new.server_key_file, key)
        _replace(new.server_cert_file, cert)
        # The first new connection sends no server name (no SNI): it gets the new certificate all the same.
        assert _served(port, new.ca_file, None) == _der(new.server_cert_file)
        assert _served(port, new.ca_file, "127.0.0.1") == _der(new.server_cert_file)
        assert _served(port, new.ca_file, "localhost") == _der(new.server_cert_file)
        assert httpx.get(f"{srv.http_url}/v2/health/ready", verify=_https(new), timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{srv.http_url}/v2/health/ready", verify=_https(old), timeout=10)
        assert srv.server.http_tls.rotations == 1


def test_a_rotated_client_ca_decides_who_may_connect(tmp_path):
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key, client_ca = live / "server.pem", live / "server.key", live / "client-ca.pem"
    for source, target in ((old.server_cert_file, cert), (old.server_key_file, key), (old.ca_file, client_ca)):
        _replace(source, target)
    with ServerThread(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=client_ca) as srv:
        url = f"{srv.http_url}/v2/health/ready"
        assert httpx.get(url, verify=_https(old, old), timeout=10).status_code == 200
        for source, target in ((new.server_key_file, key), (new.server_cert_file, cert), (new.ca_file, client_ca)):
            _replace(source, target)
        assert httpx.get(url, verify=_https(new, new), timeout=10).status_code == 200
        with pytest.raises(REFUSED):  # trusts the new server certificate, presents a client certificate of the old CA
            httpx.get(url, verify=_https(new, old), timeout=10)


# -- tokens and roles --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("http-tokens") / "tokens"
    tokens.write_text("".join(f"{role}:{hashlib.sha256(t.encode()).hexdigest()}\n"
                              for role, t in (("infer", INFER_TOKEN), ("admin", ADMIN_TOKEN))))
    with ServerThread(auth_tokens_file=tokens, model_control_mode="explicit") as srv:
        yield srv


def test_calls_without_a_known_token_get_401_with_a_bearer_challenge(guarded):
    denied = {"service": "http:inference", "code": "UNAUTHENTICATED"}
    before = _metric(guarded, "attention_requests_total", **denied)
    infer_before = _metric(guarded, "attention_requests_total", method="ModelInfer", **denied)
    for headers in ({}, _bearer("guess"), {"authorization": f"Basic {INFER_TOKEN}"}):
        for method, path in (("POST", f"/v2/models/{DEFAULT}/infer"), ("GET", "/v2"),
                             ("GET", f"/v2/models/{DEFAULT}/ready"), ("POST", "/v2/repository/index")):
            reply = httpx.request(method, guarded.http_url + path, headers=headers, json=INFER_BODY, timeout=30)
            assert reply.status_code == 401, (headers, path)
            assert reply.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in reply.json()["error"] and INFER_TOKEN not in reply.text
    reply = httpx.post(f"{guarded.http_url}/v1/analyze", json=ANALYZE_BODY, timeout=30)
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    # Counted, under the route each asked for.
    assert _metric(guarded, "attention_requests_total", **denied) == before + 12
    assert _metric(guarded, "attention_requests_total", method="ModelInfer", **denied) == infer_before + 3


def test_health_and_the_explorer_page_need_no_token(guarded):
    assert httpx.get(f"{guarded.http_url}/v2/health/live").status_code == 200
    assert httpx.get(f"{guarded.http_url}/v2/health/ready").status_code == 200
    page = httpx.get(f"{guarded.http_url}/explore")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_the_infer_role_may_infer_but_not_touch_the_repository(guarded):
    forbidden = {"service": "http:inference", "method": "RepositoryIndex", "code": "PERMISSION_DENIED"}
    before = _metric(guarded, "attention_requests_total", **forbidden)
    with httpx.Client(base_url=guarded.http_url, headers=_bearer(INFER_TOKEN), timeout=60) as client:
        assert client.post(f"/v2/models/{DEFAULT}/infer", json=INFER_BODY).json()["outputs"][0]["data"] == [4]
        assert client.post("/v1/analyze", json=ANALYZE_BODY).status_code == 200
        assert client.get(f"/v2/models/{DEFAULT}/ready").status_code == 200
        for path in ("/v2/repository/index", f"/v2/repository/models/{DEFAULT}/load",
                     f"/v2/repository/models/{DEFAULT}/unload"):
            reply = client.post(path)
            assert reply.status_code == 403, path
            assert "admin" in reply.json()["error"]
    assert _metric(guarded, "attention_requests_total", **forbidden) == before + 1
    assert httpx.get(f"{guarded.http_url}/v2/health/ready").status_code == 200  # nothing was unloaded


def test_readiness_follows_the_default_model_through_an_admin_unload_and_load(guarded):
    with httpx.Client(base_url=guarded.http_url, headers=_bearer(ADMIN_TOKEN), timeout=120) as admin, \
            grpc.insecure_channel(guarded.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert [m["name"] for m in admin.post("/v2/repository/index").json()] == [DEFAULT]
        assert admin.post(f"/v2/repository/models/{DEFAULT}/unload").status_code == 200
        try:
            not_ready = admin.get("/v2/health/ready")
            assert not_ready.status_code == 503 and not_ready.headers["retry-after"]
            assert "default model is not loaded" in not_ready.json()["error"]
            assert admin.get(f"/v2/models/{DEFAULT}/ready").status_code == 404
            assert admin.post(f"/v2/models/{DEFAULT}/infer", json=INFER_BODY).status_code == 404
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                       == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        finally:
            assert admin.post(f"/v2/repository/models/{DEFAULT}/load").status_code == 200
        assert admin.get("/v2/health/ready").json() == {"ready": True}
        assert admin.post(f"/v2/models/{DEFAULT}/infer", json=INFER_BODY).status_code == 200
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.SERVING, timeout=10)


# -- connection limit and request heads --------------------------------------------------------

LIMIT = 3


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerThread]:
    with ServerThread(http_max_connections=LIMIT) as srv:
        yield srv


GET_METADATA = b"GET /v2 HTTP/1.1\r\nHost: test\r\n\r\n"
GET_READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: test\r\n\r\n"


def test_connections_over_the_limit_get_503_at_once_and_the_others_keep_being_served(limited):
    port = limited.server.http_port
    # LIMIT connections, each served once (so the server has them) and kept open.
    held = [_raw(port, GET_METADATA) for _ in range(LIMIT)]
    try:
        assert [_reply(sock)[0] for sock in held] == [200] * LIMIT
        extra = _raw(port, GET_METADATA)
        started = time.monotonic()
        status, headers, body = _reply(extra)
        assert status == 503 and time.monotonic() - started < 10
        assert headers["retry-after"] and headers["connection"] == "close"
        assert "http_max_connections" in json.loads(body)["error"] and headers["x-request-id"]
        assert read_until_closed(extra) == b""
        extra.close()
        # Health still answers on a connection over the limit (probes are not turned away).
        probe = _raw(port, GET_READY)
        assert _reply(probe)[0] == 200
        probe.close()
        # The connections already open are still served.
        for sock in held:
            sock.sendall(GET_METADATA)
            assert _reply(sock)[0] == 200
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, new connections are served again.
    wait_until(lambda: httpx.get(f"{limited.http_url}/v2", timeout=10).status_code == 200, timeout=10)


def test_a_limit_of_one_serves_one_connection():
    with ServerThread(http_max_connections=1) as srv:
        with httpx.Client(base_url=srv.http_url, timeout=30) as client:  # one keep-alive connection
            assert [client.get("/v2").status_code for _ in range(3)] == [200, 200, 200]
            with httpx.Client(base_url=srv.http_url, timeout=30) as second:
                assert second.get("/v2").status_code == 503
            assert client.get("/v2").status_code == 200


@pytest.fixture(scope="module")
def impatient() -> Iterator[ServerThread]:
    """A short keep-alive timeout, which is also how long a client has to send a request head."""
    with ServerThread(http_keepalive_timeout=1.0, http_max_connections=4) as srv:
        yield srv


def test_clients_that_never_finish_their_request_head_are_closed_and_block_no_one(impatient):
    port = impatient.server.http_port
    silent = _raw(port)  # connects, sends nothing
    partial = _raw(port, b"POST /v2/models/minilm-l6/infer HTTP/1.1\r\nHost: test\r\nContent-Le")
    trickle = _raw(port, b"GET /v2 HTTP/1.1\r\n")
    stop = threading.Event()

    def keep_trickling() -> None:  # one more header line every 0.2 s, as a slowloris client does
        n = 0
        while not stop.wait(0.2):
            try:
                trickle.sendall(b"X-Slow-%d: 1\r\n" % n)
            except OSError:
                return
            n += 1

    sender = threading.Thread(target=keep_trickling, daemon=True)
    sender.start()
    try:
        # Another client is served all the while, on the one connection slot the slow ones leave.
        with httpx.Client(base_url=impatient.http_url, timeout=30) as client:
            for _ in range(6):
                assert client.post(f"/v2/models/{DEFAULT}/infer", json=INFER_BODY).status_code == 200
        started = time.monotonic()
        for sock in (silent, partial, trickle):
            assert read_until_closed(sock) == b""  # closed without a reply
        assert time.monotonic() - started < 20
    finally:
        stop.set()
        sender.join(5)
        for sock in (silent, partial, trickle):
            sock.close()
    assert httpx.get(f"{impatient.http_url}/v2/health/ready", timeout=10).status_code == 200


def test_a_request_head_over_the_metadata_limit_gets_431(impatient):
    port = impatient.server.http_port
    sock = _raw(port, b"GET /v2 HTTP/1.1\r\nHost: test\r\n" + b"X-Pad: " + b"a" * (17 << 10) + b"\r\n\r\n")
    try:
        status, headers, body = _reply(sock)
        assert status == 431 and headers["connection"] == "close"
        assert "max_metadata_kib" in json.loads(body)["error"]
        assert read_until_closed(sock) == b""
    finally:
        sock.close()
    # A head just under the limit is served.
    assert httpx.get(f"{impatient.http_url}/v2", headers={"x-pad": "a" * (15 << 10)}).status_code == 200


# -- SIGTERM drain -----------------------------------------------------------------------------

class _SmallWindow(http.client.HTTPConnection):
    """A client that reads slowly: a small receive buffer, so a large reply waits in the server
    until it is read."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _start(port: int, path: str, body: dict[str, object]) -> tuple[_SmallWindow, http.client.HTTPResponse]:
    connection = _SmallWindow("127.0.0.1", port, timeout=120)
    connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    return connection, connection.getresponse()  # the status and headers; the body is read later


@pytest.mark.slow
def test_sigterm_drain_finishes_calls_in_flight_while_ready_says_503():
    with ServerProcess("--grace-period", "60") as proc:
        url = f"http://127.0.0.1:{proc.http_port}"
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        # A stream of three large results (each line megabytes of base64), read only after the probes
        # below: until then the server cannot send the rest and the call stays in flight.
        stream_texts = ["word " * 200] * 3
        streaming, stream = _start(proc.http_port, "/v1/analyze_stream", {"sequences": [{"text": t} for t in
                                                                                       stream_texts]})
        # A unary reply of tens of MB, computed and handed over, not yet read either.
        unary, reply = _start(proc.http_port, "/v1/analyze",
                              {"sequences": [{"text": "word " * 300}], "options": {"hiddenStates": False}})
        assert stream.status == 200 and reply.status == 200

        proc.proc.send_signal(signal.SIGTERM)
        def ready_reply() -> httpx.Response | None:
            reply = httpx.get(f"{url}/v2/health/ready", timeout=10)
            return reply if reply.status_code == 503 else None

        not_ready = wait_until(ready_reply, timeout=30)
        assert not_ready.headers["retry-after"] and "draining" in not_ready.json()["error"]
        refused = httpx.post(f"{url}/v2/models/{DEFAULT}/infer", json=INFER_BODY, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "shutting down" in refused.json()["error"]
        assert httpx.get(f"{url}/v2/models/{DEFAULT}/ready", timeout=10).status_code == 503
        assert httpx.post(f"{url}/v1/analyze", json=ANALYZE_BODY, timeout=30).status_code == 503
        # The gRPC port sent GOAWAY and closed at once; a probe there is refused (or NOT_SERVING).
        with grpc.insecure_channel(proc.target) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.proc.poll() is None

        results = [json.loads(line) for line in stream.read().splitlines()]
        assert [r["index"] for r in results] == [0, 1, 2]
        assert all(len(r["tokens"]) == 202 for r in results)
        # The unary reply is sent under flow control, so it is still a call in flight: the process
        # waits for this reader (for what is left of the grace period), then closes the port and exits.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.proc.wait(3 * CLOSING_GRACE)
        body = reply.read()
        assert len(body) == int(reply.headers["content-length"])
        assert len(json.loads(body)["results"][0]["tokens"]) == 302
        wait_until(lambda: _refuses_connections(proc.http_port), timeout=30)
        streaming.close()
        unary.close()
        assert proc.proc.wait(60) == 0
        assert "stopped" in proc.stderr()
