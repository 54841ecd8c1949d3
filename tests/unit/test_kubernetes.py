"""deploy/kubernetes/, checked without a cluster: every overlay is rendered with
`kubectl kustomize`, validated against Kubernetes' OpenAPI schemas (1.30, the
oldest release the manifests target, and the newest that kubernetes-validate
ships) and against the CRDs vendored in deploy/kubernetes/crds/, and held to the
policies of docs/kubernetes.md: hardened pods, probes that work with the
server's TLS setting, drain timing, pinned images, resources, autoscaling.

kubectl is a requirement, like the model: a machine without it fails here."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
PRODUCTION = ("production", "production-keda")
# The oldest Kubernetes the manifests are written for (gRPC probes GA in 1.27, the
# PodDisruptionBudget's unhealthyPodEvictionPolicy in 1.31, beta and on from 1.27) and
# the newest schema kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_schemas.latest_version())
# Checked against the KServe SDK's generated models (from the same Go types as the
# CRDs), besides the vendored CRD where there is one: InferenceService's CRD is
# about 1 MB of YAML and is not vendored.
KSERVE_SDK_MODELS = {("serving.kserve.io", "v1beta1", "InferenceService"): "V1beta1InferenceService",
                     ("serving.kserve.io", "v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime"}
GRPC_PORT = 50051
KUBECTL_MISSING = ("kubectl is not on PATH: these tests render deploy/kubernetes with `kubectl kustomize` "
                   "(kustomize v5). Install kubectl 1.30 or later (the `kubectl` apt package of the Kubernetes "
                   "or Google Cloud SDK repositories, or the release binary) and run again.")


# -- rendering -------------------------------------------------------------------

@functools.cache
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(KUBECTL_MISSING)
    return path


@functools.cache
def _rendered(overlay: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(KUBE / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, a fresh copy each call (tests may change them)."""
    return [d for d in yaml.safe_load_all(_rendered(overlay)) if d]


