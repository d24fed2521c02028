"""The deployment files: Dockerfile, docker-compose.yml and the kustomize overlays in deploy/k8s.

Static checks, no Docker engine, cluster or network: the overlays are rendered with
``kubectl kustomize`` (skipped with a message where kubectl is missing), every standard
resource is validated with kubernetes-validate (strict, Kubernetes 1.32), the custom resources
(Strimzi, KEDA) against the fields their operators require, docker-compose.yml against the
Compose Specification's JSON Schema, and all YAML with yamllint. Development secrets come from
``lotse dev-secrets``, generated into a scratch copy (tests.deploy.manifests.render_root).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from lotse_contracts import topics as topic_names
from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.app import resolver_from_settings
from lotse_runtime.auth import DEV_ISSUER, DevelopmentIssuer
from lotse_runtime.identity import Caller
from lotse_runtime.settings import ServiceSettings
from lotse_tooling import acls, dev_secrets
from lotse_tooling.cli import DEFAULT_PORTS
from starlette.requests import Request

from tests.deploy.manifests import (
    KUBERNETES_VERSION,
    OVERLAYS,
    ROOT,
    TOPIC_PLAN,
    Obj,
    dockerfile_instructions,
    env_mapping,
    load_yaml,
    named,
    named_prefix,
    of_kind,
    render_root,
    rendered,
    selects,
    settings_class,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE_SCHEMA = Path(__file__).parent / "fixtures" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = topic_names.SERVICES
#: The service that posts webhooks to subscribers' HTTPS endpoints.
WEBHOOK_SENDER = "delivery"
UID = 10001
HTTP_PORT = 8000
KAFKA_TLS_PORT = 9093
STRIMZI_API = "kafka.strimzi.io/v1"
KEDA_API = "keda.sh/v1alpha1"
CUSTOM_KINDS = {
    (STRIMZI_API, "Kafka"),
    (STRIMZI_API, "KafkaNodePool"),
    (STRIMZI_API, "KafkaTopic"),
    (STRIMZI_API, "KafkaUser"),
    (KEDA_API, "ScaledObject"),
    (KEDA_API, "TriggerAuthentication"),
}
# Environment variables the image reads itself, not a service's settings.
IMAGE_VARIABLES = {"LOTSE_SERVICE"}
INIT_SCRIPTS = (
    ROOT / "deploy" / "compose" / "init-databases.sh",
    ROOT / "deploy" / "k8s" / "overlays" / "dev" / "postgres-init.sh",
)


def _secret_placeholder(variable: str) -> str | None:
    """A well-formed value for a setting that comes from a Secret (the cluster fills it in);
    drawn at random, so that nothing secret-looking is committed here either."""
    if variable.endswith("DATABASE_URL"):
        return f"postgresql://lotse:{secrets.token_urlsafe(12)}@db.example.org:5432/lotse"
    if variable.endswith(("KEY_ENCRYPTION_KEY", "MATCH_KEY_SECRET")):
        return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return None


def _accepts_development_token(settings: ServiceSettings) -> Caller:
    """The caller a service with these settings sees for a token that `lotse token --key-file
    deploy/dev-issuer-key.pem` signs (the key `lotse dev-secrets` wrote into render_root)."""
    issuer = DevelopmentIssuer(render_root() / dev_secrets.ISSUER_KEY_FILE)
    token = issuer.token(role="familienbuero", subject="fb-1", bezirk="hoerde")
    request = Request({"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]})
    return asyncio.run(resolver_from_settings(settings).resolve(request))


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_registry(load_city("dortmund"))


def _field_of(service: str, variable: str) -> str | None:
    """The settings field an environment variable sets for a service, if any."""
    fields = settings_class(service).model_fields
    for prefix in (f"LOTSE_{service.upper()}_", "LOTSE_"):
        if variable.startswith(prefix) and variable[len(prefix) :].lower() in fields:
            return variable[len(prefix) :].lower()
    if variable == "DATABASE_URL":
        return "database_url"
    return None


def _settings_from_env(
    service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> ServiceSettings:
    """The service's settings as the container would build them from this environment."""
    for key in list(os.environ):
        if key.startswith("LOTSE_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return settings_class(service)()


# -- Dockerfile --------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _runtime_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


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
    assert re.search(r"uv sync --frozen --no-dev\b", runs), "installs exactly the lock file"
    envs = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "UV_PROJECT_ENVIRONMENT=/app/.venv" in envs


def test_dockerfile_runtime_runs_as_uid_10001_with_a_health_check() -> None:
    runtime = _runtime_stage()
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

    [health] = [rest for keyword, rest in runtime if keyword == "HEALTHCHECK"]
    assert "/healthz" in health
    assert "CMD" in health


def _dockerfile_command() -> list[str]:
    """The service image's command (the runtime stage's; the tooling target has its own)."""
    [cmd] = [rest for keyword, rest in _runtime_stage() if keyword == "CMD"]
    command = json.loads(cmd)
    assert isinstance(command, list)
    return [str(part) for part in command]


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_command_runs_the_factory_named_by_lotse_service(service: str) -> None:
    command = _dockerfile_command()
    assert command[:2] == ["python", "-c"], "the launcher is a python one-liner"
    # Run the image's launcher here, with the runtime's serve() replaced by a recorder.
    probe = (
        "import json, lotse_runtime.serve\n"
        "lotse_runtime.serve.serve = lambda app, **kw: print(json.dumps({'app': app, **kw}))\n"
        f"exec(compile({command[2]!r}, '<CMD>', 'exec'))\n"
    )
    env = {**os.environ, "LOTSE_SERVICE": service}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout.strip().splitlines()[-1])
    assert call["app"] == f"lotse_{service}.app:create_app"
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
def compose_file() -> Obj:
    """docker-compose.yml as written, ${VARIABLES} and all."""
    loaded = load_yaml(COMPOSE_FILE)
    assert isinstance(loaded, dict)
    return loaded


_COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::\?([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of ${VAR} and ${VAR:?message} in every string value."""
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, message = match.group(1), match.group(2)
        if not env.get(name):
            raise LookupError(f"{name}: {message or 'unset'}")
        return env[name]

    return _COMPOSE_VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    """The .env that `lotse dev-secrets` writes (into the scratch root)."""
    return dev_secrets.read_env_file(render_root() / dev_secrets.ENV_FILE)


@pytest.fixture(scope="module")
def compose(compose_file: Obj, compose_env: dict[str, str]) -> Obj:
    """docker-compose.yml as compose sees it, with the .env of `lotse dev-secrets`."""
    interpolated: Obj = _interpolate(compose_file, compose_env)
    return interpolated


def test_compose_schema_fixture_is_the_documented_one() -> None:
    # The fixture's README names its source and checksum; an unnoticed swap would make the
    # schema check below check against something else.
    readme = (COMPOSE_SCHEMA.parent / "README.md").read_text(encoding="utf-8")
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest in readme
    assert "compose-spec/compose-spec" in readme


def test_compose_file_follows_the_compose_specification(compose_file: Obj) -> None:
    compose = compose_file
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)

    # The schema does reject what Compose rejects (a control, so the check above can fail).
    broken = {**compose, "services": {**compose["services"], "x": {"image": "a", "imagee": 1}}}
    assert any("imagee" in e.message for e in validator.iter_errors(broken))


def _database_url(service_config: Obj) -> tuple[str, str]:
    env = env_mapping(service_config.get("environment", {}))
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
    assert env_mapping(build.get("args", {})).get("SERVICE") == service

    env = env_mapping(config.get("environment", {}))
    key, url = _database_url(config)
    assert key in (f"LOTSE_{service.upper()}_DATABASE_URL", "DATABASE_URL")
    parts = urlsplit(url)
    assert parts.scheme.startswith("postgresql"), url
    assert parts.hostname == "postgres", url
    assert parts.path == f"/{service}", f"{service} must use its own database: {url}"
    assert env.get("LOTSE_KAFKA_BOOTSTRAP") == "kafka:9092"
    assert env.get("LOTSE_OTLP_ENDPOINT", "").startswith("http://otel-collector:4318")
    # Topics come from the init step, with the configured retention.
    assert env.get("LOTSE_CREATE_TOPICS") == "false"

    test = config["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else str(test)
    assert f"127.0.0.1:{HTTP_PORT}/readyz" in command or f"localhost:{HTTP_PORT}/readyz" in command

    depends_on = config["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs conditions"
    for dependency in ("kafka", "postgres"):
        assert depends_on[dependency]["condition"] == "service_healthy", dependency
    assert depends_on["kafka-topics"]["condition"] == "service_completed_successfully"

    # On the developer's machine only: development credentials and token issuer.
    assert config.get("ports") == [f"127.0.0.1:{DEFAULT_PORTS[service]}:{HTTP_PORT}"]
    assert config.get("read_only") is True
    assert "ALL" in config.get("cap_drop", [])
    assert "no-new-privileges:true" in config.get("security_opt", [])
    mounts = [str(volume) for volume in config.get("volumes", [])]
    assert f"{service}-data:/app/var" in mounts, "a writable, persistent LOTSE_DATA_DIR"


@pytest.mark.parametrize("service", SERVICES)
def test_compose_settings_are_real_settings_of_the_service(
    compose: Obj, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_mapping(compose["services"][service]["environment"])
    unknown = [k for k in env if k not in IMAGE_VARIABLES and _field_of(service, k) is None]
    assert not unknown, f"{service}: no such setting {unknown}"
    settings = _settings_from_env(service, env, monkeypatch)
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.create_topics is False
    # Tokens of the development issuer whose key `lotse dev-secrets` wrote are accepted.
    assert settings.auth_issuer == DEV_ISSUER
    caller = _accepts_development_token(settings)
    assert (caller.role, caller.bezirk) == ("familienbuero", "hoerde")


def test_compose_services_do_not_share_a_database(
    compose: Obj, compose_env: dict[str, str]
) -> None:
    urls = [urlsplit(_database_url(compose["services"][s])[1]) for s in SERVICES]
    assert len({url.path for url in urls}) == len(SERVICES)
    assert len({url.username for url in urls}) == len(SERVICES)
    # Each role's password is the one the init script gives it.
    postgres = env_mapping(compose["services"]["postgres"]["environment"])
    for service, url in zip(SERVICES, urls, strict=True):
        variable = dev_secrets.database_password_variable(service)
        assert url.password == postgres[variable] == compose_env[variable], service


def test_compose_takes_every_secret_from_the_generated_env_file(
    compose_file: Obj, compose_env: dict[str, str]
) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    variables = set(re.findall(r"\$\{(\w+)", text))
    assert variables, "secrets come from .env"
    # Each one is required (compose stops, saying what to run) and `lotse dev-secrets` sets it.
    for name in variables:
        assert re.search(rf"\$\{{{name}:\?[^}}]*dev-secrets", text), name
    assert variables <= set(compose_env), variables - set(compose_env)
    with pytest.raises(LookupError, match="dev-secrets"):
        _interpolate(compose_file, {})
    # No literal credential left: database URLs and PostgreSQL take theirs from variables.
    for config in compose_file["services"].values():
        for key, value in env_mapping(config.get("environment", {})).items():
            if key.endswith(("PASSWORD", "_KEY", "_SECRET", "DATABASE_URL", "AUTH_JWKS")):
                assert "${" in value, f"{key} is written into docker-compose.yml"


def test_compose_infrastructure(compose: Obj) -> None:
    services = compose["services"]
    kafka = services["kafka"]
    image = str(kafka["image"])
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", image), (
        f"docker-compose.yml: kafka runs {image}, not a pinned Apache Kafka 4.x"
    )
    [base_kafka] = of_kind(rendered("base"), "Kafka")
    assert image.rpartition(":")[2] == base_kafka["spec"]["kafka"]["version"], (
        "docker-compose.yml and deploy/k8s/base/kafka/kafka.yaml run the same Kafka version"
    )
    env = env_mapping(kafka["environment"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft"
    assert not [name for name in services if "zookeeper" in name]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"
    assert "healthcheck" in kafka
    # Broker settings Kafka 4 no longer has (ZooKeeper, message-format and protocol pins).
    removed = {
        "KAFKA_ZOOKEEPER_CONNECT",
        "KAFKA_LOG_MESSAGE_FORMAT_VERSION",
        "KAFKA_INTER_BROKER_PROTOCOL_VERSION",
        "KAFKA_CONTROL_PLANE_LISTENER_NAME",
        "KAFKA_LOG_MESSAGE_DOWNCONVERSION_ENABLE",
        "KAFKA_AUTHORIZER_CLASS_NAME",
    } & set(env)
    assert not removed, f"docker-compose.yml: kafka sets {sorted(removed)}, gone in Kafka 4"

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16-alpine"
    assert "healthcheck" in postgres
    mounts = [str(volume) for volume in postgres.get("volumes", [])]
    init = [m for m in mounts if m.startswith("./deploy/compose/init-databases.sh:")]
    assert len(init) == 1, "deploy/compose/init-databases.sh is mounted"
    assert ":/docker-entrypoint-initdb.d/" in init[0]
    assert init[0].endswith(".sh:ro")
    env = env_mapping(postgres["environment"])
    for service in SERVICES:
        assert env[dev_secrets.database_password_variable(service)], service

    collector = services["otel-collector"]
    assert str(collector["image"]).startswith("otel/opentelemetry-collector-contrib")
    mounts = [str(volume) for volume in collector.get("volumes", [])]
    [config_mount] = [m for m in mounts if m.startswith("./deploy/compose/otel-collector.yaml:")]
    target = config_mount.split(":")[1]
    assert any(f"--config={target}" in str(arg) for arg in collector.get("command", []))
    assert "127.0.0.1:8889:8889" in collector.get("ports", [])

    jaeger = services["jaeger"]
    assert str(jaeger["image"]).startswith("jaegertracing/all-in-one:")
    assert env_mapping(jaeger.get("environment", {})).get("COLLECTOR_OTLP_ENABLED") == "true"
    assert "127.0.0.1:16686:16686" in jaeger.get("ports", []), "the trace viewer on localhost"
    assert collector["depends_on"]["jaeger"]["condition"] == "service_started"


def test_compose_topic_init_step_creates_the_planned_topics(compose: Obj) -> None:
    init = compose["services"]["kafka-topics"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert init.get("restart") == "no"
    assert env_mapping(init["environment"])["LOTSE_KAFKA_BOOTSTRAP"] == "kafka:9092"
    command = [str(part) for part in init["command"]]
    assert command[:4] == ["python", "-m", "lotse_tooling.cli", "acls"]

    # The command line parses as `lotse acls` and reads the mounted topic plan.
    import argparse

    parser = argparse.ArgumentParser()
    acls.add_arguments(parser)
    args = parser.parse_args(command[4:])
    assert args.create_topics is True
    mounts = {
        str(v).split(":")[1]: str(v).split(":")[0] for v in init.get("volumes", []) if ":" in str(v)
    }
    source = mounts[str(args.topics_config)]
    assert (ROOT / source).resolve() == TOPIC_PLAN.resolve()
    # The plan it mounts is valid.
    acls.load_topic_plan(TOPIC_PLAN)


def test_compose_dashboard_and_apis_are_on_localhost(compose: Obj) -> None:
    reporting = compose["services"]["reporting"]
    assert reporting["ports"] == [f"127.0.0.1:{DEFAULT_PORTS['reporting']}:{HTTP_PORT}"]
    header = COMPOSE_FILE.read_text(encoding="utf-8").split("\nname:")[0]
    assert f"http://localhost:{DEFAULT_PORTS['intake']}" in header
    assert "http://localhost:16686" in header


def test_compose_and_dev_cluster_run_the_same_database_init_script() -> None:
    compose_script, cluster_script = (path.read_bytes() for path in INIT_SCRIPTS)
    assert compose_script == cluster_script, "keep the two copies identical"
    text = compose_script.decode()
    [services] = re.findall(r"\$\{LOTSE_DB_SERVICES:-([^}]*)\}", text)
    assert services.split() == list(SERVICES)
    assert "PASSWORD :'password'" in text, "psql quotes the password from the environment"
    assert not re.search(r"PASSWORD\s+'", text), "no literal password"


def test_database_init_script_creates_a_role_and_database_per_service(
    postgres_url: str,
) -> None:
    # The script itself, against the test PostgreSQL, for two throw-away services whose
    # passwords hold what could break quoting.
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed: the init script cannot be run")
    server = urlsplit(postgres_url)
    names = [f"lotse_init_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    passwords = {name: f"{secrets.token_urlsafe(8)}'; DROP ROLE x; --" for name in names}
    env = {
        **os.environ,
        "PGHOST": server.hostname or "127.0.0.1",
        "PGPORT": str(server.port or 5432),
        "PGPASSWORD": server.password or "",
        "POSTGRES_USER": server.username or "postgres",
        "POSTGRES_DB": server.path.lstrip("/") or "postgres",
        "LOTSE_DB_SERVICES": " ".join(names),
        **{dev_secrets.database_password_variable(n): p for n, p in passwords.items()},
    }

    def query(sql: str) -> str:
        return subprocess.run(
            [psql, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()

    try:
        result = subprocess.run(
            ["sh", str(INIT_SCRIPTS[0])],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        for name in names:
            owner = query(
                "SELECT r.rolname, r.rolcanlogin, r.rolpassword IS NOT NULL FROM pg_database d "
                f"JOIN pg_authid r ON r.oid = d.datdba WHERE d.datname = '{name}'"
            )
            assert owner == f"{name}|t|t", name
            assert query(f"SELECT has_database_privilege('public', '{name}', 'CONNECT')") == "f"
        # A missing password stops the script with a hint, before anything is created.
        broken = {**env, dev_secrets.database_password_variable(names[0]): ""}
        failed = subprocess.run(
            ["sh", str(INIT_SCRIPTS[0])],
            env=broken,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert failed.returncode != 0
        assert "dev-secrets" in failed.stderr
    finally:
        for name in names:
            query(f'DROP DATABASE IF EXISTS "{name}"')
            query(f'DROP ROLE IF EXISTS "{name}"')


def test_compose_collector_sends_traces_to_jaeger_and_serves_metrics() -> None:
    config = load_yaml(ROOT / "deploy" / "compose" / "otel-collector.yaml")
    endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint.endswith(":4318")
    exporters = config["exporters"]
    jaeger = [name for name, e in exporters.items() if "jaeger:4317" in str(e.get("endpoint"))]
    assert jaeger, "an OTLP exporter to jaeger:4317"
    assert exporters["prometheus"]["endpoint"].endswith(":8889")
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics", "logs"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        assert "otlp" in pipeline["receivers"], name
    assert set(jaeger) <= set(pipelines["traces"]["exporters"])
    assert "prometheus" in pipelines["metrics"]["exporters"]


# -- kustomize: validity -----------------------------------------------------------------------


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
def test_every_standard_resource_is_valid_for_kubernetes_1_32(overlay: str) -> None:
    problems = []
    for obj in rendered(f"overlays/{overlay}"):
        kind = (obj["apiVersion"], obj["kind"])
        if kind in CUSTOM_KINDS:
            continue  # checked against their CRD schemas below
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: not a Kubernetes {KUBERNETES_VERSION} kind, no CRD known")
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            problems.append(f"{name}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)


def _kubernetes_validate_cli(objects: list[Obj], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False), encoding="utf-8")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            "--quiet",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_cli_accepts_the_rendered_overlay(overlay: str, tmp_path: Path) -> None:
    # The same check as the operator would run it: `kubernetes-validate --strict -k 1.32.0`.
    result = _kubernetes_validate_cli(rendered(f"overlays/{overlay}"), tmp_path / "all.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    unknown = [
        line
        for line in lines
        if not any(f"kind {kind} with api version {api}" in line for api, kind in CUSTOM_KINDS)
    ]
    assert not unknown, "\n".join(unknown)


def test_kubernetes_validate_is_strict(tmp_path: Path) -> None:
    # The control for the test above: a misspelt field fails, so "valid" means something.
    [deployment, *_] = of_kind(rendered("overlays/dev"), "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    assert _kubernetes_validate_cli([broken], tmp_path / "broken.yaml").returncode != 0


# What Lotse relies on in each custom resource, stricter than the CRDs (which let unknown fields
# through: the API server prunes them silently); the CRD schemas themselves are checked by
# test_custom_resources_match_the_strimzi_and_keda_crd_schemas.
_ACL = {
    "type": "object",
    "required": ["resource", "operations"],
    "additionalProperties": False,
    "properties": {
        "resource": {
            "type": "object",
            "required": ["type", "name", "patternType"],
            "additionalProperties": False,
            "properties": {
                "type": {"enum": ["topic", "group"]},
                "name": {"type": "string", "pattern": "^[a-zA-Z0-9._-]+$"},
                "patternType": {"enum": ["literal", "prefix"]},
            },
        },
        "operations": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"enum": ["Read", "Write", "Describe"]},
        },
        "host": {"const": "*"},
    },
}
_STRIMZI_META = {
    "type": "object",
    "required": ["name", "labels"],
    "properties": {
        "labels": {"type": "object", "required": ["strimzi.io/cluster"]},
    },
}
CUSTOM_RESOURCE_SCHEMAS: dict[str, Obj] = {
    "Kafka": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["kafka", "entityOperator"],
                "not": {"required": ["zookeeper"]},
                "properties": {
                    "kafka": {
                        "type": "object",
                        "required": ["version", "listeners", "authorization", "config"],
                        "properties": {
                            "listeners": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["name", "port", "type", "tls", "authentication"],
                                    "properties": {
                                        "name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                        "port": {"type": "integer", "minimum": 9092},
                                        "type": {
                                            "enum": [
                                                "internal",
                                                "route",
                                                "loadbalancer",
                                                "nodeport",
                                                "ingress",
                                                "cluster-ip",
                                            ]
                                        },
                                        "tls": {"type": "boolean"},
                                        "authentication": {
                                            "type": "object",
                                            "required": ["type"],
                                            "properties": {
                                                "type": {"enum": ["scram-sha-512", "tls"]}
                                            },
                                        },
                                    },
                                },
                            },
                            "authorization": {
                                "type": "object",
                                "required": ["type"],
                                "properties": {"type": {"const": "simple"}},
                            },
                        },
                    },
                    "entityOperator": {
                        "type": "object",
                        "required": ["topicOperator", "userOperator"],
                    },
                },
            }
        },
    },
    "KafkaNodePool": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _STRIMZI_META,
            "spec": {
                "type": "object",
                "required": ["replicas", "roles", "storage"],
                "properties": {
                    "replicas": {"type": "integer", "minimum": 1},
                    "roles": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"enum": ["controller", "broker"]},
                    },
                    "storage": {"type": "object", "required": ["type"]},
                },
            },
        },
    },
    "KafkaTopic": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _STRIMZI_META,
            "spec": {
                "type": "object",
                "required": ["partitions", "replicas", "config"],
                "additionalProperties": False,
                "properties": {
                    "partitions": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                    "topicName": {"type": "string"},
                    "config": {"type": "object"},
                },
            },
        },
    },
    "KafkaUser": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _STRIMZI_META,
            "spec": {
                "type": "object",
                "required": ["authentication", "authorization"],
                "additionalProperties": False,
                "properties": {
                    "authentication": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"enum": ["scram-sha-512", "tls"]}},
                    },
                    "authorization": {
                        "type": "object",
                        "required": ["type", "acls"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "simple"},
                            "acls": {"type": "array", "minItems": 1, "items": _ACL},
                        },
                    },
                },
            },
        },
    },
    "ScaledObject": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"]},
                    "minReplicaCount": {"type": "integer", "minimum": 1},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata", "authenticationRef"],
                            "properties": {
                                "type": {"const": "kafka"},
                                "metadata": {
                                    "type": "object",
                                    "required": ["bootstrapServers", "consumerGroup"],
                                    "additionalProperties": {"type": "string"},
                                },
                                "authenticationRef": {"type": "object", "required": ["name"]},
                            },
                        },
                    },
                },
            }
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "minProperties": 1,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                        },
                    },
                    "env": {
                        "type": "array",
                        "items": {"type": "object", "required": ["parameter", "name"]},
                    },
                },
            }
        },
    },
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_have_the_fields_their_operators_require(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    problems = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            continue
        schema = CUSTOM_RESOURCE_SCHEMAS[obj["kind"]]
        for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
            path = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
    for scaled in of_kind(objects, "ScaledObject"):
        spec = scaled["spec"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"], scaled["metadata"]["name"]
    assert not problems, "\n".join(problems)


CRD_VALIDATORS = (
    Path(__file__).parent / "fixtures" / "crd-validators" / "strimzi-keda-validators.cjs"
)
_NODE_RUNNER = """
const validators = require(process.argv[1]);
const objects = JSON.parse(require("fs").readFileSync(0, "utf8"));
const problems = [];
for (const obj of objects) {
  const validate = validators[obj.kind];
  const name = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
  if (!validate) { problems.push(`${name}: no CRD schema for this kind`); continue; }
  if (!validate(obj)) {
    for (const e of validate.errors) {
      problems.push(`${name}: ${e.instancePath || "/"}: ${e.keyword} ${JSON.stringify(e.params)}`);
    }
  }
}
process.stdout.write(JSON.stringify(problems));
"""


def crd_schema_problems(objects: list[Obj]) -> list[str]:
    """Every custom resource checked against its CRD's openAPIV3 schema (Strimzi v1, KEDA
    v1alpha1), by the validators the kubernetes-models npm packages compile from the CRDs."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js is not installed: the CRD schema validators are JavaScript")
    result = subprocess.run(
        [node, "-e", _NODE_RUNNER, str(CRD_VALIDATORS)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    problems: list[str] = json.loads(result.stdout)
    return problems


def test_crd_validators_fixture_is_the_documented_one() -> None:
    readme = (CRD_VALIDATORS.parent.parent / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(CRD_VALIDATORS.read_bytes()).hexdigest() in readme
    assert "@kubernetes-models/strimzi-kafka-operator@1.0.1" in readme


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_the_strimzi_and_keda_crd_schemas(overlay: str) -> None:
    objects = [
        obj
        for obj in rendered(f"overlays/{overlay}")
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS
    ]
    assert {obj["kind"] for obj in objects} >= {"Kafka", "KafkaNodePool", "KafkaTopic"}
    problems = crd_schema_problems(objects)
    assert not problems, "\n".join(problems)


def test_crd_schemas_reject_what_the_operators_would() -> None:
    # The control: the schemas do check something. An ACL in the old v1beta2 form (a single
    # `operation`), a topic with a string partition count, a node pool without roles and a
    # ScaledObject without triggers each fail, naming the resource and the field.
    objects = rendered("overlays/prod")
    [user, *_] = of_kind(objects, "KafkaUser")
    [topic, *_] = of_kind(objects, "KafkaTopic")
    [pool] = of_kind(objects, "KafkaNodePool")
    [scaled, *_] = of_kind(objects, "ScaledObject")
    user, topic, pool, scaled = (json.loads(json.dumps(o)) for o in (user, topic, pool, scaled))
    acl = user["spec"]["authorization"]["acls"][0]
    acl["operation"] = acl.pop("operations")[0]
    topic["spec"]["partitions"] = "three"
    del pool["spec"]["roles"]
    del scaled["spec"]["triggers"]
    problems = "\n".join(crd_schema_problems([user, topic, pool, scaled]))
    assert f"KafkaUser/{user['metadata']['name']}: /spec/authorization/acls/0: required" in problems
    assert '"missingProperty":"operations"' in problems
    assert f"KafkaTopic/{topic['metadata']['name']}: /spec/partitions: type" in problems
    assert '"missingProperty":"roles"' in problems
    assert '"missingProperty":"triggers"' in problems


# -- kustomize: the services -------------------------------------------------------------------


def _deployments(objects: list[Obj]) -> dict[str, Obj]:
    deployments = {
        obj["metadata"]["name"]: obj
        for obj in of_kind(objects, "Deployment")
        if obj["metadata"]["name"].startswith("lotse-")
    }
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
    named_ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named_ports, f"probe port {port!r} is not a named container port"
    return int(named_ports[port])


def _effective_env(objects: list[Obj], container: Obj) -> dict[str, Obj]:
    """Every variable of a container: envFrom ConfigMaps (prefixed), then env (wins)."""
    config_maps = {obj["metadata"]["name"]: obj for obj in of_kind(objects, "ConfigMap")}
    env: dict[str, Obj] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, "only ConfigMaps are imported wholesale"
        assert ref["name"] in config_maps, f"ConfigMap {ref['name']} is not rendered"
        prefix = source.get("prefix", "")
        for key, value in config_maps[ref["name"]].get("data", {}).items():
            env[prefix + key] = {"value": value}
    env.update({item["name"]: item for item in container.get("env", [])})
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_hardened(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    workloads = of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
    assert workloads
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, name
        account = named(objects, "ServiceAccount", pod["serviceAccountName"])
        assert account.get("automountServiceAccountToken") is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            security = container.get("securityContext", {})

            def effective(key: str, pod_sc: Obj = pod_security, sc: Obj = security) -> Any:
                return sc[key] if key in sc else pod_sc.get(key)

            assert effective("runAsNonRoot") is True, where
            assert isinstance(effective("runAsUser"), int), where
            assert effective("runAsUser") != 0, where
            assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            assert not security.get("capabilities", {}).get("add"), where
            assert security.get("privileged") in (None, False), where
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where} {bound}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_run_as_the_image_user_with_a_writable_tmp(overlay: str) -> None:
    for name, deployment in _deployments(rendered(f"overlays/{overlay}")).items():
        pod, container = _container(deployment)
        for each in (container, *pod.get("initContainers", [])):
            uid = each.get("securityContext", {}).get(
                "runAsUser", pod["securityContext"].get("runAsUser")
            )
            assert uid == UID, name
            mounts = {m["mountPath"]: m["name"] for m in each.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a writable /tmp is needed with a read-only root"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_have_probes(overlay: str) -> None:
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_shut_down_gracefully(overlay: str) -> None:
    for name, deployment in _deployments(rendered(f"overlays/{overlay}")).items():
        pod, container = _container(deployment)
        sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 5 <= sleep <= 15, f"{name}: endpoints need a few seconds to drop the pod"
        grace = pod["terminationGracePeriodSeconds"]
        # After the preStop sleep: HTTP drain, consumers leave their group, outbox flush (2 s).
        assert grace >= sleep + 20, f"{name}: grace period {grace} s leaves too little time"
        strategy = deployment["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_migrates_its_schema_in_an_init_container(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    for name, deployment in _deployments(objects).items():
        service = name.removeprefix("lotse-")
        pod, container = _container(deployment)
        [migrate] = pod["initContainers"]
        assert migrate["image"] == container["image"], f"{name}: same image as the service"
        command = migrate["command"]
        assert command[:5] == ["python", "-m", "lotse_runtime.migrations", "upgrade", service]
        assert command[5] == "--database-url"
        variable = re.fullmatch(r"\$\((\w+)\)", command[6])
        assert variable, f"{name}: the URL comes from the environment, not the manifest"
        env = {item["name"]: item for item in migrate.get("env", [])}
        service_env = _effective_env(objects, container)
        assert env[variable[1]]["valueFrom"] == service_env[variable[1]]["valueFrom"], name


@pytest.mark.parametrize("service", SERVICES)
def test_the_migration_command_of_the_init_container_works(service: str, tmp_path: Path) -> None:
    [migrate] = _deployments(rendered("overlays/dev"))[f"lotse-{service}"]["spec"]["template"][
        "spec"
    ]["initContainers"]
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    command = [re.sub(r"\$\(\w+\)", url, part) for part in migrate["command"]]
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"{service}:" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_settings_are_valid_settings(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered(f"overlays/{overlay}")
    for name, deployment in _deployments(objects).items():
        service = name.removeprefix("lotse-")
        _, container = _container(deployment)
        env = _effective_env(objects, container)
        assert env["LOTSE_SERVICE"]["value"] == service
        unknown = [k for k in env if k not in IMAGE_VARIABLES and _field_of(service, k) is None]
        assert not unknown, f"{name}: no such setting {unknown}"
        values = {}
        for key, item in env.items():
            if "value" in item:
                values[key] = item["value"]
            else:
                placeholder = _secret_placeholder(key)
                assert placeholder, f"{name}: {key} from a Secret, but no placeholder known"
                values[key] = placeholder
        settings = _settings_from_env(service, values, monkeypatch)
        assert settings.create_topics is False, "Strimzi owns the topics"
        assert settings.kafka_security_protocol == "SASL_SSL"
        assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka_sasl_username == f"service-{service}"
        # Every overlay names an issuer and its keys: without them a service would fall back
        # to a development issuer of its own, whose tokens nobody can get.
        assert settings.auth_jwks, f"{name}: no AUTH_JWKS"
        assert settings.auth_issuer, f"{name}: no AUTH_ISSUER"
        # Partners resolve each event's dataschema below this URL: unset, a service bound to
        # 0.0.0.0 would name its own loopback address.
        assert settings.contracts_base_url, f"{name}: no CONTRACTS_BASE_URL"
        assert urlsplit(settings.contracts_base_url).hostname not in ("127.0.0.1", "localhost")
        if overlay == "prod":
            assert settings.contracts_base_url.startswith("https://"), "the public address"
            assert settings.auth_issuer.startswith("https://"), "the city's identity provider"
            assert settings.auth_jwks.startswith("https://"), "its published keys"
        else:
            assert settings.auth_issuer == DEV_ISSUER
            caller = _accepts_development_token(settings)
            assert (caller.role, caller.bezirk) == ("familienbuero", "hoerde")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_kafka_as_their_own_kafka_user_over_tls(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    [kafka] = of_kind(objects, "Kafka")
    cluster = kafka["metadata"]["name"]
    users = {u["metadata"]["name"]: u for u in of_kind(objects, "KafkaUser")}
    for name, deployment in _deployments(objects).items():
        service = name.removeprefix("lotse-")
        pod, container = _container(deployment)
        env = {k: v.get("value") for k, v in _effective_env(objects, container).items()}

        host, _, port = str(env["LOTSE_KAFKA_BOOTSTRAP"]).partition(":")
        assert host == f"{cluster}-kafka-bootstrap", name
        listeners = {item["port"]: item for item in kafka["spec"]["kafka"]["listeners"]}
        listener = listeners[int(port)]
        assert listener["type"] == "internal", name
        assert listener["tls"] is True, name
        assert listener["authentication"]["type"] == "scram-sha-512", name

        username = env["LOTSE_KAFKA_SASL_USERNAME"]
        assert username == f"service-{service}"
        assert users[str(username)]["spec"]["authentication"]["type"] == "scram-sha-512"

        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}

        def secret_behind(
            path: str, mounts: Obj = mounts, volumes: Obj = volumes
        ) -> tuple[str, str]:
            folder, _, file = path.rpartition("/")
            mount = mounts[folder]
            assert mount.get("readOnly") is True, path
            secret = volumes[mount["name"]]["secret"]
            [item] = [i for i in secret["items"] if i["path"] == file]
            return secret["secretName"], item["key"]

        # Strimzi's User Operator writes the password into a Secret named after the user,
        # its Cluster Operator the CA certificate into <cluster>-cluster-ca-cert.
        assert secret_behind(str(env["LOTSE_KAFKA_SASL_PASSWORD_FILE"])) == (username, "password")
        assert secret_behind(str(env["LOTSE_KAFKA_SSL_CAFILE"])) == (
            f"{cluster}-cluster-ca-cert",
            "ca.crt",
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_has_its_service_and_service_account(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    for name, deployment in _deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        named(objects, "ServiceAccount", pod["serviceAccountName"])
        assert selects(deployment["spec"]["selector"], labels), name

        service = named(objects, "Service", name)
        assert selects({"matchLabels": service["spec"]["selector"]}, labels), name
        _, container = _container(deployment)
        named_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        targets = {
            named_ports.get(port["targetPort"], port["targetPort"])
            for port in service["spec"]["ports"]
        }
        assert targets == {HTTP_PORT}, name


# -- kustomize: network policies ---------------------------------------------------------------


def _policies_for(objects: list[Obj], labels: dict[str, str], direction: str) -> list[Obj]:
    return [
        policy
        for policy in of_kind(objects, "NetworkPolicy")
        if selects(policy["spec"].get("podSelector"), labels)
        and direction in policy["spec"].get("policyTypes", [])
    ]


def _allowed_ports(policies: list[Obj], direction: str) -> set[tuple[str, int]]:
    key = "ingress" if direction == "Ingress" else "egress"
    ports = set()
    for policy in policies:
        for rule in policy["spec"].get(key) or []:
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule opens every port"
            for port in rule["ports"]:
                ports.add((port.get("protocol", "TCP"), int(port["port"])))
    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_allow_a_list(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    deny_all = [
        policy
        for policy in of_kind(objects, "NetworkPolicy")
        if policy["spec"].get("podSelector") in ({}, None)
        and "Ingress" in policy["spec"].get("policyTypes", [])
        and not policy["spec"].get("ingress")
    ]
    assert deny_all, "a default-deny ingress policy for the whole namespace"

    for name, deployment in _deployments(objects).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        ingress = _allowed_ports(_policies_for(objects, labels, "Ingress"), "Ingress")
        assert ingress == {("TCP", HTTP_PORT)}, f"{name}: only the HTTP port is reachable"
        egress_policies = _policies_for(objects, labels, "Egress")
        assert egress_policies, f"{name}: egress is not restricted"
        egress = _allowed_ports(egress_policies, "Egress")
        # Nothing beyond what some service's settings need (test_network_policies_let_each_
        # service_reach_what_its_settings_name derives that), DNS and the collector's gRPC port.
        needed = {("TCP", need.port) for needs in _egress_needs(objects).values() for need in needs}
        extra = egress - needed - {("UDP", 53), ("TCP", 53), ("TCP", 4317)}
        assert not extra, f"{name}: egress opens {sorted(extra)}, which no setting needs"

    # Every other workload of Lotse (collector, dev database) has its own allow-list.
    for workload in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for direction in ("Ingress", "Egress"):
            assert _policies_for(objects, labels, direction), (
                f"{workload['metadata']['name']}: no {direction} policy"
            )


@dataclass(frozen=True)
class EgressNeed:
    """A destination a service's settings make it connect to."""

    variable: str
    host: str
    port: int
    pod_labels: dict[str, str] | None  # in-cluster: the labels of the pods behind the name

    def __str__(self) -> str:
        return f"{self.variable} -> {self.host}:{self.port}"


_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432}


def _url_endpoints(value: str) -> list[tuple[str, int]]:
    """host:port of a URL (scheme default port), or of each entry of a Kafka bootstrap list."""
    if "://" in value:
        url = urlsplit(value)
        scheme = url.scheme.split("+")[0]
        if not url.hostname:
            return []  # a file:// or sqlite path
        return [(url.hostname, url.port or _DEFAULT_PORTS[scheme])]
    endpoints = []
    for entry in value.split(","):
        host, _, port = entry.strip().rpartition(":")
        if host and port.isdigit():
            endpoints.append((host, int(port)))
    return endpoints


def _in_cluster(objects: list[Obj], host: str, port: int) -> tuple[dict[str, str], int] | None:
    """The labels of the pods behind an in-cluster Service name and the port they listen on
    (what a NetworkPolicy sees), or None for a destination outside the cluster."""
    name = host.split(".")[0]
    if "." in host and not host.endswith((".svc", ".svc.cluster.local")) and host.count(".") != 1:
        return None
    for kafka in of_kind(objects, "Kafka"):
        if name == f"{kafka['metadata']['name']}-kafka-bootstrap":
            # Strimzi creates this Service; it selects the cluster's broker pods.
            cluster = kafka["metadata"]["name"]
            return {"strimzi.io/cluster": cluster, "strimzi.io/kind": "Kafka"}, port
    services = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == name]
    if not services:
        return None
    [service] = services
    workloads = [
        w
        for w in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
        if selects(
            {"matchLabels": service["spec"]["selector"]},
            w["spec"]["template"]["metadata"]["labels"],
        )
    ]
    assert workloads, f"Service {name} selects no pods"
    pod = workloads[0]["spec"]["template"]
    [entry] = [p for p in service["spec"]["ports"] if p["port"] == port] or [{"targetPort": port}]
    target = entry.get("targetPort", port)
    if isinstance(target, str):
        named_ports = {
            p["name"]: p["containerPort"]
            for c in pod["spec"]["containers"]
            for p in c.get("ports", [])
            if "name" in p
        }
        target = named_ports[target]
    return dict(pod["metadata"]["labels"]), int(target)


# URL settings a service names to others but never calls itself (no egress needed).
PUBLISHED_URLS = {"LOTSE_CONTRACTS_BASE_URL"}


def _egress_needs(objects: list[Obj]) -> dict[str, list[EgressNeed]]:
    """For each service Deployment, every destination its settings name: any URL-valued
    variable (AUTH_JWKS, OTLP_ENDPOINT, the keyring URL, the database URL, from a ConfigMap, the
    Deployment or a rendered Secret), and the Kafka bootstrap servers."""
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    needs: dict[str, list[EgressNeed]] = {}
    for name, deployment in _deployments(objects).items():
        _, container = _container(deployment)
        found = []
        for variable, item in sorted(_effective_env(objects, container).items()):
            if "value" in item:
                value = str(item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                if ref["name"] in secrets:
                    value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
                else:
                    # Made by ops (prod): the documented form, e.g. postgresql://…@host:5432/….
                    value = _secret_placeholder(variable) or ""
            if variable in PUBLISHED_URLS:
                continue
            if not (
                variable.endswith("KAFKA_BOOTSTRAP") or re.match(r"^[a-z][a-z0-9+.-]*://", value)
            ):
                continue
            for host, port in _url_endpoints(value):
                target = _in_cluster(objects, host, port)
                if target is None:
                    found.append(EgressNeed(variable, host, port, None))
                else:
                    found.append(EgressNeed(variable, host, target[1], target[0]))
        if name == f"lotse-{WEBHOOK_SENDER}":
            # Not in a setting: the subscribers' sinks, https:// URLs anywhere outside.
            found.append(EgressNeed("webhook sinks (subscriptions)", "*", 443, None))
        needs[name] = found
    return needs


def _policy_files() -> dict[str, str]:
    """NetworkPolicy name -> the file under deploy/k8s that defines it."""
    files = {}
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "NetworkPolicy":
                files[doc["metadata"]["name"]] = str(path.relative_to(ROOT))
    return files


def _rule_allows(rule: Obj, need: EgressNeed) -> bool:
    ports = rule.get("ports") or []
    if ports and not any(
        p.get("protocol", "TCP") == "TCP"
        and int(p["port"]) <= need.port <= int(p.get("endPort", p["port"]))
        for p in ports
    ):
        return False
    peers = rule.get("to") or []
    if not peers:
        return True
    for peer in peers:
        if "ipBlock" in peer and need.pod_labels is None:
            return True  # an external address: the overlay's CIDR stands for it
        in_namespace = "podSelector" in peer and "namespaceSelector" not in peer
        if (
            need.pod_labels is not None
            and in_namespace
            and selects(peer["podSelector"], need.pod_labels)
        ):
            return True
    return False


def egress_problems(objects: list[Obj]) -> list[str]:
    files = _policy_files()
    problems = []
    for name, needs in _egress_needs(objects).items():
        labels = _deployments(objects)[name]["spec"]["template"]["metadata"]["labels"]
        policies = _policies_for(objects, labels, "Egress")
        if not policies:
            continue  # egress unrestricted (test_network_policies_deny_by_default_... objects)
        for need in needs:
            if not any(
                _rule_allows(r, need) for p in policies for r in p["spec"].get("egress") or []
            ):
                where = sorted({files.get(p["metadata"]["name"], "?") for p in policies})
                destination = "its pods" if need.pod_labels is not None else "an ipBlock"
                problems.append(
                    f"{', '.join(where)}: {name} needs {need} (TCP {need.port} to {destination}), "
                    f"but no egress rule of {sorted(p['metadata']['name'] for p in policies)} "
                    f"allows port {need.port}"
                )
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_each_service_reach_what_its_settings_name(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    needs = _egress_needs(objects)
    variables = {need.variable for found in needs.values() for need in found}
    # What the derivation must find, or it proves nothing.
    assert {"LOTSE_KAFKA_BOOTSTRAP", "LOTSE_OTLP_ENDPOINT", "LOTSE_REFERRALS_KEYRING_URL"} <= (
        variables
    ), variables
    assert any(v.endswith("DATABASE_URL") for v in variables), variables
    if overlay == "prod":
        jwks = [n for found in needs.values() for n in found if n.variable == "LOTSE_AUTH_JWKS"]
        assert jwks, "prod verifies tokens against the identity provider's JWKS URL"
        assert {n.port for n in jwks} == {443}
    problems = egress_problems(objects)
    assert not problems, "\n".join(problems)


def test_a_policy_that_blocks_a_configured_dependency_fails_naming_file_and_port() -> None:
    # The control, and the bug this exists for: prod's JWKS is an https URL, and a policy set
    # without 443 (as it once was) makes every authenticated call answer 503.
    objects = json.loads(json.dumps(rendered("overlays/prod")))
    [idp] = [
        p for p in of_kind(objects, "NetworkPolicy") if "identity-provider" in p["metadata"]["name"]
    ]
    idp["spec"]["egress"][0]["ports"][0]["port"] = 8443
    problems = "\n".join(egress_problems(objects))
    assert "deploy/k8s/components/network-policies/policies.yaml" in problems
    assert "LOTSE_AUTH_JWKS -> login.example.org:443" in problems
    assert "allows port 443" in problems
    # And the keyring call to intake, should the services' rule to each other go.
    objects = json.loads(json.dumps(rendered("overlays/prod")))
    [services] = [
        p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "lotse-services"
    ]
    services["spec"]["egress"] = [
        r for r in services["spec"]["egress"] if {p["port"] for p in r["ports"]} != {HTTP_PORT}
    ]
    problems = "\n".join(egress_problems(objects))
    assert "LOTSE_REFERRALS_KEYRING_URL -> lotse-intake:8000" in problems
    assert "allows port 8000" in problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_delivery_reaches_webhook_sinks_and_never_internal_addresses(overlay: str) -> None:
    from lotse_delivery.domain import forbidden_address

    objects = rendered(f"overlays/{overlay}")
    [policy] = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if p["metadata"]["name"] == "lotse-delivery-webhooks"
    ]
    deployments = _deployments(objects)
    selected = {
        name
        for name, deployment in deployments.items()
        if selects(
            policy["spec"]["podSelector"], deployment["spec"]["template"]["metadata"]["labels"]
        )
    }
    assert selected == {f"lotse-{WEBHOOK_SENDER}"}
    [rule] = policy["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
    blocks = [peer["ipBlock"] for peer in rule["to"]]
    assert {block["cidr"] for block in blocks} == {"0.0.0.0/0", "::/0"}
    # Every range cut out is one the service itself refuses too, and the ranges an attacker
    # would aim at (cluster networks, loopback, cloud metadata) are among them.
    import ipaddress

    cut = [ipaddress.ip_network(c) for block in blocks for c in block.get("except", [])]
    for network in cut:
        assert forbidden_address(str(network.network_address + 1)), network
    for target in (
        "10.96.0.1",
        "172.20.0.5",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "fd00::1",
        "fe80::1",
    ):
        address = ipaddress.ip_address(target)
        assert any(address in network for network in cut), target
    assert not any(ipaddress.ip_address("93.184.215.14") in network for network in cut)


def test_dev_database_is_reachable_only_from_the_services() -> None:
    objects = rendered("overlays/dev")
    postgres = named(objects, "StatefulSet", "lotse-postgres")
    labels = postgres["spec"]["template"]["metadata"]["labels"]
    allowing = [p for p in _policies_for(objects, labels, "Ingress") if p["spec"].get("ingress")]
    [policy] = allowing
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"lotse.de/role": "service"}}}]
    assert not _allowed_ports(_policies_for(objects, labels, "Egress"), "Egress")


# -- kustomize: Kafka --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_strimzi_kafka_cluster_authenticates_and_authorises_everyone(overlay: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    strimzi = [obj for obj in objects if obj["apiVersion"].startswith("kafka.strimzi.io/")]
    assert {obj["apiVersion"] for obj in strimzi} == {STRIMZI_API}

    [kafka] = of_kind(objects, "Kafka")
    cluster = kafka["metadata"]["name"]
    assert "zookeeper" not in kafka["spec"], "KRaft only"
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    for listener in kafka["spec"]["kafka"]["listeners"]:
        # An unauthenticated listener would make every client User:ANONYMOUS, and with
        # authorization on, useless; with it off, everything would be readable.
        assert listener["authentication"]["type"] in ("scram-sha-512", "tls"), listener["name"]
        assert listener["tls"] is True, listener["name"]

    pools = of_kind(objects, "KafkaNodePool")
    assert all(pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster for pool in pools)
    roles = {role for pool in pools for role in pool["spec"]["roles"]}
    assert roles == {"controller", "broker"}
    brokers = sum(pool["spec"]["replicas"] for pool in pools if "broker" in pool["spec"]["roles"])
    config = kafka["spec"]["kafka"].get("config", {})
    assert str(config.get("auto.create.topics.enable")).lower() == "false"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert int(config[key]) <= brokers, key
    for obj in of_kind(objects, "KafkaTopic") + of_kind(objects, "KafkaUser"):
        assert obj["metadata"]["labels"]["strimzi.io/cluster"] == cluster


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_topics_are_the_planned_topics_of_the_registry(overlay: str, registry: Any) -> None:
    objects = rendered(f"overlays/{overlay}")
    [kafka] = of_kind(objects, "Kafka")
    config = kafka["spec"]["kafka"]["config"]
    pools = of_kind(objects, "KafkaNodePool")
    brokers = sum(pool["spec"]["replicas"] for pool in pools if "broker" in pool["spec"]["roles"])

    topics = {obj["metadata"]["name"]: obj for obj in of_kind(objects, "KafkaTopic")}
    planned = {t.name: t for t in acls.planned_topics(registry, acls.load_topic_plan(TOPIC_PLAN))}
    assert set(topics) == set(planned)
    for audience in registry.audiences():
        missing = set(audience.read_topics + audience.write_topics) - set(topics)
        assert not missing, f"{audience.name} uses topics nobody creates: {missing}"
    for name, topic in topics.items():
        spec = topic["spec"]
        assert spec.get("topicName", name) == name
        assert spec["partitions"] == planned[name].partitions, name
        assert 1 <= spec["replicas"] <= brokers, f"{name}: more replicas than brokers"
        min_isr = int(spec["config"].get("min.insync.replicas", config["min.insync.replicas"]))
        assert min_isr <= spec["replicas"], name
        for key, value in planned[name].config.items():
            assert spec["config"][key] == value, f"{name}: {key}"
    assert topics[topic_names.REPORTING_KPIS]["spec"]["config"]["cleanup.policy"] == "compact"
    for name in topic_names.DOMAIN_TOPICS:
        assert topics[name]["spec"]["config"]["cleanup.policy"] == "delete", name
        assert topics[name]["spec"]["config"]["retention.ms"] == -1, "replay needs everything"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_audience_has_a_kafka_user(overlay: str, registry: Any) -> None:
    users = {u["metadata"]["name"] for u in of_kind(rendered(f"overlays/{overlay}"), "KafkaUser")}
    assert users == {a.name for a in registry.audiences()}
    assert {f"service-{s}" for s in SERVICES} <= users
    assert "dashboard" in users
    assert {f"bezirksteam-{b}" for b in registry.city.bezirk_slugs} <= users
    assert {f"traeger-{t}" for t in registry.city.traeger_slugs} <= users


# -- kustomize: scaling and disruptions --------------------------------------------------------


def _consuming_services(registry: Any) -> list[str]:
    return sorted(
        a.name.removeprefix("service-")
        for a in registry.audiences()
        if a.kind == "service" and a.consumer_groups
    )


def _group_acls(user: Obj) -> list[Obj]:
    return [
        acl["resource"]
        for acl in user["spec"]["authorization"]["acls"]
        if acl["resource"]["type"] == "group"
    ]


def _group_allowed(user: Obj, group: str) -> bool:
    for resource in _group_acls(user):
        if resource["patternType"] == "literal" and resource["name"] == group:
            return True
        if resource["patternType"] == "prefix" and group.startswith(resource["name"]):
            return True
    return False


def test_prod_scales_each_consumer_on_kafka_lag(registry: Any) -> None:
    objects = rendered("overlays/prod")
    deployments = _deployments(objects)
    users = {u["metadata"]["name"]: u for u in of_kind(objects, "KafkaUser")}
    auths = {a["metadata"]["name"]: a for a in of_kind(objects, "TriggerAuthentication")}
    config = named_prefix(objects, "ConfigMap", "lotse-config")["data"]
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind(objects, "ScaledObject")}
    assert set(scaled) == {f"lotse-{s}" for s in _consuming_services(registry)}
    plan = acls.load_topic_plan(TOPIC_PLAN)
    for target, scaled_object in scaled.items():
        service = target.removeprefix("lotse-")
        deployment = deployments[target]
        spec = scaled_object["spec"]
        # More consumers than partitions would sit idle.
        assert spec["maxReplicaCount"] <= plan.partitions, target
        assert spec["minReplicaCount"] == deployment["spec"]["replicas"], target
        _, container = _container(deployment)
        env = _effective_env(objects, container)
        username = env["LOTSE_KAFKA_SASL_USERNAME"]["value"]
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            assert metadata["bootstrapServers"] == config["KAFKA_BOOTSTRAP"], target
            assert metadata["sasl"] == "scram_sha512", target
            assert metadata["tls"] == "enable", target
            group = metadata["consumerGroup"]
            assert group.startswith(f"lotse-{service}-"), f"{target}: runtime group naming"
            assert _group_allowed(users[username], group), f"{group}: not in {username}'s ACLs"
            auth = auths[trigger["authenticationRef"]["name"]]["spec"]
            [user_ref] = [e for e in auth["env"] if e["parameter"] == "username"]
            assert user_ref["containerName"] == container["name"], target
            assert user_ref["name"] == "LOTSE_KAFKA_SASL_USERNAME", target
            secrets = {r["parameter"]: (r["name"], r["key"]) for r in auth["secretTargetRef"]}
            assert secrets["password"] == (username, "password"), target
            assert secrets["ca"] == ("lotse-cluster-ca-cert", "ca.crt"), target


def test_every_consumer_a_service_registers_has_a_lag_trigger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from importlib.metadata import entry_points

    from uvicorn.importer import import_from_string

    triggers = {
        trigger["metadata"]["consumerGroup"]
        for scaled in of_kind(rendered("overlays/prod"), "ScaledObject")
        for trigger in scaled["spec"]["triggers"]
    }
    registered: dict[str, list[str]] = {}
    for entry in entry_points(group="lotse.services"):
        _settings_from_env(
            entry.name,
            {
                "LOTSE_DATA_DIR": str(tmp_path / entry.name),
                "LOTSE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / entry.name}.db",
            },
            monkeypatch,
        )
        # Building the app registers its consumers; nothing is started.
        app = import_from_string(entry.value)()
        groups = [consumer.group_id for consumer in app.state.runtime.consumers]
        registered[entry.name] = groups
        missing = [group for group in groups if group not in triggers]
        assert not missing, (
            f"{entry.name} consumes as {missing} but components/keda-autoscaling has no "
            "trigger for it: add one to its ScaledObject"
        )


def test_prod_runs_two_replicas_with_a_disruption_budget_each() -> None:
    objects = rendered("overlays/prod")
    budgets = of_kind(objects, "PodDisruptionBudget")
    for name, deployment in _deployments(objects).items():
        assert deployment["spec"]["replicas"] == 2, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        spec = covering[0]["spec"]
        if "minAvailable" in spec:
            assert 1 <= int(spec["minAvailable"]) < 2, name
        else:
            assert int(spec["maxUnavailable"]) == 1, name
        _, container = _container(deployment)
        for each in (container, *deployment["spec"]["template"]["spec"]["initContainers"]):
            image = each["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@" in image, f"{name}: untagged {image}"
            assert not image.endswith(":latest"), name
            assert image.startswith("registry.example.org/lotse/"), name


def test_dev_runs_one_replica_of_locally_built_images() -> None:
    for name, deployment in _deployments(rendered("overlays/dev")).items():
        assert deployment["spec"]["replicas"] == 1, name
        _, container = _container(deployment)
        assert container["image"] == f"{name}:dev"


def test_prod_kafka_survives_losing_a_broker_and_admits_partners() -> None:
    objects = rendered("overlays/prod")
    pools = of_kind(objects, "KafkaNodePool")
    brokers = sum(pool["spec"]["replicas"] for pool in pools if "broker" in pool["spec"]["roles"])
    assert brokers >= 3
    for topic in of_kind(objects, "KafkaTopic"):
        spec = topic["spec"]
        assert spec["replicas"] >= 3, topic["metadata"]["name"]
        assert int(spec["config"]["min.insync.replicas"]) == spec["replicas"] - 1
    [kafka] = of_kind(objects, "Kafka")
    external = [
        listener
        for listener in kafka["spec"]["kafka"]["listeners"]
        if listener["type"] != "internal"
    ]
    assert external, "Bezirksteams and Träger connect from outside the cluster"
    for listener in external:
        assert listener["tls"] is True
        assert listener["authentication"]["type"] == "scram-sha-512"


# -- kustomize: databases ----------------------------------------------------------------------


def test_prod_uses_an_external_database_with_secrets_made_outside() -> None:
    objects = rendered("overlays/prod")
    assert not of_kind(objects, "Secret"), "no credentials in the repository"
    assert not of_kind(objects, "StatefulSet"), "no database in the cluster"
    for name, deployment in _deployments(objects).items():
        _, container = _container(deployment)
        env = _effective_env(objects, container)
        [url] = [v for k, v in env.items() if k.endswith("DATABASE_URL")]
        assert url["valueFrom"]["secretKeyRef"] == {"name": f"{name}-db", "key": "url"}


def test_dev_brings_its_own_database_and_development_secrets() -> None:
    import base64

    objects = rendered("overlays/dev")
    postgres = named(objects, "Service", "lotse-postgres")
    roles = named_prefix(objects, "Secret", "lotse-postgres-roles")["data"]
    for name, deployment in _deployments(objects).items():
        service = name.removeprefix("lotse-")
        _, container = _container(deployment)
        env = _effective_env(objects, container)
        for key, item in env.items():
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            secret = named(objects, "Secret", ref["name"])
            assert ref["key"] in secret["data"], f"{name}: {key}"
            if key.endswith("DATABASE_URL"):
                url = urlsplit(base64.b64decode(secret["data"][ref["key"]]).decode())
                assert url.hostname == postgres["metadata"]["name"], name
                assert url.path == f"/{service}", name
                assert url.username == service, name
                # The password the init script gave the service's role.
                variable = dev_secrets.database_password_variable(service)
                assert url.password == base64.b64decode(roles[variable]).decode(), name


def test_dev_database_creates_the_roles_with_the_generated_passwords() -> None:
    objects = rendered("overlays/dev")
    postgres = named(objects, "StatefulSet", "lotse-postgres")
    [container] = postgres["spec"]["template"]["spec"]["containers"]
    roles = named_prefix(objects, "Secret", "lotse-postgres-roles")
    assert {"secretRef": {"name": roles["metadata"]["name"]}} in container["envFrom"]
    assert set(roles["data"]) == {dev_secrets.database_password_variable(s) for s in SERVICES}
    init = named_prefix(objects, "ConfigMap", "lotse-postgres-init")
    assert init["data"] == {"postgres-init.sh": INIT_SCRIPTS[1].read_text(encoding="utf-8")}
    [volume] = [v for v in postgres["spec"]["template"]["spec"]["volumes"] if v["name"] == "init"]
    assert volume["configMap"]["name"] == init["metadata"]["name"]


# -- YAML hygiene ------------------------------------------------------------------------------


def test_yaml_is_yamllint_clean() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-f",
            "parsable",
            "-c",
            str(ROOT / ".yamllint"),
            "docker-compose.yml",
            "deploy",
            ".yamllint",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_finds_problems() -> None:
    # The control: yamllint with this configuration does reject a sloppy file.
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(ROOT / ".yamllint"), "-"],
        input="key: yes\nlist:\n- a\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "truthy" in result.stdout


# -- Kafka 4 clients ---------------------------------------------------------------------------


def test_service_clients_speak_kafka_4() -> None:
    # Kafka 4 dropped the oldest protocol versions (KIP-896). aiokafka negotiates versions with
    # the broker since 0.13 (before, it sent Metadata v0/v1 at bootstrap, which 4.0 refuses);
    # an `api_version` pin would be ignored there, but says the wrong thing: none is set.
    from importlib.metadata import version

    major, minor = (int(part) for part in version("aiokafka").split(".")[:2])
    assert (major, minor) >= (0, 13), f"aiokafka {version('aiokafka')} cannot talk to Kafka 4"
    source = (ROOT / "libs" / "runtime" / "src" / "lotse_runtime" / "kafka.py").read_text()
    assert "api_version" not in source, "lotse_runtime.kafka pins a Kafka protocol version"


def test_compose_v2_is_documented_as_required(compose_file: Obj) -> None:
    # The top-level `name:` is Compose v2 only; docker-compose 1.x refuses the whole file.
    assert "name" in compose_file
    for document in (ROOT / "README.md", ROOT / "docs" / "operations.md"):
        text = " ".join(document.read_text(encoding="utf-8").split())
        assert "Docker Compose v2" in text, f"{document.name}: say that compose v2 is required"
