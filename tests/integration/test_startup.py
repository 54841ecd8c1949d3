"""Start-up failures of the real `attention-server` command: each is one line on
stderr naming the port or file and what to do, exit code 2, nothing else."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from attention_server._proto.inference import grpc_service_pb2 as kpb
from attention_server._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from attention_server.grpc_api.server import create_server
from attention_server.settings import Settings
from tests.helpers import MODEL_DIR, REPOSITORY, ServerThread, place_model_file

FILES = ("model.json", "model.onnx", "roles.json", "tokenizer.json")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on (this socket, held open for the test)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def repository_with(tmp_path: Path, replaced: dict[str, bytes | None]) -> Path:
    """A repository with the exported model's files (hard-linked), some of them replaced
    by the given bytes or left out (None)."""
    folder = tmp_path / "repository" / MODEL_DIR.name
    folder.mkdir(parents=True)
    for name in FILES:
        if name not in replaced:
            place_model_file(MODEL_DIR / name, folder / name)
        elif (content := replaced[name]) is not None:
            (folder / name).write_bytes(content)
    return folder.parent


def start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attention_server", "--host", "127.0.0.1", "--metrics-host",
                           "127.0.0.1", "--http-port", "0", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_failure(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert "cannot start: " in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert done.stdout == ""
    return lines[0]


def test_busy_grpc_port_is_one_line_and_no_model_is_loaded(busy_port):
    done = start("--port", str(busy_port), "--metrics-port", "-1", "--model-repository", str(REPOSITORY))
    assert_one_line_failure(done, f"gRPC port 127.0.0.1:{busy_port}", "--port")


def test_busy_http_port_is_one_line(busy_port):
    done = start("--port", "0", "--metrics-port", "-1", "--http-port", str(busy_port), "--model-repository",
                 str(REPOSITORY))
    assert_one_line_failure(done, f"HTTP port 127.0.0.1:{busy_port} is already in use", "--http-port")


def test_the_grpc_port_is_bound_before_any_model_is_loaded(busy_port, tmp_path):
    # No model repository here: the port is what fails, so nothing was loaded first.
    settings = Settings(host="127.0.0.1", port=busy_port, metrics_port=-1, model_repository=tmp_path / "none")

    async def create() -> None:
        create_server(settings)

    with pytest.raises(OSError, match=f"gRPC port 127.0.0.1:{busy_port}"):
        asyncio.run(create())


def test_busy_metrics_port_names_the_port_and_the_setting(busy_port):
    done = start("--port", "0", "--metrics-port", str(busy_port), "--model-repository", str(REPOSITORY))
    assert_one_line_failure(done, f"metrics port 127.0.0.1:{busy_port} is already in use", "--metrics-port")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("tokenizer.json", None, "missing tokenizer file"),
    ("tokenizer.json", b'{"version": "1.0", "model": ', "not a valid tokenizer file"),
    ("tokenizer.json", b'{"version": "1.0"}', "not a valid tokenizer file"),
    ("model.json", b'{"name": "minilm-l6"', "unreadable model metadata"),
], ids=["tokenizer-missing", "tokenizer-truncated", "tokenizer-not-one", "model-json-truncated"])
def test_bad_model_file_is_named(tmp_path, name, content, expected):
    repository = repository_with(tmp_path, {name: content})
    done = start("--port", "0", "--metrics-port", "-1", "--model-repository", str(repository))
    assert_one_line_failure(done, f"{repository / MODEL_DIR.name / name}: {expected}", "re-export the model")


def test_corrupt_onnx_without_checksums_is_named(tmp_path):
    with (MODEL_DIR / "model.onnx").open("rb") as f:
        truncated = f.read(100_000)
    repository = repository_with(tmp_path, {"model.onnx": truncated})
    done = start("--port", "0", "--metrics-port", "-1", "--no-verify-checksums", "--model-repository",
                 str(repository))
    line = assert_one_line_failure(done, "ONNX Runtime cannot load it", "re-export the model")
    assert str(repository / MODEL_DIR.name / "model.onnx") in line


def test_missing_model_repository_is_one_line(tmp_path):
    done = start("--port", "0", "--metrics-port", "-1", "--model-repository", str(tmp_path / "none"))
    assert_one_line_failure(done, f"model repository {tmp_path / 'none'} does not exist", "make model")


def test_empty_model_repository_is_one_line(tmp_path):
    done = start("--port", "0", "--metrics-port", "-1", "--model-repository", str(tmp_path))
    assert_one_line_failure(done, "no models in", "make model")


def test_a_model_that_cannot_load_at_run_time_is_failed_precondition_without_server_paths(tmp_path):
    repository = repository_with(tmp_path, {})
    broken = repository / "broken"
    broken.mkdir()
    meta = json.loads((MODEL_DIR / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**meta, "name": "broken"}))
    place_model_file(MODEL_DIR / "model.onnx", broken / "model.onnx")
    (broken / "tokenizer.json").write_text("{ not json")
    with ServerThread(model_repository=repository, models=[MODEL_DIR.name], model_control_mode="explicit") as srv, \
            grpc.insecure_channel(srv.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            kpb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                kpb.RepositoryModelLoadRequest(model_name="broken"), timeout=120)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    details = err.value.details()
    assert "broken/tokenizer.json" in details and str(tmp_path) not in details, details
