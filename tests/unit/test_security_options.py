"""TLS and token options of the two commands, without a server: where each value
comes from and how a bad file is reported."""

import pytest

from attention_client import cli
from attention_server import healthcheck

SERVER_ENV = {"ATTENTION_TLS_CERT_FILE": "/tls/server.pem", "ATTENTION_TLS_KEY_FILE": "/tls/server.key"}


def _hc(*argv, env=None):
    return healthcheck.tls_files(healthcheck._parser().parse_args(list(argv)), env or {})


def test_healthcheck_is_plaintext_without_flags_or_environment():
    files = _hc()
    assert not files.secure and files == healthcheck.TlsFiles()


def test_healthcheck_in_a_tls_server_pins_the_servers_own_certificate():
    files = _hc(env=SERVER_ENV)
    assert files.secure and files.ca_file == "/tls/server.pem"
    assert files.cert_file is None and files.key_file is None  # no client certificate without mTLS


def test_healthcheck_in_an_mtls_server_presents_the_servers_certificate():
    files = _hc(env={**SERVER_ENV, "ATTENTION_TLS_CLIENT_CA_FILE": "/tls/clients.pem"})
    assert (files.ca_file, files.cert_file, files.key_file) == ("/tls/server.pem", "/tls/server.pem",
                                                                "/tls/server.key")


def test_healthcheck_environment_then_flags_win():
    env = {**SERVER_ENV, "ATTENTION_TLS_CLIENT_CA_FILE": "/tls/clients.pem",
           "ATTENTION_HEALTHCHECK_CA_FILE": "/hc/ca.pem", "ATTENTION_HEALTHCHECK_CERT_FILE": "/hc/c.pem",
           "ATTENTION_HEALTHCHECK_KEY_FILE": "/hc/c.key", "ATTENTION_HEALTHCHECK_SERVER_NAME": "attention"}
    assert _hc(env=env) == healthcheck.TlsFiles(False, "/hc/ca.pem", "/hc/c.pem", "/hc/c.key", "attention")
    flagged = _hc("--ca-file", "ca", "--cert-file", "c", "--key-file", "k", "--server-name", "n", env=env)
    assert flagged == healthcheck.TlsFiles(False, "ca", "c", "k", "n")


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_healthcheck_tls_from_environment(value):
    assert _hc(env={"ATTENTION_HEALTHCHECK_TLS": value}).secure
    assert not _hc(env={"ATTENTION_HEALTHCHECK_TLS": "0"}).secure
    assert _hc("--tls").secure


def test_healthcheck_reports_a_missing_file_and_exits_1(tmp_path, capsys, monkeypatch):
    for name in [*SERVER_ENV, "ATTENTION_TLS_CLIENT_CA_FILE"]:
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "ca.pem"
    assert healthcheck.main(["--ca-file", str(missing)]) == 1  # Docker reserves exit code 2
    assert capsys.readouterr().err.strip() == f"unhealthy: --ca-file: no such file: {missing}"
    assert healthcheck.main(["--cert-file", str(missing)]) == 1
    assert "--cert-file and --key-file go together" in capsys.readouterr().err


def test_cli_reports_a_missing_pem_file_by_flag_and_path(tmp_path, capsys):
    missing = tmp_path / "ca.pem"
    assert cli.main(["--ca-file", str(missing), "models"]) == 2
    assert capsys.readouterr().err.strip() == f"attention-client: --ca-file: no such file: {missing}"


def test_cli_needs_cert_and_key_together(tmp_path, capsys):
    assert cli.main(["--cert-file", str(tmp_path / "c.pem"), "models"]) == 2
    assert "--cert-file and --key-file go together" in capsys.readouterr().err


def test_cli_token_file_and_bad_tokens_are_never_echoed(tmp_path, capsys):
    empty = tmp_path / "token"
    empty.write_text("\n")
    assert cli.main(["--token-file", str(empty), "models"]) == 2
    assert f"{empty} is empty" in capsys.readouterr().err
    assert cli.main(["--token", "sec ret", "models"]) == 2
    err = capsys.readouterr().err
    assert "bearer token" in err and "sec ret" not in err and "ret" not in err.split(":", 1)[1]


def test_cli_help_documents_every_security_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--tls", "--ca-file", "--cert-file", "--key-file", "--token", "--token-file", "ATTENTION_TOKEN"):
        assert flag in out
