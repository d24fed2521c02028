"""The deployment files: Dockerfile, docker-compose.yml and the kustomize overlays in deploy/k8s.

Static checks only, no Docker engine, cluster or network. The overlays are rendered with
``kubectl kustomize``. YAML is read with PyYAML where it is importable; otherwise with kubectl's
own YAML parser (``kubectl label --local -o json`` prints the objects as JSON without contacting
a cluster). Without either, the checks that need parsed YAML are skipped with that reason.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
from lotse_contracts import topics as topic_names
from lotse_runtime.cli import DEFAULT_PORTS

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
SERVICES = topic_names.SERVICES
UID = 10001
HTTP_PORT = 8000
STRIMZI_API = "kafka.strimzi.io/v1beta2"


# -- reading YAML ------------------------------------------------------------------------------


def _pyyaml() -> ModuleType | None:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        return None


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    return "/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None


def _run_kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed (expected at /usr/bin/kubectl)")
    # No kubeconfig: nothing here may reach for a cluster.
    env = {**os.environ, "KUBECONFIG": os.devnull}
    return subprocess.run(
        [kubectl, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )


def _json_stream(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    values: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return values
        value, index = decoder.raw_decode(text, index)
        values.append(value)


def _kubectl_objects(manifest: str) -> list[Obj]:
    """Kubernetes-style objects (apiVersion, kind, metadata.name) as JSON, via kubectl's parser."""
    # Removing a label nobody sets is the no-op that makes `kubectl label` print the objects.
    result = _run_kubectl(
        "label", "--local", "-f", "-", "-o", "json", "lotse-unused-", stdin=manifest
    )
    assert result.returncode == 0, result.stderr
    objects: list[Obj] = []
    for value in _json_stream(result.stdout):
        objects.extend(value["items"] if value.get("kind") == "List" else [value])
    return objects


def parse_documents(manifest: str) -> list[Obj]:
    """The objects of a multi-document Kubernetes manifest."""
    yaml = _pyyaml()
    if yaml is not None:
        return [doc for doc in yaml.safe_load_all(manifest) if doc is not None]
    if _kubectl() is None:
        pytest.skip("neither PyYAML nor kubectl is available to read YAML")
    return _kubectl_objects(manifest)


_WRAPPER = {"apiVersion": "lotse.test/v1", "kind": "ParsedYaml", "metadata": {"name": "parsed"}}


def parse_mapping(path: Path) -> Obj:
    """A single YAML mapping that is not a Kubernetes object (compose file, collector config)."""
    text = path.read_text(encoding="utf-8")
    yaml = _pyyaml()
    if yaml is not None:
        loaded = yaml.safe_load(text)
        assert isinstance(loaded, dict), f"{path} is not a YAML mapping"
        return loaded
    if _kubectl() is None:
        pytest.skip(
            f"{path.name}: PyYAML is not importable and kubectl (the fallback parser) is not "
            "installed, so its structure cannot be checked"
        )
    # Give the mapping the three keys of a Kubernetes object so kubectl will parse it.
    clash = sorted(key for key in _WRAPPER if re.search(rf"^{key}:", text, re.MULTILINE))
    assert not clash, f"{path} has top-level keys {clash}; cannot wrap it for kubectl"
    header = "apiVersion: lotse.test/v1\nkind: ParsedYaml\nmetadata:\n  name: parsed\n"
    [parsed] = _kubectl_objects(header + text)
    for key in _WRAPPER:
        parsed.pop(key)
    return parsed


# -- helpers -----------------------------------------------------------------------------------


def _env_mapping(environment: Any) -> dict[str, str]:
    """Compose `environment`, written as a mapping or as a list of KEY=VALUE."""
    if isinstance(environment, dict):
        return {str(k): "" if v is None else str(v) for k, v in environment.items()}
    assert isinstance(environment, list), f"unexpected environment: {environment!r}"
    pairs = (str(item).split("=", 1) for item in environment)
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def _selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector selects an object with these labels."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj.get("kind") == kind]


