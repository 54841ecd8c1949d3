"""The container files, checked with the linters that run without a Docker engine."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists() or shutil.which(name), f"{name} is missing: it is in requirements/dev.txt"
    return str(path if path.exists() else shutil.which(name))


def test_dockerfile_passes_hadolint():
    done = subprocess.run([_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_spec():
    done = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_health_check_uses_grpc_health_and_stop_grace_covers_drain():
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["attention"]
    assert service["healthcheck"]["test"][1] == "attention-healthcheck"
    grace = float(service["environment"]["ATTENTION_GRACE_PERIOD"])
    assert float(service["stop_grace_period"].rstrip("s")) > grace


def test_runtime_stage_installs_no_export_tooling():
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    assert "[export]" not in runtime and "torch" not in runtime
    assert "COPY --from=export /models /models" in runtime
