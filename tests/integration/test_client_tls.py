"""The SDK (sync and asyncio), `attention-client` and `attention-healthcheck` against
real servers with TLS, mutual TLS and bearer tokens."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from attention_client import (
    AsyncAttentionClient,
    AttentionClient,
    AttentionError,
    UnauthenticatedError,
    UnavailableError,
)
from tests.helpers import ServerThread
from tests.tls import Pki, make_pki

TEXT = "The transformer model processes all tokens in parallel."
INFER_TOKEN = secrets.token_urlsafe(24)
# Variables the commands read; each test states the ones it means to set.
_SECURITY_ENV = ("ATTENTION_TOKEN", "ATTENTION_TLS_CERT_FILE", "ATTENTION_TLS_KEY_FILE", "ATTENTION_TLS_CLIENT_CA_FILE",
                 "ATTENTION_HEALTHCHECK_CA_FILE", "ATTENTION_HEALTHCHECK_CERT_FILE", "ATTENTION_HEALTHCHECK_KEY_FILE",
                 "ATTENTION_HEALTHCHECK_TLS", "ATTENTION_HEALTHCHECK_SERVER_NAME")


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("ATTENTION_TOKEN", raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki):
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(pki):
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file,
                      tls_client_ca_file=pki.ca_file) as srv:
        yield srv


def _tokens_file(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text(f"# role:sha256 of the token\ninfer:{hashlib.sha256(INFER_TOKEN.encode()).hexdigest()}\n")
    return path


@pytest.fixture(scope="module")
def token_server(pki, tmp_path_factory):
    """TLS and tokens: the setting the README recommends."""
    tokens = _tokens_file(tmp_path_factory.mktemp("tokens"))
    with ServerThread(tls_cert_file=pki.server_cert_file, tls_key_file=pki.server_key_file,
                      auth_tokens_file=tokens) as srv:
        yield srv


@pytest.fixture(scope="module")
def plaintext_token_server(tmp_path_factory):
    with ServerThread(auth_tokens_file=_tokens_file(tmp_path_factory.mktemp("tokens"))) as srv:
        yield srv


def _local(server: ServerThread) -> str:
    return f"localhost:{server.port}"


def _run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _SECURITY_ENV}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={**base, **(env or {})})


def _assert_analyzes(client: AttentionClient) -> None:
    result = client.analyze(TEXT, top_k=1, attention=False, hidden_states=False)
    assert result.token_texts[0] == "[CLS]" and result.pairs


# --- TLS ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["path", "str", "bytes"])
def test_tls_client_with_the_ca(tls_server, pki, source):
    ca = {"path": pki.ca_file, "str": str(pki.ca_file), "bytes": pki.ca_pem}[source]
    with AttentionClient(_local(tls_server), root_certificates=ca, timeout=60) as client:
        _assert_analyzes(client)
        assert client.list_models()[0].name == "minilm-l6"


def test_tls_client_on_127_0_0_1(tls_server, pki):
    with AttentionClient(tls_server.target, root_certificates=pki.ca_file, timeout=60) as client:
        _assert_analyzes(client)


def test_credentials_argument_still_works(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with AttentionClient(_local(tls_server), credentials=credentials, timeout=60) as client:
        _assert_analyzes(client)


async def test_async_tls_client(tls_server, pki):
    async with AsyncAttentionClient(_local(tls_server), root_certificates=pki.ca_file, timeout=60) as client:
        result = await client.analyze(TEXT, top_k=1, attention=False, hidden_states=False)
        assert result.pairs
        streamed = [r async for r in client.analyze_stream([TEXT, TEXT], top_k=1, attention=False,
                                                           hidden_states=False)]
        assert len(streamed) == 2


def test_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with AttentionClient(_local(tls_server), timeout=10) as client, pytest.raises(UnavailableError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_client_that_does_not_trust_the_ca_is_refused(tls_server, tmp_path):
    other = make_pki(tmp_path)  # another CA
    for kwargs in ({"tls": True}, {"root_certificates": other.ca_file}):
        with AttentionClient(_local(tls_server), timeout=10, **kwargs) as client, \
                pytest.raises(AttentionError) as info:
            client.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


# --- mutual TLS --------------------------------------------------------------------------------------------------

def test_mtls_client_with_a_certificate(mtls_server, pki):
    with AttentionClient(_local(mtls_server), root_certificates=pki.ca_file, certificate_chain=pki.client_cert_file,
                         private_key=pki.client_key_file, timeout=60) as client:
        _assert_analyzes(client)


async def test_async_mtls_client_with_a_certificate(mtls_server, pki):
    async with AsyncAttentionClient(_local(mtls_server), root_certificates=pki.ca_pem,
                                    certificate_chain=pki.client_cert_pem, private_key=pki.client_key_pem,
                                    timeout=60) as client:
        assert (await client.get_model()).num_heads == 12


def test_mtls_without_a_client_certificate_is_refused(mtls_server, pki):
    with AttentionClient(_local(mtls_server), root_certificates=pki.ca_file, timeout=10) as client, \
            pytest.raises(AttentionError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_with_a_certificate_from_another_ca_is_refused(mtls_server, pki, tmp_path):
    other = make_pki(tmp_path)
    with AttentionClient(_local(mtls_server), root_certificates=pki.ca_file, certificate_chain=other.client_cert_file,
                         private_key=other.client_key_file, timeout=10) as client, \
            pytest.raises(AttentionError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# --- tokens ------------------------------------------------------------------------------------------------------

def test_token_over_tls(token_server, pki):
    with AttentionClient(_local(token_server), root_certificates=pki.ca_file, token=INFER_TOKEN,
                         timeout=60) as client:
        _assert_analyzes(client)
        # Per-call metadata of the caller's own travels next to the token.
        assert client.get_model(metadata=[("x-request-id", "tls-test")]).name == "minilm-l6"
        streamed = list(client.analyze_stream([TEXT], top_k=1, attention=False, hidden_states=False))
        assert streamed[0].pairs


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_no_or_unknown_token_is_unauthenticated(token_server, pki, token):
    with AttentionClient(_local(token_server), root_certificates=pki.ca_file, token=token, timeout=30) as client, \
            pytest.raises(UnauthenticatedError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and not info.value.retryable


def test_token_from_the_environment(token_server, pki, monkeypatch):
    monkeypatch.setenv("ATTENTION_TOKEN", INFER_TOKEN)
    with AttentionClient(_local(token_server), root_certificates=pki.ca_file, timeout=60) as client:
        _assert_analyzes(client)
    with AttentionClient(_local(token_server), root_certificates=pki.ca_file, token="", timeout=30) as client, \
            pytest.raises(AttentionError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_async_token_over_tls(token_server, pki):
    async with AsyncAttentionClient(_local(token_server), root_certificates=pki.ca_file, token=INFER_TOKEN,
                                    timeout=60) as client:
        assert (await client.list_models())[0].name == "minilm-l6"
    async with AsyncAttentionClient(_local(token_server), root_certificates=pki.ca_file, timeout=30) as client:
        with pytest.raises(AttentionError) as info:
            await client.list_models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_token_over_plaintext_goes_as_metadata(plaintext_token_server):
    with AttentionClient(plaintext_token_server.target, token=INFER_TOKEN, timeout=60) as client:
        _assert_analyzes(client)
        assert client.get_model(metadata=[("x-request-id", "plain")]).name == "minilm-l6"
    with AttentionClient(plaintext_token_server.target, timeout=30) as client, pytest.raises(AttentionError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_async_token_over_plaintext(plaintext_token_server):
    async with AsyncAttentionClient(plaintext_token_server.target, token=INFER_TOKEN, timeout=60) as client:
        assert [r async for r in client.analyze_stream([TEXT], top_k=1, attention=False, hidden_states=False)]


# --- attention-client --------------------------------------------------------------------------------------------

def test_cli_with_ca_file_and_token(token_server, pki):
    done = _run("attention_client.cli", "--target", _local(token_server), "--ca-file", str(pki.ca_file),
                "--token", INFER_TOKEN, "analyze", TEXT, "--top-k", "1", "--layers", "0")
    assert done.returncode == 0, done.stderr
    assert "strength" in done.stdout and "processes" in done.stdout
    assert INFER_TOKEN not in done.stdout + done.stderr


def test_cli_token_from_file_and_environment(token_server, pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(INFER_TOKEN + "\n")
    common = ("--target", _local(token_server), "--ca-file", str(pki.ca_file))
    done = _run("attention_client.cli", *common, "--token-file", str(token_file), "models")
    assert done.returncode == 0 and done.stdout.startswith("minilm-l6:"), done.stderr
    done = _run("attention_client.cli", *common, "models", env={"ATTENTION_TOKEN": INFER_TOKEN})
    assert done.returncode == 0 and done.stdout.startswith("minilm-l6:"), done.stderr


def test_cli_without_token_reports_unauthenticated(token_server, pki):
    done = _run("attention_client.cli", "--target", _local(token_server), "--ca-file", str(pki.ca_file), "models")
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr


def test_cli_with_client_certificate(mtls_server, pki):
    done = _run("attention_client.cli", "--target", _local(mtls_server), "--ca-file", str(pki.ca_file),
                "--cert-file", str(pki.client_cert_file), "--key-file", str(pki.client_key_file), "models")
    assert done.returncode == 0 and done.stdout.startswith("minilm-l6:"), done.stderr


# --- attention-healthcheck ---------------------------------------------------------------------------------------

def test_healthcheck_with_ca_file(tls_server, pki):
    done = _run("attention_server.healthcheck", "--target", _local(tls_server), "--ca-file", str(pki.ca_file))
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr


def test_healthcheck_plaintext_against_tls_is_unhealthy(tls_server):
    done = _run("attention_server.healthcheck", "--target", _local(tls_server), "--timeout", "5")
    assert done.returncode == 1 and "unhealthy: UNAVAILABLE" in done.stderr


def test_healthcheck_without_flags_in_the_servers_environment(tls_server, pki):
    """As in the container: only the server's own ATTENTION_TLS_* are set; its certificate is pinned."""
    env = {"ATTENTION_TLS_CERT_FILE": str(pki.server_cert_file), "ATTENTION_TLS_KEY_FILE": str(pki.server_key_file)}
    done = _run("attention_server.healthcheck", "--target", _local(tls_server), env=env)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr


