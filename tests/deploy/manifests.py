"""Helpers of the deployment tests: rendering overlays with kubectl, reading YAML, selectors.

Everything is offline: ``kubectl kustomize`` renders without a cluster (no kubeconfig is
given to it), YAML is read with PyYAML. The dev overlay reads development secrets from
git-ignored files; the overlays are rendered from a copy of deploy/ with freshly generated ones
(``lotse dev-secrets``), which leaves the developer's own files alone and works on a fresh
checkout.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from lotse_runtime.settings import ServiceSettings
from lotse_tooling import dev_secrets

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPONENTS = K8S / "components"
TOPIC_PLAN = ROOT / "deploy" / "topics.toml"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"


def kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    return "/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None


@cache
def render_root() -> Path:
    """A scratch repository root: deploy/ and docker-compose.yml, plus generated dev secrets."""
    scratch = Path(tempfile.mkdtemp(prefix="lotse-deploy-"))
    atexit.register(shutil.rmtree, scratch, True)
    shutil.copytree(
        ROOT / "deploy",
        scratch / "deploy",
        # Whatever the developer generated stays out: the copy gets its own.
        ignore=shutil.ignore_patterns(dev_secrets.K8S_SECRETS_DIR.name, "*.pem"),
    )
    shutil.copy2(ROOT / "docker-compose.yml", scratch / "docker-compose.yml")
    dev_secrets.write(scratch)
    return scratch


@cache
def _render(path: str) -> str:
    binary = kubectl()
    if binary is None:
        pytest.skip(
            "kubectl is not installed (looked on PATH and at /usr/bin/kubectl): the kustomize "
            "overlays cannot be rendered, so their checks are skipped"
        )
    # No kubeconfig: nothing here may reach for a cluster.
    result = subprocess.run(
        [binary, "kustomize", str(render_root() / K8S.relative_to(ROOT) / path)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "KUBECONFIG": os.devnull},
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def rendered(path: str) -> list[Obj]:
    """The objects ``kubectl kustomize deploy/k8s/<path>`` renders."""
    objects = [doc for doc in yaml.safe_load_all(_render(path)) if doc is not None]
    assert objects, f"kubectl kustomize {path} rendered nothing"
    return objects


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj.get("kind") == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def named_prefix(objects: list[Obj], kind: str, name: str) -> Obj:
    """A generated object (ConfigMap, Secret) by its name before kustomize's hash suffix."""
    found = [
        obj
        for obj in of_kind(objects, kind)
        if obj["metadata"]["name"] == name or obj["metadata"]["name"].startswith(name + "-")
    ]
    found = [obj for obj in found if obj["metadata"]["name"].removeprefix(name + "-").isalnum()]
    assert len(found) == 1, f"expected one {kind} {name}[-hash], found {len(found)}"
    return found[0]


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
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


def env_mapping(environment: Any) -> dict[str, str]:
    """Compose ``environment``, written as a mapping or as a list of KEY=VALUE."""
    if isinstance(environment, dict):
        return {str(k): "" if v is None else str(v) for k, v in environment.items()}
    assert isinstance(environment, list), f"unexpected environment: {environment!r}"
    pairs = (str(item).split("=", 1) for item in environment)
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def settings_class(service: str) -> type[ServiceSettings]:
    """The settings class of a service (``lotse_<service>.settings``)."""
    module = importlib.import_module(f"lotse_{service}.settings")
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceSettings)
        and value.service_name == service
    ]
    assert len(found) == 1, f"lotse_{service}.settings: one ServiceSettings subclass expected"
    return found[0]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, rest), continued lines joined, comments gone."""
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
