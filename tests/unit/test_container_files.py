"""The container files, checked without a Docker engine: the hardening policies
(docs/security.md) read straight from the files, so removing one fails a test
here. The linters (hadolint, the compose spec) run in `make lint`."""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]  # not tests.helpers: these tests need no server code
COMPOSE = ROOT / "docker-compose.yml"
SECURE = ROOT / "docker-compose.secure.yml"
MAKE_SECRETS = ROOT / "deploy" / "compose" / "make-secrets.sh"
SECRETS_DIR = "deploy/compose/secrets"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
LOOPBACK = ("127.0.0.1", "::1", "[::1]")
# The server settings that name files holding key material or token hashes.
SECRET_FILE_SETTINGS = ("ATTENTION_TLS_CERT_FILE", "ATTENTION_TLS_KEY_FILE", "ATTENTION_TLS_CLIENT_CA_FILE",
                        "ATTENTION_AUTH_TOKENS_FILE")


# -- reading the files -------------------------------------------------------------

def dockerfile_stages(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(FROM arguments, [(INSTRUCTION, arguments), ...]), ...], continuations joined, comments dropped."""
    joined: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        joined.append(buffer + line)
        buffer = ""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in joined:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            stages.append((arguments, []))
        elif stages:
            stages[-1][1].append((keyword, arguments))
    return stages


def runtime_stage() -> list[tuple[str, str]]:
    stages = dockerfile_stages((ROOT / "Dockerfile").read_text())
    assert stages[-1][0].endswith(" AS runtime"), "the last stage is the image that runs"
    return stages[-1][1]


def service(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["services"]["attention"]


def secure_service() -> dict[str, Any]:
    """The service as `docker compose -f docker-compose.yml -f docker-compose.secure.yml` sees it,
    for the keys checked here (compose's merge rules: mappings merge, ports and secrets add up,
    healthcheck.test is replaced)."""
    base, extra = service(), service(SECURE)
    merged = {**base, **{k: v for k, v in extra.items() if k not in ("environment", "secrets", "ports")}}
    merged["environment"] = {**base.get("environment", {}), **extra.get("environment", {})}
    merged["secrets"] = [*base.get("secrets", []), *extra.get("secrets", [])]
    merged["ports"] = [*base.get("ports", []), *extra.get("ports", [])]
    merged["healthcheck"] = {**base.get("healthcheck", {}), **extra.get("healthcheck", {})}
    return merged


def secret_target(entry: str | dict[str, Any]) -> str:
    """Where a service's secret is mounted (compose: /run/secrets/<target or source>)."""
    if isinstance(entry, str):
        return f"/run/secrets/{entry}"
    target = entry.get("target", entry["source"])
    return target if target.startswith("/") else f"/run/secrets/{target}"


def uid_gid(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"user {user!r}: numeric uid:gid, so Kubernetes' runAsNonRoot can check it"
    return int(uid), int(gid)


# -- the image -------------------------------------------------------------------------

def test_every_base_image_is_pinned_by_digest():
    stages = dockerfile_stages((ROOT / "Dockerfile").read_text())
    names: set[str] = set()
    for arguments, _ in stages:
        words = [w for w in arguments.split() if not w.startswith("--")]
        image = words[0]
        if image not in names:  # FROM an earlier stage needs no digest
            assert DIGEST.search(image), f"FROM {image}: pin the base by digest (image:tag@sha256:<64 hex>)"
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])


def test_runtime_runs_as_a_non_root_user_and_owns_none_of_its_files():
    steps = runtime_stage()
    users = [i for i, (keyword, _) in enumerate(steps) if keyword == "USER"]
    assert users, "the runtime stage sets USER"
    uid, gid = uid_gid(steps[users[-1]][1])
    assert uid != 0 and gid != 0
    # Installed and copied as root, then USER: the runtime user can read the code and model, not change them.
    last_write = max(i for i, (keyword, _) in enumerate(steps) if keyword in ("RUN", "COPY", "ADD"))
    assert users[-1] > last_write, "USER comes after every RUN/COPY/ADD"
    for keyword, arguments in steps:
        assert "--chown" not in arguments and "--chmod" not in arguments, f"{keyword} {arguments}: files stay root's"
        if keyword == "RUN":
            assert not re.search(r"\bch(own|mod)\b", arguments), f"RUN {arguments}: files stay root's"
    assert any(k == "RUN" and f"--uid {uid}" in a for k, a in steps), "the USER is the account the image creates"


