"""`lotse dev-secrets` and `lotse token --key-file`: development secrets, never committed."""

from __future__ import annotations

import asyncio
import base64
import stat
from pathlib import Path

import pytest
from lotse_runtime.auth import DEV_ISSUER, JwksSource, JwtCallerResolver
from lotse_runtime.identity import Caller
from lotse_tooling import dev_secrets
from lotse_tooling.cli import main
from starlette.requests import Request

from tests.deploy.manifests import ROOT


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A stand-in repository root (the command insists on docker-compose.yml)."""
    (tmp_path / "docker-compose.yml").write_text("services: {}\n", encoding="utf-8")
    return tmp_path


def _k8s(root: Path, name: str) -> dict[str, str]:
    return dev_secrets.read_env_file(root / dev_secrets.K8S_SECRETS_DIR / name)


def _caller(jwks: str, token: str) -> Caller:
    resolver = JwtCallerResolver(keys=JwksSource(jwks), issuer=DEV_ISSUER)
    request = Request({"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]})
    return asyncio.run(resolver.resolve(request))


def test_writes_random_secrets_into_private_files_that_git_ignores(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev-secrets", "--root", str(root)]) == 0
    assert "deploy/dev-issuer-key.pem" in capsys.readouterr().out
    env = dev_secrets.read_env_file(root / ".env")
    for name in (
        "POSTGRES_PASSWORD",
        "INTAKE_DB_PASSWORD",
        "VISITS_DB_PASSWORD",
        "REFERRALS_DB_PASSWORD",
        "REPORTING_DB_PASSWORD",
        "DELIVERY_DB_PASSWORD",
    ):
        assert len(env[name]) >= 32, name
    assert len(set(env.values())) == len(env), "every value drawn on its own"
    for name in ("INTAKE_KEY_ENCRYPTION_KEY", "INTAKE_MATCH_KEY_SECRET", "DELIVERY_SECRET_KEY"):
        raw = base64.urlsafe_b64decode(env[name] + "=" * (-len(env[name]) % 4))
        assert len(raw) == 32, name

    # The dev cluster gets the same values, in the shape its generators read.
    assert _k8s(root, "postgres-admin.env") == {"password": env["POSTGRES_PASSWORD"]}
    assert _k8s(root, "intake-secrets.env") == {
        "key-encryption-key": env["INTAKE_KEY_ENCRYPTION_KEY"],
        "match-key-secret": env["INTAKE_MATCH_KEY_SECRET"],
    }
    assert _k8s(root, "delivery-secrets.env") == {"secret-key": env["DELIVERY_SECRET_KEY"]}
    url = _k8s(root, "visits-db.env")["url"]
    assert url == f"postgresql://visits:{env['VISITS_DB_PASSWORD']}@lotse-postgres:5432/visits"
    assert _k8s(root, "auth.env") == {"AUTH_JWKS": env["DEV_ISSUER_JWKS"]}

    written = [root / ".env", root / dev_secrets.ISSUER_KEY_FILE]
    written += list((root / dev_secrets.K8S_SECRETS_DIR).iterdir())
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    for pattern in (".env", "deploy/dev-issuer-key.pem", "deploy/k8s/overlays/dev/secrets/"):
        assert pattern in ignored, pattern


def test_running_again_keeps_everything_and_force_draws_anew(root: Path) -> None:
    (root / ".env").write_text("COMPOSE_PROJECT_NAME=lotse-local\n", encoding="utf-8")
    first = dev_secrets.write(root)
    key = (root / dev_secrets.ISSUER_KEY_FILE).read_bytes()
    again = dev_secrets.write(root)
    assert again.values == first.values
    assert again.created == []
    assert (root / dev_secrets.ISSUER_KEY_FILE).read_bytes() == key
    env = dev_secrets.read_env_file(root / ".env")
    assert env["COMPOSE_PROJECT_NAME"] == "lotse-local", "the developer's own lines stay"

    forced = dev_secrets.write(root, force=True)
    assert (root / dev_secrets.ISSUER_KEY_FILE).read_bytes() != key
    for name, value in first.values.items():
        assert forced.values[name] != value, name
    assert dev_secrets.read_env_file(root / ".env")["COMPOSE_PROJECT_NAME"] == "lotse-local"


def test_token_key_file_signs_what_the_generated_jwks_verifies(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev_secrets.write(root)
    key_file = root / dev_secrets.ISSUER_KEY_FILE
    argv = ["token", "--key-file", str(key_file), "--role", "traeger", "--traeger", "awo"]
    assert main(argv) == 0
    token = capsys.readouterr().out.strip()
    jwks = dev_secrets.read_env_file(root / ".env")["DEV_ISSUER_JWKS"]
    caller = _caller(jwks, token)
    assert (caller.role, caller.traeger) == ("traeger", "awo")

    # A key that is not there is not made up: its tokens would be trusted nowhere.
    missing = root / "nowhere.pem"
    assert main(["token", "--key-file", str(missing), "--role", "analyst"]) == 2
    assert "dev-secrets" in capsys.readouterr().err
    assert not missing.exists()


def test_refuses_a_directory_that_is_not_the_repository_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev-secrets", "--root", str(tmp_path)]) == 2
    assert "docker-compose.yml" in capsys.readouterr().err
    assert not (tmp_path / ".env").exists()