def _named(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [obj for obj in _of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@cache
def _render(path: str) -> str:
    result = _run_kubectl("kustomize", str(K8S / path))
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def rendered(path: str) -> list[Obj]:
    objects = parse_documents(_render(path))
    assert objects, f"kubectl kustomize {path} rendered nothing"
    return objects


def _deployments(objects: list[Obj]) -> dict[str, Obj]:
    deployments = {obj["metadata"]["name"]: obj for obj in _of_kind(objects, "Deployment")}
    assert set(deployments) == {f"lotse-{service}" for service in SERVICES}
    return deployments


def _container(deployment: Obj) -> tuple[Obj, Obj]:
    pod = deployment["spec"]["template"]["spec"]
    containers = pod["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container expected"
    return pod, containers[0]


def _probe_port(container: Obj, probe: Obj) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"probe port {port!r} is not a named container port"
    return int(named[port])


# -- Dockerfile --------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    instructions = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_on_python_311_slim_with_frozen_uv_sync() -> None:
    instructions = _dockerfile_instructions()
    global_args: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            global_args[name] = default
    bases = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            image = rest.split()[0]
            for name, value in global_args.items():
                image = image.replace("${" + name + "}", value).replace("$" + name, value)
            bases.append(image)
    python_bases = [image for image in bases if image.startswith("python:")]
    assert len(python_bases) >= 2, f"build and runtime stages on python, got {bases}"
    assert set(python_bases) == {"python:3.11-slim"}
    assert bases[-1] == "python:3.11-slim", "the runtime stage is the last one"

    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"uv sync --frozen --no-dev\b", runs)
    envs = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "UV_PROJECT_ENVIRONMENT=/app/.venv" in envs


def test_dockerfile_runtime_runs_as_uid_10001_without_a_shell() -> None:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = instructions[last_from:]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] == str(UID)
    assert ("ARG", "SERVICE") in runtime or any(
        keyword == "ARG" and rest.startswith("SERVICE=") for keyword, rest in runtime
    )
    assert re.search(
        r"LOTSE_SERVICE=\$\{?SERVICE\}?", " ".join(r for k, r in runtime if k == "ENV")
    )
    assert any(k == "COPY" and "/app/.venv" in r and "--from=" in r for k, r in runtime)

    cmds = [rest for keyword, rest in runtime if keyword == "CMD"]
    assert len(cmds) == 1
    command = json.loads(cmds[0])  # exec form: no shell in between
    assert isinstance(command, list)
    assert command[0] == "python"


def _dockerfile_command() -> list[str]:
    [cmd] = [rest for keyword, rest in _dockerfile_instructions() if keyword == "CMD"]
    command = json.loads(cmd)
    assert isinstance(command, list)
    return [str(part) for part in command]


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_command_runs_the_factory_named_by_lotse_service(service: str) -> None:
    command = _dockerfile_command()
    assert command[:2] == ["python", "-c"], "the launcher is a python one-liner"
    # Run the image's launcher here, with uvicorn.run replaced by a recorder.
    probe = (
        "import json, uvicorn\n"
        "uvicorn.run = lambda app, **kw: print(json.dumps({'app': app, **kw}))\n"
        f"exec(compile({command[2]!r}, '<CMD>', 'exec'))\n"
    )
    env = {**os.environ, "LOTSE_SERVICE": service}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout.strip().splitlines()[-1])
    assert call["app"] == f"lotse_{service}.app:create_app"
    assert call["factory"] is True
    assert call["host"] == "0.0.0.0"
    assert call["port"] == HTTP_PORT