def group_version_kind(doc: dict[str, Any]) -> tuple[str, str, str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    return group, version, doc["kind"]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"one {kind} {name or ''} expected, found {len(found)}"
    return found[0]


# -- the pods, whoever makes them ----------------------------------------------------

def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(what, pod spec) for every pod the overlay makes: a Deployment's template, or for
    KServe the InferenceService's pod fields with its ServingRuntime's containers."""
    for deployment in find(docs, "Deployment"):
        yield f"Deployment/{deployment['metadata']['name']}", deployment["spec"]["template"]["spec"]
    runtimes = {r["metadata"]["name"]: r for r in find(docs, "ServingRuntime")}
    for service in find(docs, "InferenceService"):
        predictor = service["spec"]["predictor"]
        runtime = runtimes[predictor["model"]["runtime"]]["spec"]
        pod = {k: v for k, v in predictor.items() if k not in ("model", "minReplicas", "maxReplicas")}
        pod["containers"] = runtime["containers"]
        pod["volumes"] = runtime.get("volumes", []) + predictor.get("volumes", [])
        yield f"InferenceService/{service['metadata']['name']}", pod


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: ConfigMaps (envFrom), then
    `env`, with a CPU limit taken through the downward API resolved as it would be."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "secrets are files; the environment carries paths"
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        assert "secretKeyRef" not in item["valueFrom"], f"{item['name']}: secrets are files, not variables"
        field = item["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu", field
        divisor = cpu_cores(field.get("divisor", "1"))
        env[item["name"]] = str(math.ceil(cpu_cores(container["resources"]["limits"]["cpu"]) / divisor))
    return env


def server_containers(overlay: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]]:
    """(what, pod spec, container, environment) for every container of every pod."""
    docs = render(overlay)
    for what, pod in pods(docs):
        for container in pod["containers"]:
            yield f"{overlay}: {what}/{container['name']}", pod, container, container_env(container, docs)


# -- schemas -------------------------------------------------------------------------

@functools.cache
def kubernetes_registry(version: str) -> Registry:
    """kubernetes-validate's definitions for `version`, strict (unknown fields are errors)."""
    definitions = kubernetes_schemas.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    return Resource.from_contents(definitions) @ Registry()


def kubernetes_type_errors(value: Any, definition: str, version: str, path: str) -> list[str]:
    """Errors of `value` as the Kubernetes type `definition` (io.k8s.api.core.v1.Container, ...)."""
    schema = {"$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}"}
    validator = jsonschema.Draft202012Validator(schema, registry=kubernetes_registry(version))
    return [f"{path}.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as `kubectl apply` (field validation Strict) reads it: an
    object with known properties takes no others, `nullable` allows null."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crds() -> dict[tuple[str, str, str], tuple[str, dict[str, Any]]]:
    """(group, version, kind) -> (file name, strict schema) for every vendored CRD."""
    found = {}
    for path in sorted((KUBE / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        for version in crd["spec"]["versions"]:
            key = (crd["spec"]["group"], version["name"], crd["spec"]["names"]["kind"])
            found[key] = (path.name, strict(version["schema"]["openAPIV3Schema"]))
    return found


def crd_errors(doc: dict[str, Any]) -> list[str]:
    name, schema = crds()[group_version_kind(doc)]
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are draft 4 with extensions
    return [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


_LIST = re.compile(r"list\[(.+)\]")
_DICT = re.compile(r"dict\(str, (.+)\)")
_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                            "object": (object,), "datetime": (str,), "date": (str,)}


def sdk_model_errors(value: Any, model: str, version: str, path: str) -> list[str]:
    """Errors of `value` as the KServe SDK's model `model`: unknown fields, wrong types,
    missing required fields. The Kubernetes types inside (V1Container, V1ObjectMeta, ...)
    are checked against Kubernetes' own schema for `version`. Imports `kserve`: call it
    through kserve_sdk_errors, in a process of its own."""
    import kserve.models

    if match := _LIST.fullmatch(model):
        if not isinstance(value, list):
            return [f"{path}: a list expected"]
        return [e for i, item in enumerate(value) for e in sdk_model_errors(item, match[1], version, f"{path}[{i}]")]
    if match := _DICT.fullmatch(model):
        if not isinstance(value, dict):
            return [f"{path}: a mapping expected"]
        return [e for k, item in value.items() for e in sdk_model_errors(item, match[1], version, f"{path}.{k}")]
    if model in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[model]) and not (model in ("int", "float") and isinstance(value, bool))
        return [] if ok else [f"{path}: {model} expected, not {value!r}"]
    cls = getattr(kserve.models, model, None)
    if cls is None:  # a kubernetes-client type: V1Container -> io.k8s.api.core.v1.Container
        match = re.fullmatch(r"(V\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)", model)
        assert match, model
        definitions = kubernetes_registry(version).contents("https://kubernetes.io/api/_definitions.json")["$defs"]
        (definition,) = [name for name in (f"io.k8s.api.core.{match[1].lower()}.{match[2]}",
                                           f"io.k8s.apimachinery.pkg.apis.meta.{match[1].lower()}.{match[2]}")
                         if name in definitions]
        return kubernetes_type_errors(value, definition, version, path)
    if not isinstance(value, dict):
        return [f"{path}: {model} expected"]
    attributes = {json_name: attribute for attribute, json_name in cls.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in attributes:
            errors.append(f"{path}.{key}: not a field of {model}")
        else:
            errors += sdk_model_errors(item, cls.openapi_types[attributes[key]], version, f"{path}.{key}")
    try:  # the generated setters refuse a missing required field (and values outside an enum)
        cls(**{attributes[k]: v for k, v in value.items() if k in attributes})
    except ValueError as exc:
        errors.append(f"{path}: {exc}")
    return errors


def kserve_sdk_errors(checks: list[tuple[dict[str, Any], str, str, str]]) -> list[list[str]]:
    """sdk_model_errors(*check) for each check, in a child process: importing `kserve`
    registers its own `inference.*` protobuf messages, which would clash with the
    server's in this one."""
    script = ("import json, sys\n"
              "from tests.unit.test_kubernetes import sdk_model_errors\n"
              "json.dump([sdk_model_errors(*check) for check in json.load(sys.stdin)], sys.stdout)\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(checks), capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- every overlay renders and validates ------------------------------------------------

def test_the_overlays_are_the_documented_ones():
    assert OVERLAYS == ["dev", "kserve", "production", "production-keda"], \
        "a new overlay: add it to docs/kubernetes.md and to PRODUCTION here if it is one"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates(overlay: str, version: str):
    errors, sdk_checks = [], []
    for doc in render(overlay):
        key, what = group_version_kind(doc), f"{doc['kind']}/{doc['metadata']['name']}"
        checked = False
        if key in crds():
            errors += [f"{what}: {e}" for e in crd_errors(doc)]
            errors += kubernetes_type_errors(doc["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
                                             version, f"{what}.metadata")
            checked = True
        if key in KSERVE_SDK_MODELS:
            sdk_checks.append((doc, KSERVE_SDK_MODELS[key], version, what))
            checked = True
        if not checked:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{what}: {doc['apiVersion']} is neither Kubernetes' own nor a vendored CRD "
                              "(deploy/kubernetes/crds/)")
    if sdk_checks:
        errors += [e for found in kserve_sdk_errors(sdk_checks) for e in found]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_in_the_overlays_namespace(overlay: str):
    """Nothing lands in whatever namespace kubectl's context happens to name."""
    namespaces = {d["metadata"].get("namespace") for d in render(overlay)}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


def test_the_validators_catch_mistakes():
    """A typo in each kind of object is found: the checks above are not vacuous."""
    docs = render("production-keda")
    deployment = one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": GRPC_PORT}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    scaled = one(docs, "ScaledObject")
    scaled["spec"]["minReplicas"] = 3
    assert crd_errors(scaled)
    monitor = one(docs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert crd_errors(monitor)
    kserve = render("kserve")
    runtime = one(kserve, "ServingRuntime")
    runtime["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": GRPC_PORT}
    runtime["spec"]["protocolVersion"] = "v2"
    assert len(crd_errors(runtime)) == 2, crd_errors(runtime)
    service = one(kserve, "InferenceService")
    del service["spec"]["predictor"]["model"]["modelFormat"]
    service["spec"]["predictor"]["minReplica"] = 2
    runtime_errors, service_errors = kserve_sdk_errors([(runtime, "V1alpha1ServingRuntime", "1.30.0", "runtime"),
                                                        (service, "V1beta1InferenceService", "1.30.0", "isvc")])
    assert len(runtime_errors) == 2, runtime_errors
    assert len(service_errors) == 2, service_errors


def test_every_vendored_crd_is_used_and_says_its_version():
    used = {group_version_kind(d) for overlay in OVERLAYS for d in render(overlay)}
    for key, (name, _) in crds().items():
        assert key in used, f"{name}: no overlay has a {key[2]}; drop the file"
        header = (KUBE / "crds" / name).read_text().split("apiVersion:", 1)[0]
        assert re.search(r"\b[0-9a-f]{40}\b", header), f"{name}: the comment on top names the upstream commit"


# -- the pods ------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened(overlay: str):
    docs = render(overlay)
    assert list(pods(docs)), f"{overlay} makes no pod"
    for what, pod in pods(docs):
        context = pod.get("securityContext", {})
        assert pod["automountServiceAccountToken"] is False, what
        assert pod["enableServiceLinks"] is False, f"{what}: a Service named attention would set ATTENTION_PORT"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert not [v for v in volumes.values() if "hostPath" in v], what
        for container in pod["containers"]:
            own = container.get("securityContext", {})
            where = f"{what}/{container['name']}"
            assert own.get("runAsNonRoot", context.get("runAsNonRoot")) is True, where
            assert own.get("runAsUser", context.get("runAsUser", 0)) != 0, where
            seccomp = own.get("seccompProfile", context.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert own["allowPrivilegeEscalation"] is False, where
            assert own["readOnlyRootFilesystem"] is True, where
            assert own.get("privileged", False) is False, where
            assert own["capabilities"] == {"drop": ["ALL"]}, where
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{where}: /tmp, the one place the server writes"
            assert not [m for m in mounts.values() if "subPath" in m], f"{where}: a subPath never sees a rotated Secret"


def health_names() -> tuple[str, ...]:
    from attention_server.grpc_api.server import HEALTH_NAMES

    return HEALTH_NAMES


def flag(command: list[str], name: str, default: str) -> str:
    return command[command.index(name) + 1] if name in command else default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_grpc_health_the_way_tls_allows(overlay: str):
    """Plaintext: the kubelet's own gRPC probe. TLS: the kubelet cannot do TLS, so the
    image's health client runs in the container, on the same port."""
    for where, _, container, env in server_containers(overlay):
        tls = "ATTENTION_TLS_CERT_FILE" in env
        port = int(env.get("ATTENTION_PORT", GRPC_PORT))
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if tls:
                assert "grpc" not in probe, f"{where}: {kind}: a gRPC probe cannot speak TLS"
                command = probe["exec"]["command"]
                assert command[0] == "attention-healthcheck", f"{where}: {kind}"
                assert flag(command, "--target", "localhost:50051").rsplit(":", 1)[1] == str(port), where
                service = flag(command, "--service", "")
                # The health client's own deadline ends before the kubelet gives up on it.
                assert float(flag(command, "--timeout", "3")) < probe["timeoutSeconds"], f"{where}: {kind}"
            else:
                assert probe["grpc"]["port"] == port, f"{where}: {kind}"
                service = probe["grpc"].get("service", "")
            assert service in health_names(), f"{where}: {kind} asks for {service!r}"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, f"{where}: time to load the model"


def prestop_seconds(container: dict[str, Any]) -> float:
    handler = container["lifecycle"]["preStop"]
    if "sleep" in handler:
        return float(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command  # the image is Debian: /bin/sleep exists
    return float(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_outlives_the_endpoint_removal_and_the_drain(overlay: str):
    """terminationGracePeriodSeconds counts from the preStop hook: sleep, then SIGTERM,
    then ATTENTION_GRACE_PERIOD for calls in flight and the server's closing grace."""
    from attention_server.grpc_api.server import CLOSING_GRACE
    from attention_server.settings import Settings

    for where, pod, container, env in server_containers(overlay):
        sleep = prestop_seconds(container)
        assert sleep >= 5, f"{where}: endpoints, kube-proxy and DNS need a few seconds"
        grace = float(env.get("ATTENTION_GRACE_PERIOD", Settings.model_fields["grace_period"].default))
        assert pod["terminationGracePeriodSeconds"] > sleep + grace + CLOSING_GRACE, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str):
    for where, _, container, _ in server_containers(overlay):
        image = container["image"]
        name, _, digest = image.partition("@")
        _, _, tag = name.rpartition("/")[2].partition(":")
        assert digest.startswith("sha256:") or tag not in ("", "latest"), f"{where}: {image}"
        assert name.split(":")[0].endswith("attention-service"), f"{where}: {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_thread_pools_follow_the_cpu_limit(overlay: str):
    """The server counts the node's cores; each pod tells it its CPU limit instead."""
    for where, _, container, env in server_containers(overlay):
        cores = math.ceil(cpu_cores(container["resources"]["limits"]["cpu"]))
        assert env["ATTENTION_INSTANCES"] == env["ATTENTION_INTRA_OP_THREADS"] == str(cores), where
        assert "memory" in container["resources"]["limits"], where


@pytest.mark.parametrize("overlay", PRODUCTION)
def test_production_has_fixed_resources_tls_tokens_and_three_replicas(overlay: str):
    docs = render(overlay)
    for where, pod, container, env in server_containers(overlay):
        resources = container["resources"]
        for name in ("cpu", "memory"):
            assert resources["requests"][name] == resources["limits"][name], f"{where}: {name} (Guaranteed QoS)"
        volumes = {v["name"]: v for v in pod["volumes"]}
        secret_folders = [m["mountPath"] for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
        for name in ("ATTENTION_TLS_CERT_FILE", "ATTENTION_TLS_KEY_FILE", "ATTENTION_TLS_CLIENT_CA_FILE",
                     "ATTENTION_AUTH_TOKENS_FILE"):
            assert any(env[name].startswith(folder + "/") for folder in secret_folders), f"{where}: {name}"
        assert env["ATTENTION_MODEL_CONTROL_MODE"] == "none", where
        if find(docs, "ServiceMonitor"):  # with TLS on, /metrics binds to 127.0.0.1 unless told otherwise
            assert env["ATTENTION_METRICS_HOST"] not in ("127.0.0.1", "::1", "localhost"), where
    assert min_replicas(docs, one(docs, "Deployment")) >= 3
    assert find(docs, "NetworkPolicy")


# -- scaling ---------------------------------------------------------------------------

def autoscalers(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> list[dict[str, Any]]:
    name = deployment["metadata"]["name"]
    return [d for d in find(docs, "HorizontalPodAutoscaler") + find(docs, "ScaledObject")
            if d["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
            and d["spec"]["scaleTargetRef"]["name"] == name]


def min_replicas(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> int:
    (scaler,) = autoscalers(docs, deployment)
    return scaler["spec"]["minReplicaCount" if scaler["kind"] == "ScaledObject" else "minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_owner_of_the_replica_count(overlay: str):
    """An autoscaler and a `replicas` in the manifest fight at every apply; KEDA's HPA and
    a plain HPA fight all the time."""
    docs = render(overlay)
    for deployment in find(docs, "Deployment"):
        scalers = autoscalers(docs, deployment)
        assert len(scalers) <= 1, [s["kind"] for s in scalers]
        assert ("replicas" in deployment["spec"]) != bool(scalers), overlay
        scales_on_cpu = any(m.get("resource", {}).get("name") == "cpu" for s in scalers
                            for m in s["spec"].get("metrics", [])) or any(
            t["type"] == "cpu" for s in scalers for t in s["spec"].get("triggers", []))
        if scales_on_cpu:  # utilization is relative to the request
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                assert "cpu" in container["resources"]["requests"], overlay


def test_keda_scales_on_the_queued_tokens_of_its_own_namespace():
    from attention_server.settings import Settings

    docs = render("production-keda")
    scaled = one(docs, "ScaledObject")
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"prometheus", "cpu"}
    prometheus = triggers["prometheus"]
    query = prometheus["metadata"]["query"]
    assert "attention_queue_tokens" in query
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in query
    metrics = (ROOT / "server" / "attention_server" / "metrics.py").read_text()
    assert '"attention_queue_tokens"' in metrics, "the metric the query reads is the server's"
    assert prometheus["metricType"] == "AverageValue", "a target per replica"
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = container_env(container, docs)
    limit = int(env.get("ATTENTION_MAX_QUEUE_TOKENS", Settings.model_fields["max_queue_tokens"].default))
    assert 0 < float(prometheus["metadata"]["threshold"]) <= limit / 4, "scale out long before calls are refused"
    assert scaled["spec"]["minReplicaCount"] >= 3


# -- services, disruption, monitoring ---------------------------------------------------

def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "kserve"])
def test_services_budget_and_monitor_reach_the_pods(overlay: str):
    docs = render(overlay)
    deployment = one(docs, "Deployment")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for service in services.values():
        assert selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert ports.get(port["targetPort"]) == port["port"], port
    headless = services["attention-headless"]["spec"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses", False)
    assert [p["port"] for p in headless["ports"]] == [GRPC_PORT]
    assert services["attention"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert selects(budget["selector"]["matchLabels"], labels) and budget["maxUnavailable"] >= 1
    for monitor in find(docs, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            scraped = [s for s in services.values()
                       if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                       and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
            assert len(scraped) == 1, "each pod is scraped once"
            assert endpoint["path"] == "/metrics" and ports[endpoint["port"]] == 8002


# -- settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_the_servers(overlay: str, monkeypatch: pytest.MonkeyPatch):
    """Every ATTENTION_* variable is a setting (or the health client's), and the server
    accepts their values."""
    from attention_server import healthcheck
    from attention_server.settings import Settings

    fields = {f"ATTENTION_{name.upper()}" for name in Settings.model_fields}
    health_client = set(re.findall(r"ATTENTION_HEALTHCHECK_[A-Z_]+", Path(healthcheck.__file__).read_text()))
    known = fields | health_client
    for where, _, _, env in server_containers(overlay):
        ours = {k: v for k, v in env.items() if k.startswith("ATTENTION_")}
        assert set(ours) <= known, f"{where}: unknown {sorted(set(ours) - known)}"
        for name in [k for k in os.environ if k.startswith("ATTENTION_")]:
            monkeypatch.delenv(name)
        for name, value in ours.items():
            monkeypatch.setenv(name, value)
        settings = Settings()
        assert settings.port == GRPC_PORT and settings.metrics_port == 8002, where
        assert str(settings.model_repository) == "/models", f"{where}: the image's exported model"


# -- KServe ------------------------------------------------------------------------------

def test_kserve_serves_the_open_inference_protocol_over_grpc():
    docs = render("kserve")
    runtime = one(docs, "ServingRuntime")["spec"]
    service = one(docs, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == one(docs, "ServingRuntime")["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["supportedModelFormats"]}
    assert {"v2", "grpc-v2"} <= set(runtime["protocolVersions"])
    assert model["protocolVersion"] in runtime["protocolVersions"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container"
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("h2c", GRPC_PORT)]
    assert "storageUri" not in model, "the model is in the image"


# -- docs ----------------------------------------------------------------------------------

def test_docs_describe_every_overlay_and_the_sdk_target():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/kubernetes/overlays/{overlay}" in text, overlay
    assert "dns:///attention-headless.<namespace>.svc.cluster.local:50051" in text
    assert "(kubernetes.md)" in (ROOT / "docs" / "operations.md").read_text()
    scaled = one(render("production-keda"), "ScaledObject")
    threshold = next(t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]["threshold"]
    assert f"`{threshold}`" in text, "the docs give the KEDA threshold in force"


def test_kubernetes_validate_is_a_declared_dependency():
    requirements = (ROOT / "requirements" / "dev.in").read_text().split()
    assert "kubernetes-validate" in requirements
