"""Secure by default, and easy to secure: real servers with TLS, mutual TLS and
bearer tokens; model control off unless asked for; a repository that cannot
point outside itself. Raw gRPC channels here (the SDK's own options are tested
in test_client_tls.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client._proto.attention.v1 import attention_pb2_grpc as pb_grpc
from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.helpers import MODEL_DIR, ServerProcess, ServerThread, place_model_file, wait_until
from tests.tls import Pki, make_pki

DEFAULT = MODEL_DIR.name
INFER_TOKEN = "infer-token-" + "a" * 20
ADMIN_TOKEN = "admin-token-" + "b" * 20
REQUEST = pb.AnalyzeRequest(sequences=[pb.Sequence(text="secure hello")], options=pb.AnalyzeOptions(attention=False))


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _tokens_file(path: Path, *entries: tuple[str, str]) -> Path:
    path.write_text("# role:sha256 of the token\n" + "".join(f"{role}:{_sha(t)}\n" for role, t in entries))
    return path


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _secure(target: str, pki: Pki, client_cert: bool = False) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        pki.ca_pem, pki.client_key_pem if client_cert else None, pki.client_cert_pem if client_cert else None)
    return grpc.secure_channel(f"localhost:{target.rsplit(':', 1)[1]}", creds)


def _code(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- TLS ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_server(pki) -> Iterator[ServerThread]:
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file) as srv:
        yield srv


def test_a_tls_server_serves_tls_clients(tls_server, pki):
    with _secure(tls_server.target, pki) as channel:
        reply = pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=30)
    assert [t.text for t in reply.results[0].tokens] == ["[CLS]", "secure", "hello", "[SEP]"]


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with grpc.insecure_channel(tls_server.target) as channel:
        code = _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_is_refused(tls_server, tmp_path):
    stranger = make_pki(tmp_path / "other")
    with _secure(tls_server.target, stranger) as channel:
        code = _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_with_tls_the_metrics_endpoint_stays_on_loopback(tls_server):
    assert tls_server.server.metrics_host == "127.0.0.1"


def test_mutual_tls_refuses_a_client_without_a_certificate(pki):
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file,
                      tls_client_ca_file=pki.ca_file) as srv:
        with _secure(srv.target, pki, client_cert=False) as channel:
            refused = _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=10))
        with _secure(srv.target, pki, client_cert=True) as channel:
            served = _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=30))
    assert refused == grpc.StatusCode.UNAVAILABLE and served == grpc.StatusCode.OK


def test_a_rotated_certificate_is_served_to_new_connections(tmp_path):
    old = make_pki(tmp_path / "old")
    new = make_pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    cert.write_bytes(old.server_cert_file.read_bytes())
    key.write_bytes(old.server_key_file.read_bytes())
    with ServerThread(tls_cert_file=cert, tls_key_file=key) as srv:
        with _secure(srv.target, old) as channel:
            assert _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=30)).name == "OK"
        # Replace the files the way a secret mount or cert-manager does: write aside, rename over.
        for source, target in ((new.server_key_file, key), (new.server_cert_file, cert)):
            aside = target.with_suffix(".tmp")
            aside.write_bytes(source.read_bytes())
            os.replace(aside, target)

        def new_certificate_served() -> bool:
            with _secure(srv.target, new) as channel:
                return _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=10)).name == "OK"

        wait_until(new_certificate_served, timeout=30)
        with _secure(srv.target, old) as channel:  # the old CA no longer matches new connections
            assert _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, timeout=10)) == \
                grpc.StatusCode.UNAVAILABLE
        assert srv.server.tls.rotations == 1


# -- tokens and roles ------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(tmp_path_factory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("tokens")
    tokens = _tokens_file(folder / "tokens", ("infer", INFER_TOKEN), ("admin", ADMIN_TOKEN))
    with ServerThread(auth_tokens_file=tokens, model_control_mode="explicit") as srv:
        yield srv


def test_calls_without_a_known_token_are_unauthenticated(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert _code(lambda: stub.Analyze(REQUEST, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: stub.Analyze(REQUEST, metadata=_bearer("guess"), timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: list(stub.AnalyzeStream(REQUEST, timeout=10))) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Analyze(REQUEST, metadata=[("authorization", "Basic abc")], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.value.details()
        # Health answers without a token (probes carry none).
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_token(token_server):
    def list_services(metadata):  # type: ignore[no-untyped-def]
        with grpc.insecure_channel(token_server.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                metadata=metadata, timeout=10)
            return [s.name for r in replies for s in r.list_services_response.service]

    with pytest.raises(grpc.RpcError) as err:
        list_services(None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "attention.v1.AttentionService" in list_services(_bearer(INFER_TOKEN))


def test_the_infer_role_infers_and_may_not_change_models(token_server):
    with grpc.insecure_channel(token_server.target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.Analyze(REQUEST, metadata=_bearer(INFER_TOKEN), timeout=30).results
        assert kserve.ServerReady(kpb.ServerReadyRequest(), metadata=_bearer(INFER_TOKEN), timeout=10).ready
        with pytest.raises(grpc.RpcError) as err:
            kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=DEFAULT),
                                         metadata=_bearer(INFER_TOKEN), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.value.details()
        assert kserve.ModelReady(kpb.ModelReadyRequest(name=DEFAULT), metadata=_bearer(INFER_TOKEN),
                                 timeout=10).ready


def test_the_admin_role_unloads_and_reloads_in_explicit_mode(token_server):
    admin = _bearer(ADMIN_TOKEN)
    with grpc.insecure_channel(token_server.target) as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=DEFAULT), metadata=admin,
                                     timeout=60)
        assert not kserve.ModelReady(kpb.ModelReadyRequest(name=DEFAULT), metadata=admin, timeout=10).ready
        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=DEFAULT), metadata=admin, timeout=120)
        assert kserve.ModelReady(kpb.ModelReadyRequest(name=DEFAULT), metadata=admin, timeout=10).ready


def test_denied_calls_are_counted_by_code(token_server):
    counter = token_server.server.metrics.requests.labels("attention.v1.AttentionService", "Analyze",
                                                          "UNAUTHENTICATED")
    before = counter._value.get()
    with grpc.insecure_channel(token_server.target) as channel:
        _code(lambda: pb_grpc.AttentionServiceStub(channel).Analyze(REQUEST, metadata=_bearer("wrong"), timeout=10))
    # The status reaches the caller a moment before the server's bookkeeping ends.
    wait_until(lambda: counter._value.get() - before == 1, timeout=10)


def test_logs_name_the_role_and_never_a_token(tmp_path):
    tokens = _tokens_file(tmp_path / "tokens", ("infer", INFER_TOKEN))
    with ServerProcess("--auth-tokens-file", str(tokens), "--log-format", "json") as proc, \
            grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        _code(lambda: stub.Analyze(pb.AnalyzeRequest(), metadata=[*_bearer(INFER_TOKEN), ("x-request-id", "r-1")],
                                   timeout=10))
        _code(lambda: stub.Analyze(REQUEST, metadata=[*_bearer("wrong"), ("x-request-id", "r-2")], timeout=10))
        wait_until(lambda: "r-2" in proc.stderr(), timeout=10)
        text = proc.stderr()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = {r["request_id"]: r for r in records if r.get("request_id", "-").startswith("r-")}
    assert mine["r-1"]["role"] == "infer" and "empty batch" in mine["r-1"]["message"]
    assert mine["r-2"]["role"] == "-" and "UNAUTHENTICATED" in mine["r-2"]["message"]
    for secret in (INFER_TOKEN, _sha(INFER_TOKEN), "wrong"):
        assert secret not in text


def test_a_revoked_token_stops_working_without_a_restart(tmp_path):
    tokens = _tokens_file(tmp_path / "tokens", ("infer", INFER_TOKEN), ("infer", "keep-" + INFER_TOKEN))
    with ServerThread(auth_tokens_file=tokens) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.AttentionServiceStub(channel)
        assert _code(lambda: stub.Analyze(REQUEST, metadata=_bearer(INFER_TOKEN), timeout=30)).name == "OK"
        _tokens_file(tokens, ("infer", "keep-" + INFER_TOKEN))
        wait_until(lambda: _code(lambda: stub.Analyze(REQUEST, metadata=_bearer(INFER_TOKEN), timeout=10))
                   == grpc.StatusCode.UNAUTHENTICATED, timeout=30)
        assert _code(lambda: stub.Analyze(REQUEST, metadata=_bearer("keep-" + INFER_TOKEN), timeout=30)).name == "OK"
        # A broken file keeps the tokens in force (and says so in the log) rather than locking everyone out.
        tokens.write_text("infer:not-a-hash\n")
        srv.server.reload_tokens()
        assert _code(lambda: stub.Analyze(REQUEST, metadata=_bearer("keep-" + INFER_TOKEN), timeout=30)).name == "OK"


def test_a_malformed_tokens_file_stops_the_start_with_one_line(tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text(f"reader:{_sha('x')}\n")
    done = subprocess.run([sys.executable, "-m", "attention_server", "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "-1", "--http-port", "-1", "--auth-tokens-file", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:1" in lines[0] and "infer, admin" in lines[0], done.stderr


def test_tritonclient_infers_over_tls_with_a_bearer_token(pki, tmp_path):
    tokens = _tokens_file(tmp_path / "tokens", ("infer", INFER_TOKEN))
    program = textwrap.dedent("""
        import sys, numpy as np, tritonclient.grpc as tc
        url, ca, cert, key, token = sys.argv[1:]
        client = tc.InferenceServerClient(url, ssl=True, root_certificates=ca, private_key=key,
                                          certificate_chain=cert)
        headers = {"authorization": "Bearer " + token}
        assert client.is_server_ready(headers=headers)
        ids = tc.InferInput("input_ids", [1, 4], "INT64")
        ids.set_data_from_numpy(np.array([[101, 7592, 2088, 102]], dtype=np.int64))
        result = client.infer("minilm-l6", [ids], outputs=[tc.InferRequestedOutput("last_hidden_state")],
                              headers=headers)
        print(result.as_numpy("last_hidden_state").shape)
        try:
            client.is_server_ready()
        except tc.InferenceServerException as exc:
            print(exc.status())
    """)
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file,
                      tls_client_ca_file=pki.ca_file, auth_tokens_file=tokens) as srv:
        done = subprocess.run([sys.executable, "-c", program, f"localhost:{srv.port}", str(pki.ca_file),
                               str(pki.client_cert_file), str(pki.client_key_file), INFER_TOKEN],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(1,", "4,", "384)", "StatusCode.UNAUTHENTICATED"], done.stdout


# -- model control and the repository --------------------------------------------------

def test_the_default_server_refuses_to_unload_and_keeps_its_model(server):
    with grpc.insecure_channel(server.target) as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        for call in (lambda: kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=DEFAULT),
                                                          timeout=10),
                     lambda: kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=DEFAULT),
                                                        timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control-mode explicit" in err.value.details()
        assert kserve.ModelReady(kpb.ModelReadyRequest(name=DEFAULT), timeout=10).ready
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def _model_folder(repository: Path, name: str, **meta_changes: object) -> Path:
    folder = repository / name
    folder.mkdir()
    for file in ("model.onnx", "tokenizer.json"):
        place_model_file(MODEL_DIR / file, folder / file)
    meta = json.loads((MODEL_DIR / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "name": name, **meta_changes}))
    return folder


@pytest.fixture(scope="module")
def escapes(tmp_path_factory) -> Iterator[tuple[ServerThread, Path]]:
    base = tmp_path_factory.mktemp("escapes")
    repository = base / "repository"
    repository.mkdir()
    _model_folder(repository, DEFAULT)
    outside = _model_folder(base, "outside")
    (repository / "linked").symlink_to(outside)
    _model_folder(repository, "dotdot", onnx_file="../../outside/model.onnx")
    _model_folder(repository, "absolute", tokenizer_file="/etc/passwd")
    linked_file = _model_folder(repository, "linkedfile")
    (linked_file / "tokenizer.json").unlink()
    (linked_file / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with ServerThread(model_repository=repository, models=[DEFAULT], model_control_mode="explicit") as srv:
        yield srv, base


@pytest.mark.parametrize(("name", "code", "words"), [
    ("linked", "NOT_FOUND", ["linked"]),
    ("dotdot", "FAILED_PRECONDITION", ["dotdot/../../outside/model.onnx", "outside the model folder"]),
    ("absolute", "FAILED_PRECONDITION", ["/etc/passwd", "outside the model folder"]),
    ("linkedfile", "FAILED_PRECONDITION", ["linkedfile/tokenizer.json", "outside the model folder"]),
    ("../outside", "INVALID_ARGUMENT", ["not a model name"]),
    ("/etc", "INVALID_ARGUMENT", ["not a model name"]),
])
def test_the_repository_cannot_point_outside_itself(escapes, name, code, words):
    srv, base = escapes
    with grpc.insecure_channel(srv.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                kpb.RepositoryModelLoadRequest(model_name=name), timeout=120)
    assert err.value.code().name == code, err.value
    for word in words:
        assert word in err.value.details(), err.value.details()
    assert str(base) not in err.value.details()


def test_a_link_to_a_model_outside_is_not_in_the_index(escapes):
    srv, _ = escapes
    with grpc.insecure_channel(srv.target) as channel:
        index = kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
    names = {m.name for m in index.models}
    assert "linked" not in names and {DEFAULT, "dotdot", "absolute", "linkedfile"} <= names


def test_concurrent_loads_of_one_model_are_one_load(escapes, monkeypatch):
    srv, _ = escapes
    _model_folder(srv.settings.model_repository, "second")
    repository = srv.server.engine.repository
    release, calls, errors = threading.Event(), [], []
    real_load = repository.load_one

    def held_load(name):  # type: ignore[no-untyped-def]
        calls.append(name)
        release.wait(60)  # the load is slow until every caller is waiting for it
        return real_load(name)

    monkeypatch.setattr(repository, "load_one", held_load)

    def load() -> None:
        try:
            with grpc.insecure_channel(srv.target) as channel:
                kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                    kpb.RepositoryModelLoadRequest(model_name="second"), timeout=120)
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: srv.server.interceptor.active_calls == 6, timeout=30)
    release.set()
    for t in threads:
        t.join(180)
    assert not errors and calls == ["second"]