def test_runtime_stage_installs_no_export_tooling():
    text = " ".join(arguments for _, arguments in runtime_stage())
    assert "[export]" not in text and "torch" not in text
    assert ("COPY", "--from=export /models /models") in runtime_stage()


def test_image_health_check_uses_grpc_health():
    checks = [arguments for keyword, arguments in runtime_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert re.search(r'CMD \["attention-healthcheck"', checks[0]), "exec form, the gRPC health client"


def test_dockerignore_keeps_key_material_out_of_the_build_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {SECRETS_DIR, "**/*.key", "**/*.pem"} <= patterns


# -- docker-compose.yml ----------------------------------------------------------------

def test_compose_health_check_uses_grpc_health_and_stop_grace_covers_drain():
    attention = service()
    assert attention["healthcheck"]["test"][1] == "attention-healthcheck"
    grace = float(attention["environment"]["ATTENTION_GRACE_PERIOD"])
    assert float(attention["stop_grace_period"].rstrip("s")) > grace


def test_compose_root_is_read_only_with_a_tmpfs_for_tmp():
    attention = service()
    assert attention["read_only"] is True
    tmp = [t for t in attention["tmpfs"] if t.split(":", 1)[0] == "/tmp"]
    assert tmp, "the server writes a temporary file while binding: /tmp must be a tmpfs"
    options = tmp[0].partition(":")[2].split(",")
    assert {"noexec", "nosuid", "nodev"} <= set(options) and any(o.startswith("size=") for o in options)


def test_compose_drops_every_capability_and_privilege_escalation():
    attention = service()
    assert attention["cap_drop"] == ["ALL"]
    assert "cap_add" not in attention and not attention.get("privileged", False)
    assert "no-new-privileges:true" in attention["security_opt"]


def test_compose_runs_the_image_user():
    user = uid_gid(service()["user"])
    image_user = uid_gid(next(a for k, a in reversed(runtime_stage()) if k == "USER"))
    assert user == image_user and user[0] != 0


def test_compose_limits_memory_cpu_and_pids_and_sizes_threads_to_the_cpus():
    attention = service()
    limits = attention["deploy"]["resources"]["limits"]
    assert {"memory", "cpus", "pids"} <= limits.keys()
    assert int(limits["pids"]) > 0
    cpus = float(limits["cpus"])
    environment = attention["environment"]
    # The server counts the host's cores; unset, it would start one instance per host core under a smaller quota.
    assert 1 <= int(environment["ATTENTION_INSTANCES"]) <= cpus
    assert 1 <= int(environment["ATTENTION_INTRA_OP_THREADS"]) <= cpus


def test_compose_rotates_logs():
    logging = service()["logging"]
    assert logging["driver"] == "json-file"
    assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 1


@pytest.mark.parametrize("secure", [False, True], ids=["default", "secure"])
def test_compose_publishes_ports_on_loopback_only(secure: bool):
    attention = secure_service() if secure else service()
    assert attention["ports"], "the service publishes its ports"
    for port in attention["ports"]:
        if isinstance(port, dict):
            host = port.get("host_ip")
        else:
            host = port.rsplit(":", 2)[0] if port.count(":") >= 2 else None
        assert host in LOOPBACK, f"port {port!r}: publish on 127.0.0.1 (open it on purpose, see the comment)"


# -- docker-compose.secure.yml -----------------------------------------------------------

def test_secure_compose_turns_on_mutual_tls_and_tokens_from_mounted_secret_files():
    attention = secure_service()
    environment = attention["environment"]
    mounted = {secret_target(s) for s in attention["secrets"]}
    for name in SECRET_FILE_SETTINGS:
        assert environment.get(name) in mounted, f"{name} names a file mounted as a compose secret"
    secrets = yaml.safe_load(SECURE.read_text())["secrets"]
    for name, definition in secrets.items():
        assert set(definition) == {"file"}, f"secret {name}: from a file, never from an environment value"
        assert definition["file"].startswith(f"./{SECRETS_DIR}/")


@pytest.mark.parametrize("path", [COMPOSE, SECURE], ids=lambda p: p.name)
def test_no_secret_travels_in_the_environment(path: Path):
    for name, value in service(path).get("environment", {}).items():
        if re.search(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", name):
            assert name.endswith("_FILE") and str(value).startswith("/run/secrets/"), \
                f"{name}: a path to a mounted secret file, not the secret"


def test_secure_compose_keeps_model_control_off():
    assert secure_service()["environment"]["ATTENTION_MODEL_CONTROL_MODE"] == "none"


def test_secure_compose_health_check_speaks_mutual_tls_with_mounted_files():
    attention = secure_service()
    test = attention["healthcheck"]["test"]
    assert test[:2] == ["CMD", "attention-healthcheck"]
    mounted = {secret_target(s) for s in attention["secrets"]}
    flags = dict(zip(test[2::2], test[3::2], strict=True))
    assert {"--ca-file", "--cert-file", "--key-file"} <= flags.keys()
    assert {flags["--ca-file"], flags["--cert-file"], flags["--key-file"]} <= mounted
    assert not any("token" in word.lower() for word in test), "health needs no token"


# -- deploy/compose/make-secrets.sh ------------------------------------------------------

@pytest.fixture(scope="module")
def made_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("compose") / "secrets"
    done = subprocess.run(["sh", str(MAKE_SECRETS), str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


def test_make_secrets_writes_every_file_the_secure_compose_mounts(made_secrets: Path):
    secrets = yaml.safe_load(SECURE.read_text())["secrets"]
    for definition in secrets.values():
        assert (made_secrets / Path(definition["file"]).name).is_file(), definition["file"]
    assert stat.S_IMODE(made_secrets.stat().st_mode) == 0o700
    for never_mounted in ("ca.key", "client.key", "infer.token"):
        assert stat.S_IMODE((made_secrets / never_mounted).stat().st_mode) == 0o600


def test_make_secrets_tokens_file_holds_only_the_hash(made_secrets: Path):
    token = (made_secrets / "infer.token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    lines = [line for line in (made_secrets / "tokens").read_text().splitlines() if not line.startswith("#")]
    assert lines == [f"infer:{hashlib.sha256(token.encode()).hexdigest()}"]
    assert token not in (made_secrets / "tokens").read_text()


def test_make_secrets_certificates_work_for_grpc_mutual_tls(made_secrets: Path):
    """A real gRPC handshake on `localhost` (the name the health check uses) with the
    generated files: the health check's certificate gets in, no certificate does not."""
    def read(name: str) -> bytes:
        return (made_secrets / name).read_bytes()

    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([(read("server.key"), read("server.crt"))],
                                              root_certificates=read("client-ca.crt"), require_client_auth=True)
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        def check(**client: bytes) -> int:
            channel_credentials = grpc.ssl_channel_credentials(root_certificates=read("ca.crt"), **client)
            with grpc.secure_channel(f"localhost:{port}", channel_credentials) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status

        assert check(certificate_chain=read("healthcheck.crt"),
                     private_key=read("healthcheck.key")) == health_pb2.HealthCheckResponse.SERVING
        assert check(certificate_chain=read("client.crt"),
                     private_key=read("client.key")) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            check()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


# -- docs/security.md's Kubernetes manifest --------------------------------------------------

def kubernetes_documents() -> list[dict[str, Any]]:
    text = (ROOT / "docs" / "security.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    documents = [d for block in blocks for d in yaml.safe_load_all(block) if isinstance(d, dict) and "kind" in d]
    assert documents, "docs/security.md shows a Kubernetes manifest"
    return documents


def test_documented_kubernetes_pod_is_hardened_and_takes_secrets_as_files():
    deployment = next(d for d in kubernetes_documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["medium"] == "Memory"
    for mount in mounts.values():
        assert "subPath" not in mount, "a subPath mount never sees a rotated secret"
    environment = {e["name"]: e for e in container["env"]}
    assert all("valueFrom" not in e for e in environment.values()), "secrets as files, env for paths only"
    secret_mounts = [path for path, m in mounts.items() if "secret" in volumes[m["name"]]]
    for name in SECRET_FILE_SETTINGS:
        assert any(environment[name]["value"].startswith(path + "/") for path in secret_mounts), name
    assert environment["ATTENTION_MODEL_CONTROL_MODE"]["value"] == "none"