def test_healthcheck_without_flags_in_an_mtls_servers_environment(mtls_server, pki):
    env = {"ATTENTION_TLS_CERT_FILE": str(pki.server_cert_file), "ATTENTION_TLS_KEY_FILE": str(pki.server_key_file),
           "ATTENTION_TLS_CLIENT_CA_FILE": str(pki.ca_file)}
    done = _run("attention_server.healthcheck", "--target", _local(mtls_server), env=env)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr


def test_healthcheck_with_client_certificate_flags(mtls_server, pki):
    common = ("--target", _local(mtls_server), "--ca-file", str(pki.ca_file), "--timeout", "5")
    done = _run("attention_server.healthcheck", *common, "--cert-file", str(pki.client_cert_file),
                "--key-file", str(pki.client_key_file))
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    done = _run("attention_server.healthcheck", *common)
    assert done.returncode == 1 and "unhealthy: UNAVAILABLE" in done.stderr


def test_healthcheck_needs_no_token(token_server, pki):
    done = _run("attention_server.healthcheck", "--target", _local(token_server), "--ca-file", str(pki.ca_file))
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr


def test_healthcheck_checks_the_certificate_against_server_name(tls_server, pki):
    common = ("--target", _local(tls_server), "--ca-file", str(pki.ca_file), "--timeout", "5")
    done = _run("attention_server.healthcheck", *common, "--server-name", "localhost")
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr
    done = _run("attention_server.healthcheck", *common, "--server-name", "elsewhere.example")
    assert done.returncode == 1 and "unhealthy: UNAVAILABLE" in done.stderr
