"""Credential building shared by AttentionClient, AsyncAttentionClient and the CLIs:
PEM sources, client certificate pairs, tokens and where they travel."""

import warnings

import grpc
import pytest

from attention_client import AsyncAttentionClient, AttentionClient
from attention_client._channel import ChannelSecurity, channel_security, is_loopback, read_pem, resolve_token
from tests.tls import make_pki

TARGET = "127.0.0.1:50051"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv("ATTENTION_TOKEN", raising=False)


def test_pem_from_bytes_text_str_path_and_path(pki):
    assert read_pem(pki.ca_pem, "root_certificates") == pki.ca_pem
    assert read_pem(pki.ca_pem.decode(), "root_certificates") == pki.ca_pem
    assert read_pem(str(pki.ca_file), "root_certificates") == pki.ca_pem
    assert read_pem(pki.ca_file, "root_certificates") == pki.ca_pem
    assert read_pem(None, "root_certificates") is None


def test_missing_pem_file_names_the_argument_and_the_file(tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError) as info:
        read_pem(missing, "root_certificates")
    assert info.value.filename == str(missing)
    assert "root_certificates" in str(info.value) and str(missing) in str(info.value)


def test_directory_and_non_pem_are_refused_by_name(tmp_path):
    with pytest.raises(IsADirectoryError, match="private_key"):
        read_pem(tmp_path, "private_key")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(ValueError, match=r"certificate_chain: .*junk\.pem is not PEM"):
        read_pem(junk, "certificate_chain")
    with pytest.raises(ValueError, match="not PEM"):
        read_pem(b"", "root_certificates")
    with pytest.raises(TypeError, match="root_certificates"):
        read_pem(42, "root_certificates")  # type: ignore[arg-type]


def test_plaintext_without_anything():
    assert channel_security(TARGET) == ChannelSecurity()


@pytest.mark.parametrize("kwargs", [
    {"tls": True},
    {"root_certificates": "ca"},
    {"root_certificates": "ca", "certificate_chain": "cert", "private_key": "key"},
    {"certificate_chain": "cert", "private_key": "key"},
])
def test_any_tls_argument_makes_a_secure_channel(pki, kwargs):
    files = {"ca": pki.ca_file, "cert": pki.client_cert_file, "key": pki.client_key_file}
    resolved = {k: files.get(v, v) for k, v in kwargs.items()}
    security = channel_security(TARGET, **resolved)
    assert isinstance(security.credentials, grpc.ChannelCredentials) and security.metadata == ()


def test_certificate_without_key_and_key_without_certificate(pki):
    with pytest.raises(ValueError, match="certificate_chain given without private_key"):
        channel_security(TARGET, root_certificates=pki.ca_pem, certificate_chain=pki.client_cert_pem)
    with pytest.raises(ValueError, match="private_key given without certificate_chain"):
        channel_security(TARGET, private_key=pki.client_key_file)


def test_credentials_and_pem_arguments_do_not_mix(pki):
    with pytest.raises(ValueError, match="either credentials or"):
        channel_security(TARGET, credentials=grpc.ssl_channel_credentials(), root_certificates=pki.ca_pem)


def test_token_over_tls_is_call_credentials_not_metadata(pki):
    security = channel_security(TARGET, root_certificates=pki.ca_pem, token="s3cret")
    assert security.credentials is not None and security.metadata == ()
    assert channel_security(TARGET, credentials=grpc.ssl_channel_credentials(), token="s3cret").metadata == ()


def test_token_over_plaintext_is_metadata():
    security = channel_security(TARGET, token="s3cret")
    assert security.credentials is None
    assert security.metadata == (("authorization", "Bearer s3cret"),)


def test_token_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("ATTENTION_TOKEN", "from-env\n")
    assert channel_security(TARGET).metadata == (("authorization", "Bearer from-env"),)
    assert channel_security(TARGET, token="given").metadata == (("authorization", "Bearer given"),)
    assert channel_security(TARGET, token="").metadata == ()  # '' turns the environment's token off


def test_bad_token_is_refused_without_echoing_it(monkeypatch):
    with pytest.raises(ValueError, match=r"^token: ") as info:
        resolve_token("two words")
    assert "words" not in str(info.value)
    monkeypatch.setenv("ATTENTION_TOKEN", "caf\u00e9")
    with pytest.raises(ValueError, match=r"^\$ATTENTION_TOKEN: ") as info:
        resolve_token(None)
    assert "caf" not in str(info.value)


def test_call_metadata_keeps_the_callers_and_adds_authorization():
    security = channel_security(TARGET, token="t")
    assert security.with_call_metadata((("x-request-id", "1"),)) == (
        ("authorization", "Bearer t"), ("x-request-id", "1"))
    # A caller that sets authorization on a call wins: no second header.
    assert security.with_call_metadata((("Authorization", "Bearer other"),)) == (("Authorization", "Bearer other"),)
    assert ChannelSecurity().with_call_metadata((("a", "b"),)) == (("a", "b"),)


@pytest.mark.parametrize(("target", "local"), [
    ("localhost:50051", True), ("127.0.0.1:50051", True), ("127.3.2.1:1", True), ("[::1]:50051", True),
    ("dns:///localhost:50051", True), ("ipv4:127.0.0.1:50051", True), ("ipv6:[::1]:50051", True),
    ("unix:/run/attention.sock", True), ("localhost", True),
    ("attention:50051", False), ("10.0.0.5:50051", False), ("[2001:db8::1]:50051", False),
    ("dns:///attention.example.com:443", False),
])
def test_loopback_targets(target, local):
    assert is_loopback(target) is local


def test_cleartext_token_to_another_host_warns_and_to_this_one_does_not():
    with pytest.warns(UserWarning, match="cleartext to attention:50051"):
        channel_security("attention:50051", token="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        channel_security("localhost:50051", token="t")
        channel_security("attention:50051", tls=True, token="t")


def test_clients_refuse_a_missing_pem_file_when_built(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(FileNotFoundError, match="root_certificates"):
        AttentionClient(TARGET, root_certificates=missing)
    with pytest.raises(ValueError, match="certificate_chain given without private_key"):
        AsyncAttentionClient(TARGET, certificate_chain=b"-----BEGIN CERTIFICATE-----")
