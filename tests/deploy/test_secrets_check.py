"""The committed-secrets check (scripts/check_secrets.py, run by `./lotse test` before pytest).

It must pass on the repository as it is, and fail, naming file and line, on the shapes of
secret this repository used to carry (kustomize literals, passwords in database URLs and SQL,
env files), which detect-secrets' stock plugins let through.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT

CHECK = ROOT / "scripts" / "check_secrets.py"
BASELINE = ROOT / ".secrets.baseline"


def _run(*args: str, cwd: Path = ROOT, answers: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), *args],
        input=answers,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _key() -> str:
    import base64
    import secrets

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def _password() -> str:
    import secrets

    return secrets.token_urlsafe(12)


# Planted secrets: file -> (text, line numbers that must be reported). Fresh random values,
# in the shapes that were once committed here.
def _planted() -> dict[str, tuple[str, list[int]]]:
    return {
        "deploy/kustomization.yaml": (
            "secretGenerator:\n"
            "  - name: lotse-intake-secrets\n"
            "    literals:\n"
            f"      - key-encryption-key={_key()}\n"
            f"      - match-key-secret={_key()}\n"
            "  - name: lotse-intake-db\n"
            "    literals:\n"
            f"      - url=postgresql://intake:{_password()}@lotse-postgres:5432/intake\n"
            "  - name: lotse-postgres-admin\n"
            "    literals:\n"
            "      - password=postgres\n",
            [4, 5, 8, 11],
        ),
        "docker-compose.yml": (
            "services:\n"
            "  intake:\n"
            "    environment:\n"
            f"      LOTSE_INTAKE_DATABASE_URL: postgresql://intake:{_password()}@postgres/intake\n"
            "      POSTGRES_PASSWORD: postgres\n",
            [4, 5],
        ),
        "deploy/init.sql": (
            "CREATE ROLE intake LOGIN PASSWORD 'intake';\nCREATE DATABASE intake OWNER intake;\n",
            [1],
        ),
        "deploy/dev.env": (f"INTAKE_DB_PASSWORD={_password()}\n", [1]),
    }


# What the repository writes instead: references, placeholders and generated-file names.
CLEAN = {
    "deploy/kustomization.yaml": (
        "secretGenerator:\n"
        "  - name: lotse-intake-secrets\n"
        "    envs:\n"
        "      - secrets/intake-secrets.env\n"
        "configMapGenerator:\n"
        "  - name: lotse-config\n"
        "    literals:\n"
        "      - KAFKA_SASL_PASSWORD_FILE=/etc/lotse/kafka-user/password\n"
    ),
    "docker-compose.yml": (
        "services:\n"
        "  postgres:\n"
        "    environment:\n"
        "      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?run ./lotse dev-secrets first}\n"
        '      URL: "postgresql://intake:${INTAKE_DB_PASSWORD:?run}@postgres/intake"\n'
    ),
    "deploy/init.sh": (
        "psql -v password=\"$P\" <<'SQL'\nCREATE ROLE x LOGIN PASSWORD :'password';\nSQL\n"
    ),
    "README.md": 'kubectl create secret generic db --from-literal=url="postgresql://$s:<password>@h/x"\n',
}


def _write(root: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return sorted(files)


def test_the_repository_has_no_unaudited_secret() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the check lists the repository's files with git")
    result = _run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no unaudited secrets" in result.stdout


def test_the_baseline_is_audited_and_names_its_plugin_relatively() -> None:
    baseline = json.loads(BASELINE.read_text(encoding="utf-8"))
    custom = [p for p in baseline["plugins_used"] if "path" in p]
    assert custom == [
        {"name": "LotseCredentialDetector", "path": "file://scripts/secrets_plugin.py"}
    ]
    entries = [entry for found in baseline["results"].values() for entry in found]
    assert entries, "the known false positives are recorded"
    assert all(entry["is_secret"] is False for entry in entries)
    # No filter that would call out to a provider's API to "verify" a finding.
    assert not [f for f in baseline["filters_used"] if "verification" in f["path"]]


def test_a_committed_secret_fails_the_check_naming_file_and_line(tmp_path: Path) -> None:
    planted = _planted()
    names = _write(tmp_path, {name: text for name, (text, _) in planted.items()})
    result = _run("--root", str(tmp_path), "--baseline", str(BASELINE), *names)
    assert result.returncode == 1, result.stdout + result.stderr
    reported = set(re.findall(r"^\s+(\S+):(\d+): ", result.stderr, re.MULTILINE))
    expected = {(name, str(line)) for name, (_, lines) in planted.items() for line in lines}
    assert expected <= reported, f"missed: {sorted(expected - reported)}\n{result.stderr}"
    assert "./lotse dev-secrets" in result.stderr

    # The control: the same kind of files with references instead of values pass.
    clean = tmp_path / "clean"
    names = _write(clean, CLEAN)
    result = _run("--root", str(clean), "--baseline", str(BASELINE), *names)
    assert result.returncode == 0, result.stdout + result.stderr


def test_in_a_git_repository_new_files_count_ignored_ones_do_not_and_audits_matter(
    tmp_path: Path,
) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    baseline = json.loads(BASELINE.read_text(encoding="utf-8"))
    baseline["results"] = {}
    for plugin in baseline["plugins_used"]:
        if "path" in plugin:
            plugin["path"] = f"file://{ROOT / 'scripts' / 'secrets_plugin.py'}"
    (repo / ".secrets.baseline").write_text(json.dumps(baseline, indent=2), encoding="utf-8")
    _write(
        repo,
        {
            ".gitignore": ".env\n",
            # Ignored: where development secrets belong.
            ".env": f"POSTGRES_PASSWORD={_password()}\nINTAKE_KEY_ENCRYPTION_KEY={_key()}\n",
            "deploy/ok.yaml": CLEAN["deploy/kustomization.yaml"],
        },
    )
    subprocess.run([git, "init", "-q", str(repo)], check=True, timeout=30)
    result = _run("--root", str(repo), cwd=repo)
    assert result.returncode == 0, result.stderr

    # A new, not yet added file with a secret is found.
    _write(repo, {"deploy/leak.yaml": f"literals:\n  - match-key-secret={_key()}\n"})
    result = _run("--root", str(repo), cwd=repo)
    assert result.returncode == 1
    assert "deploy/leak.yaml:2: Lotse Credential" in result.stderr
    assert ".env" not in result.stderr

    # Baselining it is not enough: until someone audits it as a false positive, it fails.
    assert _run("--root", str(repo), "--update-baseline", cwd=repo).returncode == 0
    result = _run("--root", str(repo), cwd=repo)
    assert result.returncode == 1
    assert "deploy/leak.yaml" in result.stderr
    assert "not audited" in result.stderr
    audited = _run("--root", str(repo), "--audit", cwd=repo, answers="y\n" * 5)
    assert "deploy/leak.yaml:2" in audited.stdout
    recorded = json.loads((repo / ".secrets.baseline").read_text(encoding="utf-8"))
    audits = [entry["is_secret"] for entry in recorded["results"]["deploy/leak.yaml"]]
    assert audits, "recorded"
    assert all(audit is False for audit in audits)
    result = _run("--root", str(repo), cwd=repo)
    assert result.returncode == 0, result.stderr