def test_dockerfile_command_rejects_an_unknown_service() -> None:
    command = _dockerfile_command()
    env = {**os.environ, "LOTSE_SERVICE": "nonexistent"}
    result = subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "nonexistent" in result.stderr


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for required in (".venv", "var", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"):
        assert required in entries, f".dockerignore lacks {required}"
    for needed in ("uv.lock", "pyproject.toml", "contracts", "libs", "services"):
        assert needed not in entries, f".dockerignore must not exclude {needed}"


# -- docker-compose.yml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Obj:
    return parse_mapping(COMPOSE_FILE)


def _database_url(service_config: Obj) -> tuple[str, str]:
    env = _env_mapping(service_config.get("environment", {}))
    keys = [key for key in env if key.endswith("DATABASE_URL")]
    assert len(keys) == 1, f"exactly one database URL expected, got {keys}"
    return keys[0], env[keys[0]]


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_has_own_database_kafka_and_readiness_check(
    compose: Obj, service: str
) -> None:
    config = compose["services"][service]
    build = config["build"]
    assert isinstance(build, dict)
    assert _env_mapping(build.get("args", {})).get("SERVICE") == service

    env = _env_mapping(config.get("environment", {}))
    key, url = _database_url(config)
    assert key in (f"LOTSE_{service.upper()}_DATABASE_URL", "DATABASE_URL")
    parts = urlsplit(url)
    assert parts.scheme.startswith("postgresql"), url
    assert parts.hostname == "postgres", url
    assert parts.path == f"/{service}", f"{service} must use its own database: {url}"
    assert env.get("LOTSE_KAFKA_BOOTSTRAP") == "kafka:9092"
    assert env.get("LOTSE_OTLP_ENDPOINT", "").startswith("http://otel-collector:4318")

    test = config["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else str(test)
    assert f"127.0.0.1:{HTTP_PORT}/readyz" in command or f"localhost:{HTTP_PORT}/readyz" in command

    depends_on = config["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs conditions"
    for dependency in ("kafka", "postgres"):
        assert depends_on[dependency]["condition"] == "service_healthy", dependency

    ports = [str(port) for port in config.get("ports", [])]
    assert f"{DEFAULT_PORTS[service]}:{HTTP_PORT}" in ports


def test_compose_services_do_not_share_a_database(compose: Obj) -> None:
    urls = [urlsplit(_database_url(compose["services"][s])[1]) for s in SERVICES]
    assert len({url.path for url in urls}) == len(SERVICES)
    assert len({url.username for url in urls}) == len(SERVICES)


def test_compose_infrastructure(compose: Obj) -> None:
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.1"
    env = _env_mapping(kafka["environment"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"
    assert "healthcheck" in kafka

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16-alpine"
    assert "healthcheck" in postgres
    mounts = [str(volume) for volume in postgres.get("volumes", [])]
    init = [m for m in mounts if m.startswith("./deploy/compose/init-databases.sql:")]
    assert len(init) == 1, "deploy/compose/init-databases.sql is mounted"
    assert ":/docker-entrypoint-initdb.d/" in init[0]

    collector = services["otel-collector"]
    assert str(collector["image"]).startswith("otel/opentelemetry-collector-contrib")
    mounts = [str(volume) for volume in collector.get("volumes", [])]
    [config_mount] = [m for m in mounts if m.startswith("./deploy/compose/otel-collector.yaml:")]
    target = config_mount.split(":")[1]
    assert any(f"--config={target}" in str(arg) for arg in collector.get("command", []))


def test_compose_init_script_creates_one_database_per_service() -> None:
    sql = (ROOT / "deploy" / "compose" / "init-databases.sql").read_text(encoding="utf-8")
    databases = re.findall(r"^\s*CREATE DATABASE (\w+)", sql, re.MULTILINE | re.IGNORECASE)
    owners = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", sql, re.IGNORECASE))
    assert sorted(databases) == sorted(SERVICES)
    assert owners == {service: service for service in SERVICES}


def test_otel_collector_receives_otlp_http_and_prints_it() -> None:
    config = parse_mapping(ROOT / "deploy" / "compose" / "otel-collector.yaml")
    endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint.endswith(":4318")
    assert "debug" in config["exporters"]
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        assert "otlp" in pipeline["receivers"], name
        assert "debug" in pipeline["exporters"], name


# -- kustomize ---------------------------------------------------------------------------------


def test_base_is_namespace_less() -> None:
    objects = rendered("base")
    namespaced = [o["metadata"]["name"] for o in objects if o["metadata"].get("namespace")]
    assert not namespaced


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_puts_everything_in_one_namespace(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    namespaces = {obj["metadata"].get("namespace") for obj in objects}
    assert len(namespaces) == 1
    assert None not in namespaces


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_are_hardened(overlay: str) -> None:
    for name, deployment in _deployments(rendered(f"overlays/{overlay}")).items():
        pod, container = _container(deployment)
        pod_security = pod.get("securityContext", {})
        security = container.get("securityContext", {})

        def effective(key: str, pod_sc: Obj = pod_security, sc: Obj = security) -> Any:
            return sc[key] if key in sc else pod_sc.get(key)

        assert pod.get("automountServiceAccountToken") is False, name
        assert effective("runAsNonRoot") is True, name
        assert effective("runAsUser") == UID, name
        assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        assert security.get("allowPrivilegeEscalation") is False, name
        assert security.get("readOnlyRootFilesystem") is True, name
        assert "ALL" in security.get("capabilities", {}).get("drop", []), name
        assert security.get("privileged") in (None, False), name

        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}: a writable /tmp is needed with a read-only root"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_have_probes_and_resources(overlay: str) -> None:
    for name, deployment in _deployments(rendered(f"overlays/{overlay}")).items():
        _, container = _container(deployment)
        assert {p.get("containerPort") for p in container.get("ports", [])} == {HTTP_PORT}
        expected = {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe_name, path in expected.items():
            probe = container.get(probe_name)
            assert probe, f"{name} has no {probe_name}"
            assert probe["httpGet"]["path"] == path, f"{name} {probe_name}"
            assert _probe_port(container, probe) == HTTP_PORT, f"{name} {probe_name}"
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name} {bound}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_take_settings_from_configmap_and_database_secret(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    config_maps = {obj["metadata"]["name"]: obj for obj in _of_kind(objects, "ConfigMap")}
    for name, deployment in _deployments(objects).items():
        service = name.removeprefix("lotse-")
        _, container = _container(deployment)

        settings: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref is None:
                continue
            assert ref["name"].startswith("lotse-config"), ref["name"]
            assert ref["name"] in config_maps, f"{name}: ConfigMap {ref['name']} is not rendered"
            prefix = source.get("prefix", "")
            for key, value in config_maps[ref["name"]].get("data", {}).items():
                settings[prefix + key] = value
        env = {item["name"]: item for item in container.get("env", [])}
        settings.update({k: v["value"] for k, v in env.items() if "value" in v})

        assert settings.get("LOTSE_KAFKA_BOOTSTRAP") == "lotse-kafka-bootstrap:9092", name
        assert settings.get("LOTSE_CREATE_TOPICS") == "false", name
        assert settings.get("LOTSE_SERVICE") == service, name

        database = [key for key in env if key.endswith("DATABASE_URL")]
        assert database in ([f"LOTSE_{service.upper()}_DATABASE_URL"], ["DATABASE_URL"]), name
        secret = env[database[0]]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": f"lotse-{service}-db", "key": "url"}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_has_its_service_and_service_account(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    for name, deployment in _deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        account = _named(objects, "ServiceAccount", pod["serviceAccountName"])
        assert account.get("automountServiceAccountToken") is False, name
        assert _selects(deployment["spec"]["selector"], labels), name

        service = _named(objects, "Service", name)
        assert _selects({"matchLabels": service["spec"]["selector"]}, labels), name
        _, container = _container(deployment)
        named_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        targets = {
            named_ports.get(port["targetPort"], port["targetPort"])
            for port in service["spec"]["ports"]
        }
        assert targets == {HTTP_PORT}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_ingress_except_the_http_port(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    policies = _of_kind(objects, "NetworkPolicy")
    deny_all = [
        policy
        for policy in policies
        if not (policy["spec"].get("podSelector") or {}).get("matchLabels")
        and not (policy["spec"].get("podSelector") or {}).get("matchExpressions")
        and "Ingress" in policy["spec"].get("policyTypes", [])
        and not policy["spec"].get("ingress")
    ]
    assert deny_all, "a default-deny ingress policy for the whole namespace"

    for name, deployment in _deployments(objects).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        allowed = set()
        for policy in policies:
            if not _selects(policy["spec"].get("podSelector"), labels):
                continue
            for rule in policy["spec"].get("ingress") or []:
                for port in rule.get("ports") or []:
                    if port.get("protocol", "TCP") == "TCP":
                        allowed.add(port.get("port"))
        assert allowed & {HTTP_PORT, "http"}, f"{name}: nothing admits port {HTTP_PORT}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_kafka_cluster_and_topics(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    strimzi = [obj for obj in objects if obj["apiVersion"].startswith("kafka.strimzi.io/")]
    assert {obj["apiVersion"] for obj in strimzi} == {STRIMZI_API}

    [kafka] = _of_kind(objects, "Kafka")
    cluster = kafka["metadata"]["name"]
    assert "zookeeper" not in kafka["spec"], "KRaft only"
    # The services' bootstrap address is the Service Strimzi names after the cluster, on a
    # plain internal listener.
    [settings] = [
        c
        for c in _of_kind(objects, "ConfigMap")
        if c["metadata"]["name"].startswith("lotse-config")
    ]
    host, _, port = settings["data"]["KAFKA_BOOTSTRAP"].partition(":")
    assert host == f"{cluster}-kafka-bootstrap"
    listeners = {listener["port"]: listener for listener in kafka["spec"]["kafka"]["listeners"]}
    assert listeners[int(port)]["tls"] is False
    assert listeners[int(port)]["type"] == "internal"

    pools = _of_kind(objects, "KafkaNodePool")
    assert pools
    assert all(pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster for pool in pools)
    roles = {role for pool in pools for role in pool["spec"]["roles"]}
    assert roles == {"controller", "broker"}
    brokers = sum(pool["spec"]["replicas"] for pool in pools if "broker" in pool["spec"]["roles"])
    config = kafka["spec"]["kafka"].get("config", {})
    assert str(config.get("auto.create.topics.enable")).lower() == "false"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert int(config[key]) <= brokers, key

    topics = {obj["metadata"]["name"]: obj for obj in _of_kind(objects, "KafkaTopic")}
    expected = {
        *topic_names.DOMAIN_TOPICS,
        topic_names.REPORTING_KPIS,
        *(topic_names.dead_letter(service) for service in SERVICES),
    }
    assert expected <= set(topics), f"missing KafkaTopics: {sorted(expected - set(topics))}"
    for name, topic in topics.items():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster, name
        spec = topic["spec"]
        assert spec.get("topicName", name) == name
        assert 1 <= spec["replicas"] <= brokers, f"{name}: more replicas than brokers"
        min_isr = int(
            spec.get("config", {}).get("min.insync.replicas", config["min.insync.replicas"])
        )
        assert min_isr <= spec["replicas"], name
    assert topics[topic_names.REPORTING_KPIS]["spec"]["config"]["cleanup.policy"] == "compact"
    for name in topic_names.DOMAIN_TOPICS:
        assert topics[name]["spec"].get("config", {}).get("cleanup.policy") != "compact", name


def test_prod_runs_two_replicas_with_a_disruption_budget_each() -> None:
    objects = rendered("overlays/prod")
    budgets = _of_kind(objects, "PodDisruptionBudget")
    for name, deployment in _deployments(objects).items():
        assert deployment["spec"]["replicas"] == 2, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        spec = covering[0]["spec"]
        if "minAvailable" in spec:
            assert 1 <= int(spec["minAvailable"]) < 2, name
        else:
            assert int(spec["maxUnavailable"]) >= 1, name
        _, container = _container(deployment)
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] or "@" in image, f"{name}: untagged {image}"
        assert not image.endswith(":latest"), name


def test_prod_kafka_survives_losing_a_broker() -> None:
    objects = rendered("overlays/prod")
    pools = _of_kind(objects, "KafkaNodePool")
    brokers = sum(pool["spec"]["replicas"] for pool in pools if "broker" in pool["spec"]["roles"])
    assert brokers >= 3
    for topic in _of_kind(objects, "KafkaTopic"):
        spec = topic["spec"]
        assert spec["replicas"] >= 3, topic["metadata"]["name"]
        assert int(spec["config"]["min.insync.replicas"]) == spec["replicas"] - 1
